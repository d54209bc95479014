"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import jax
import optax
from flax import linen as nn

NO_DECAY_NAMES = frozenset({"scale", "bias", "lam"})


def lr_schedule(tcfg):
  """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at train.steps."""
  warmup = int(tcfg.warmup_steps)
  decay_steps = max(int(tcfg.steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.lr, warmup_steps=warmup, decay_steps=decay_steps,
      end_value=tcfg.lr * tcfg.min_lr_ratio)


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


def make(tcfg, mask):
  """The optax transformation: clip -> AdamW(schedule, masked decay)."""
  return optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip) if tcfg.grad_clip > 0 else optax.identity(),
      optax.adamw(lr_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=1e-8,
                  weight_decay=tcfg.weight_decay, mask=mask))
