"""The function-preserving parameter expander: small parameters -> a big model's.

    big = expander.grow_params(small_params, small_cfg, big_cfg, jax.random.key(0), noise=0.05)

`grow_params` is pure: it returns parameters with exactly the tree structure,
shapes and dtypes of a fresh init of `big_cfg`, deterministic for a key, and
works under `jax.jit` (sharded like the big model's parameters when a mesh is
given). It dispatches on the logical axis names every parameter carries:

- width axes (`embed`, `fused`, `kv`, `kv_out`: the model width D -> k*D) copy
  units along a head-respecting map (unit j of new head h copies a unit of old
  head h mod H, every old unit copied k times, so an RMSNorm sees the same RMS);
  hidden axes (`mlp`, `rank`, ...) tile. A kernel's input axis (its first axis
  after `layers` / `expert`) is divided by the copy count, so sums are unchanged;
  zero-sum noise over the copies of each input unit breaks the symmetry exactly;
- `layers`: new blocks are copies of their neighbour with every write into the
  residual stream zeroed (an exact identity);
- `vocab`: new rows are the mean of the old rows of the token's pieces under the
  old tokenizer (`vocab_pieces`), else of all old rows;
- the tied head reads the embed axis as an input (the final norm is divided by
  the copy count); what no axis name carries, the model's own growth rules say
  (`models.base.GrowthRules`: its residual writers, its attention scales, FFN ->
  experts).

Growth that cannot be exact is a one-line ConfigError naming why, unless
`allow_inexact=True`.
"""
from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mmrec_jax import models
from mmrec_jax.training import sharding as shard_lib
from mmrec_jax.errors import ConfigError

# Axes of width D (the residual stream and every D-wide space mixed with it elementwise).
WIDTH_AXES = ("embed", "fused", "kv", "kv_out")
# Axes that are never grown (their size must match).
FIXED_AXES = ("expert", None)


# ----------------------------------------------------------------------------- maps


def width_map(d, D, H, Hn):
  """Source unit of every new width unit: head-respecting copies (numpy int [D])."""
  hd, hdn = d // H, D // Hn
  j = np.arange(D)
  if D >= d and Hn % H == 0 and hdn % hd == 0:
    return (j // hdn % H) * hd + (j % hdn) % hd
  return j % d   # inexact: plain tiling (or truncation)


def tile_map(n, N):
  return np.arange(N) % n


DEPTHS = ("identity", "stack")


def depth_map(L, Ln, depth="identity"):
  """(source layer, is_new) of every new layer. `identity`: new layers right after their
  source, marked new (their residual writes are zeroed: an exact identity);
  `stack`: the trained stack repeated (layer i of the big model copies layer i mod L,
  every copy active, as the stacking methods grow depth; not function-preserving)."""
  if Ln < L:  # inexact: evenly spaced subset
    return [(int(i), False) for i in np.linspace(0, L - 1, Ln).round().astype(int)]
  if depth == "stack":
    return [(i % L, False) for i in range(Ln)]
  out = []
  for i in range(L):
    n = (i + 1) * Ln // L - i * Ln // L
    out += [(i, False)] + [(i, True)] * (n - 1)
  return out


def head_ratio(small, big):
  """How many times each unit of an old head appears in its new head (1 if inexact)."""
  hd, hdn = small.d_model // small.n_heads, big.d_model // big.n_heads
  return hdn // hd if hdn % hd == 0 else 1


# ----------------------------------------------------------------------------- checks


def rules(cfg):
  """The growth rules a model declares (`GROWTH`), or None."""
  return type(cfg).GROWTH


def inexact_reasons(small, big):
  """Why growing `small` into `big` cannot preserve the function ([] if it can)."""
  r = []
  if small.kind != big.kind:
    return [f"model.kind changes ({small.kind} -> {big.kind})"]
  g = rules(small)
  if g is None:
    return [f"model.kind={small.kind!r} declares no growth rules"]
  for f in ("vocab_size", "d_model", "n_layers", "n_heads"):
    if getattr(big, f) < getattr(small, f):
      r.append(f"model.{f} shrinks ({getattr(small, f)} -> {getattr(big, f)})")
  if big.d_model >= small.d_model and big.d_model % small.d_model:
    r.append(f"model.d_model={big.d_model} is not an integer multiple of {small.d_model}")
  hd, hdn = small.d_model // small.n_heads, big.d_model // big.n_heads
  if big.n_heads % small.n_heads or hdn % hd:
    r.append(f"heads {small.n_heads}x{hd} -> {big.n_heads}x{hdn}: the head count and head "
             "size must both grow by integer factors")
  small_w, big_w = g.hidden_widths(small), g.hidden_widths(big)
  for what, a in small_w.items():
    b = big_w[what]
    if b < a or b % a:
      r.append(f"{what} {a} -> {b} is not an integer multiple")
  return r + g.inexact_reasons(small, big)


def check_growable(small, big, allow_inexact=False):
  """Raises ConfigError naming why growth is not exact (unless allow_inexact);
  returns the reasons."""
  reasons = inexact_reasons(small, big)
  if reasons and not allow_inexact:
    raise ConfigError(f"cannot grow {small.name} into {big.name} exactly: "
                      f"{'; '.join(reasons)}; pass --allow_inexact to grow anyway")
  return reasons


# ----------------------------------------------------------------------------- the expander


def _vocab_matrix(V, Vn, vocab_pieces):
  """[Vn - V, V] float32: each new row the mean of its pieces' rows (or of all rows)."""
  A = np.full((max(Vn - V, 0), V), 1.0 / V, np.float32)
  for n, pieces in enumerate(vocab_pieces or ()):
    if n >= len(A):
      break
    pieces = [int(p) for p in pieces if 0 <= int(p) < V]
    if pieces:
      A[n] = np.bincount(pieces, minlength=V) / len(pieces)
  return A


MODES = ("params", "mu", "nu", "nu_neighbour")
NU_MODES = ("nu", "nu_neighbour")   # second moments (scaled by squares); nu_neighbour keeps an
                                    # inserted block's copied values instead of zeroing them


def _grow_leaf(x, names, path, small, big, maps, key, noise, mode="params"):
  """One parameter (or, with `mode` mu / nu, its Adam moment): depth, vocab, width, then
  the input-axis split and its noise. Moments follow the parameter's maps: copies
  share them; a split input axis divides the first moment like the parameter and the
  second by the square; inserted blocks and new vocabulary rows start at zero."""
  x = x.astype(jnp.float32)
  dims = list(names)
  power = 2 if mode in NU_MODES else 1
  # depth
  if "layers" in dims:
    ax = dims.index("layers")
    src = np.array([s for s, _ in maps["layers"]])
    x = jnp.take(x, src, axis=ax)
    writers = rules(big).residual_writers(big) if rules(big) else ()
    writer = any(path.endswith("/" + w) or path == w for w in writers)
    if mode in ("mu", "nu") or (mode == "params" and writer):   # new blocks: zeroed
      keep = np.array([0.0 if new else 1.0 for _, new in maps["layers"]], np.float32)
      x = x * keep.reshape([-1 if i == ax else 1 for i in range(x.ndim)])
  # vocab
  if "vocab" in dims:
    ax = dims.index("vocab")
    Vn = big.vocab_size
    if Vn <= x.shape[ax]:
      x = jnp.take(x, np.arange(Vn), axis=ax)
    else:
      A = jnp.asarray(maps["vocab"]) * (mode == "params")   # new rows' moments: zero
      new = jnp.moveaxis(jnp.tensordot(A, jnp.moveaxis(x, ax, 0), axes=1), 0, ax)
      x = jnp.concatenate([x, new], axis=ax)
  # width
  srcs = {}
  for ax, name in enumerate(dims):
    if name in ("layers", "vocab") or name in FIXED_AXES:
      continue
    n = x.shape[ax]
    N = maps["target_shape"][path][ax]
    if n == N:
      continue
    src = maps["width"] if (name in WIDTH_AXES and n == small.d_model
                            and N == big.d_model) else tile_map(n, N)
    srcs[ax] = (src, n)
    x = jnp.take(x, src, axis=ax)
  # the input axis: the first after the leading layers / expert (batch) axes; kernels only
  lead = 0
  while lead < len(dims) and dims[lead] in ("layers", "expert"):
    lead += 1
  body = list(range(lead, len(dims)))
  if len(body) >= 2 and body[0] in srcs:
    ax = body[0]
    src, n = srcs[ax]
    count = np.bincount(src, minlength=n)[src].astype(np.float32)
    shape = [-1 if i == ax else 1 for i in range(x.ndim)]
    x = x / count.reshape(shape) ** power
    if mode != "params":
      return x
    # noise with zero sum over the copies of each input unit (exact: the copies' inputs
    # are equal); in an inserted block it also lands on the zeroed residual writers
    z = jax.random.normal(jax.random.fold_in(key, zlib.crc32(path.encode())), x.shape)
    zm = jnp.moveaxis(z, ax, 0)
    mean = jax.ops.segment_sum(zm, src, num_segments=n) / np.bincount(
        src, minlength=n).reshape((-1,) + (1,) * (zm.ndim - 1)).clip(1)
    z = jnp.moveaxis(zm - mean[src], 0, ax)
    x = x + noise * jnp.std(x) * z
  return x


def _grow_tree(small_params, small, big, key, noise, vocab_pieces, mode="params",
               depth="identity"):
  big_model = models.build(big)
  boxed = jax.eval_shape(lambda k: models.init_params(big_model, k), key)
  leaves = traverse_util.flatten_dict(boxed, sep="/")
  p = nn.unbox(small_params)
  g = rules(big) or models.GrowthRules()
  p = g.prepare(p, small, big, jax.random.fold_in(key, 1), moments=mode != "params")
  small_flat = traverse_util.flatten_dict(p, sep="/")
  maps = {"layers": depth_map(small.n_layers, big.n_layers, depth),
          "width": width_map(small.d_model, big.d_model, small.n_heads, big.n_heads),
          "vocab": _vocab_matrix(small.vocab_size, big.vocab_size, vocab_pieces),
          "target_shape": {k: v.value.shape for k, v in leaves.items()}}
  missing = [k for k in leaves if k not in small_flat
             or len(small_flat[k].shape) != len(leaves[k].value.shape)]
  fresh = (traverse_util.flatten_dict(nn.unbox(models.init_params(big_model, key)), sep="/")
           if missing else {})
  r = head_ratio(small, big)
  wkey = jax.random.fold_in(key, 2)
  out = {}
  for path, leaf in leaves.items():
    want = leaf.value
    if path in missing:   # a part the small model lacks (e.g. UBOO switched on): fresh
      out[path] = (fresh[path] if mode == "params" else jnp.zeros(want.shape)).astype(want.dtype)
      continue
    x = _grow_leaf(small_flat[path], leaf.names, path, small, big, maps, wkey, noise, mode)
    for _ in range(2 if mode in NU_MODES else 1):   # scalings of a moment: squared for nu
      if path == g.tied_head_norm and big.d_model != small.d_model:
        count = np.bincount(maps["width"], minlength=small.d_model)[maps["width"]]
        x = x / count.astype(np.float32)
      x = g.adjust(path, x, small, big, r)
    if x.shape != want.shape:
      raise ConfigError(f"growing {path}: got shape {x.shape}, the big model has "
                        f"{want.shape}: no growth rule for this change; align the configs")
    out[path] = x.astype(want.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def grow_params(small_params, small_cfg, big_cfg, key, noise=0.0, mesh=None,
                vocab_pieces=None, allow_inexact=False, depth="identity", mode="params"):
  """Parameters of `big_cfg` computing the same function as `small_params` of `small_cfg`.

  `noise`: scale (relative to each kernel's std) of noise that sums to zero over
  the copies of each input unit. `vocab_pieces`: for every new token (in id
  order) the old ids of its pieces; its row is their mean (default: the mean of
  all old rows). `mesh`: shard the output like the big model's parameters.
  `depth`: `identity` (new blocks are exact identities) or `stack` (the trained stack
  repeated: not function-preserving). `mode`: `mu` / `nu` grow an Adam moment tree of
  the parameters instead (`growth.optimizer`).
  Returns unboxed parameters (float arrays with the big init's dtypes).
  """
  small, big = models.make_config(small_cfg), models.make_config(big_cfg)
  if depth not in DEPTHS or mode not in MODES:
    raise ConfigError(f"depth={depth!r} / mode={mode!r}: use depth in {DEPTHS}, mode in {MODES}")
  check_growable(small, big, allow_inexact)
  pieces = None if vocab_pieces is None else tuple(tuple(int(i) for i in p)
                                                   for p in vocab_pieces)
  if mesh is not None:   # the small params, replicated onto the mesh
    small_params = jax.device_put(small_params, shard_lib.replicated(mesh))
  return _grow_jit(small, big, pieces, mesh, mode, depth)(small_params, key, jnp.float32(noise))


@functools.lru_cache(maxsize=16)
def _grow_jit(small, big, pieces, mesh, mode="params", depth="identity"):
  """The jitted expander of one (small, big) pair (noise is an argument: one compile)."""
  fn = lambda p, k, noise: _grow_tree(p, small, big, k, noise, pieces, mode, depth)
  if mesh is None:
    return jax.jit(fn)
  boxed = jax.eval_shape(lambda k: models.init_params(models.build(big), k), jax.random.key(0))
  return jax.jit(fn, out_shardings=shard_lib.logical_shardings(boxed, mesh))


def grow_state(state, small_cfg, big_cfg):
  """A decoding state of the small model as the big model's (streaming continues
  exactly): width copies along the same map, inserted layers carry their
  neighbour's state (their output is zero anyway); the rest by the model's rules."""
  small, big = models.make_config(small_cfg), models.make_config(big_cfg)
  src_w = width_map(small.d_model, big.d_model, small.n_heads, big.n_heads)
  src_l = np.array([s for s, _ in depth_map(small.n_layers, big.n_layers)])
  out = rules(small).grow_state(state, small, src_w, src_l) if rules(small) else None
  if out is None:
    raise ConfigError(f"model.kind={small.kind!r} declares no rule to grow its decoding state")
  return out


def logits_fn(cfg):
  """Jitted (params, tokens_BT, state, reset_BT) -> (logits float32, state), eval mode."""
  model = models.build(models.make_config(cfg))

  @jax.jit
  def fn(params, tokens_BT, state, reset_BT):
    logits, state, _ = model.apply({"params": nn.unbox(params)}, tokens_BT, state=state,
                                   reset=reset_BT)
    return logits, state
  return fn, model


def logit_diff(small_cfg, small_params, big_cfg, big_params, tokens_BT):
  """Max |logits_big - logits_small| over the old vocabulary (eval mode, fresh state)."""
  small = models.make_config(small_cfg)
  reset = tokens_BT == 0
  (fa, ma), (fb, mb) = logits_fn(small_cfg), logits_fn(big_cfg)
  B = tokens_BT.shape[0]
  a, _ = fa(small_params, tokens_BT, ma.init_state(B), reset)
  b, _ = fb(big_params, tokens_BT, mb.init_state(B), reset)
  return float(jnp.max(jnp.abs(b[..., :small.vocab_size] - a)))
