"""AdamW with a learning-rate schedule (linear warmup, then cosine decay or
warmup-stable-decay), global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from mmrec_jax.errors import ConfigError

NO_DECAY_NAMES = frozenset({"scale", "bias", "lam"})


SCHEDULES = ("cosine", "wsd")


def lr_schedule(tcfg):
  """Linear warmup from 0 to lr, then to lr * min_lr_ratio at train.steps: by a cosine
  (`train.schedule=cosine`), or held at lr and decayed linearly over the last
  `train.decay_frac` of the steps (`wsd`, warmup-stable-decay). With
  `train.rewarm_steps`, a second linear warmup from `train.rewarm_at`: step
  rewarm_at + i runs at (i + 1) / rewarm_steps of the schedule's rate."""
  base = _base_schedule(tcfg)
  at, n = int(tcfg.rewarm_at), int(tcfg.rewarm_steps)
  if not n:
    return base

  def schedule(count):
    ramp = jnp.clip((count - at + 1) / n, 0.0, 1.0)
    return base(count) * jnp.where(count < at, 1.0, ramp)
  return schedule


def _base_schedule(tcfg):
  warmup = int(tcfg.warmup_steps)
  steps = max(int(tcfg.steps), warmup + 1)
  end = tcfg.lr * tcfg.min_lr_ratio
  if tcfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tcfg.lr, warmup_steps=warmup, decay_steps=steps,
        end_value=end)
  decay = max(1, int(round(tcfg.decay_frac * steps)))
  stable = max(0, steps - warmup - decay)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, tcfg.lr, warmup) if warmup else optax.constant_schedule(tcfg.lr),
       optax.constant_schedule(tcfg.lr), optax.linear_schedule(tcfg.lr, end, decay)],
      boundaries=[warmup, warmup + stable])


def _key_name(k):
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def decay_mask(params_boxed_or_plain):
  """Tree of bools (True: apply weight decay) matching the unboxed params.

  No decay for norms ('scale'), biases ('bias'), decay parameters ('lam' or any
  param under a module whose name contains 'decay'), and vectors; a leading
  'layers' axis (nn.scan) does not count as a dimension.
  """
  def one(path, x):
    names = [_key_name(k) for k in path]
    if isinstance(x, nn.LogicallyPartitioned):
      ndim = sum(1 for n in x.names if n != "layers")
    else:
      ndim = x.ndim
    if names and names[-1] in NO_DECAY_NAMES:
      return False
    if any("decay" in n.lower() for n in names[:-1]):
      return False
    return ndim > 1
  return jax.tree_util.tree_map_with_path(
      one, params_boxed_or_plain, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def parse_lr_scales(spec):
  """`train.lr_scales` ("memory=0.1,ffn=0.5") as a dict {module name: factor}."""
  out = {}
  for item in filter(None, (p.strip() for p in str(spec or "").split(","))):
    name, eq, value = item.partition("=")
    try:
      factor = float(value)
    except ValueError:
      factor = -1.0
    if not eq or not name.strip() or factor < 0:
      raise ConfigError(f"train.lr_scales: {item!r} is not NAME=FACTOR with a factor >= 0 "
                        "(e.g. train.lr_scales=memory=0.1)")
    out[name.strip()] = factor
  return out


def lr_scale_tree(params_boxed_or_plain, spec, defaults=None):
  """Tree of floats matching the unboxed params: a parameter's learning-rate factor
  is that of the innermost name on its path (modules, then the parameter's own
  name) named in `spec` or, failing that, in `defaults` (1 when neither names one).
  `defaults` is the model's own ({module: factor}, from `model.lr_scales()`);
  `spec` (`train.lr_scales`) overrides it name by name.
  None when every factor is 1; a name in `spec` that matches no parameter is an error."""
  user = parse_lr_scales(spec)
  scales = {**(defaults or {}), **user}
  if not scales:
    return None
  used = set()

  def one(path, _):
    names = [_key_name(k) for k in path]
    for n in reversed(names):
      if n in scales:
        used.add(n)
        return scales[n]
    return 1.0
  tree = jax.tree_util.tree_map_with_path(
      one, params_boxed_or_plain, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  unknown = sorted(set(user) - used)
  if unknown:
    raise ConfigError(f"train.lr_scales names {', '.join(map(repr, unknown))}, which no "
                      "parameter's path contains; use module names such as memory, ffn, "
                      "fused, embed (python -m mmrec_jax.params lists them)")
  return tree if any(f != 1.0 for f in jax.tree.leaves(tree)) else None


def _scaled(inner, scales):
  """`inner` with its updates multiplied leaf by leaf by `scales`. The state is
  `inner`'s own, so a checkpoint resumes with or without the scales."""
  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, scales), state
  return optax.GradientTransformation(inner.init, update)


def make(tcfg, mask, scales=None):
  """The optax transformation: clip -> AdamW(schedule, masked decay), its steps
  scaled per parameter by `scales` (from `lr_scale_tree`) when given."""
  adamw = optax.adamw(lr_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=1e-8,
                      weight_decay=tcfg.weight_decay, mask=mask)
  return optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip) if tcfg.grad_clip > 0 else optax.identity(),
      _scaled(adamw, scales) if scales is not None else adamw)
