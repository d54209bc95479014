"""Progressive growth: a function-preserving parameter expander and its command.

    big = grow.grow_params(small_params, small_cfg, big_cfg, jax.random.key(0), noise=0.05)

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
- model facts no axis name carries: the tied head reads the embed axis as an
  input (the final norm is divided by the copy count), the memory query (or, with
  `mem_qk_norm`, the read's per-head temperature) is scaled so attention logits
  keep their value when the head size grows, and which
  parameters write into the residual stream (`RESIDUAL_WRITERS`).

Growth that cannot be exact is a one-line ConfigError naming why, unless
`allow_inexact=True`.

CLI (a ready-to-train workdir; then `python -m mmrec_jax.train --config=... --workdir=...`):

    python -m mmrec_jax.grow --from_workdir=runs/tiny --config=configs/mini.py \
        --workdir=runs/mini [--noise=0.05] [--allow_inexact] [--checkpoint=best]
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn
from flax import traverse_util
from ml_collections import config_flags

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax import data as data_lib
from mmrec_jax import models
from mmrec_jax import sharding as shard_lib
from mmrec_jax import sources
from mmrec_jax import tokenizer as tokenizer_lib
from mmrec_jax import train_state as ts_lib
from mmrec_jax.errors import ConfigError, UsageError

# Axes of width D (the residual stream and every D-wide space mixed with it elementwise).
WIDTH_AXES = ("embed", "fused", "kv", "kv_out")
# Axes that are never grown (their size must match).
FIXED_AXES = ("expert", None)
# Parameters (path suffixes under `blocks`) that write into the residual stream:
# zeroed in an inserted block, which is then an exact identity.
RESIDUAL_WRITERS = ("mix_out/kernel", "ffn/down/kernel", "ffn/down/bias", "moe/w_down",
                    "moe/b_down")   # and memory/out/kernel with model.mem_residual
# The norm whose output feeds the tied head (divided by the width's copy count).
TIED_HEAD_NORM = "final_norm/scale"
# The fused kernel whose slice 0 is the memory query (scaled by 1/sqrt(head growth)).
QUERY_KERNEL = "blocks/fused/kernel"
# The per-head read temperature of `mem_qk_norm` (heads tile like the width map's).
READ_SCALE = "memory/read_scale"
# Fields that only change how a model runs or trains, never its function.
RUNTIME_FIELDS = ("name", "max_seq_len", "dropout", "dtype", "param_dtype", "scan_layers",
                  "remat", "matmul_dtype", "scan_impl", "scan_chunk", "decay_min", "decay_max",
                  "mem_out_init",
                  "mem_lr_scale", "mem_write_grad",
                  "moe_capacity_factor", "moe_loss_weight", "moe_impl", "uboo_weight",
                  "use_uboo")
GEOMETRY_FIELDS = ("chunk_size", "mem_slots", "mem_levels")


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


def depth_map(L, Ln):
  """(source layer, is_new) of every new layer: new layers right after their source."""
  if Ln < L:  # inexact: evenly spaced subset
    return [(int(i), False) for i in np.linspace(0, L - 1, Ln).round().astype(int)]
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


def inexact_reasons(small, big):
  """Why growing `small` into `big` cannot preserve the function ([] if it can)."""
  r = []
  if small.kind != big.kind:
    return [f"model.kind changes ({small.kind} -> {big.kind})"]
  for f in ("vocab_size", "d_model", "n_layers", "n_heads"):
    if getattr(big, f) < getattr(small, f):
      r.append(f"model.{f} shrinks ({getattr(small, f)} -> {getattr(big, f)})")
  if big.d_model >= small.d_model and big.d_model % small.d_model:
    r.append(f"model.d_model={big.d_model} is not an integer multiple of {small.d_model}")
  hd, hdn = small.d_model // small.n_heads, big.d_model // big.n_heads
  if big.n_heads % small.n_heads or hdn % hd:
    r.append(f"heads {small.n_heads}x{hd} -> {big.n_heads}x{hdn}: the head count and head "
             "size must both grow by integer factors")
  hidden = {"FFN width (ffn_mult * d_model)": (small.ffn_mult * small.d_model,
                                               big.ffn_mult * big.d_model),
            "MDI hidden width (d_model / mdi_hidden_div)": (
                small.d_model // small.mdi_hidden_div, big.d_model // big.mdi_hidden_div)}
  if small.kind == "mmrec" and small.use_dpg and big.use_dpg:
    hidden["DPG rank"] = (small.rank, big.rank)
  for what, (a, b) in hidden.items():
    if b < a or b % a:
      r.append(f"{what} {a} -> {b} is not an integer multiple")
  if small.kind == "mmrec":
    for f in GEOMETRY_FIELDS:
      if getattr(small, f) != getattr(big, f):
        r.append(f"memory geometry model.{f} changes ({getattr(small, f)} -> "
                 f"{getattr(big, f)}); align it in the configs")
    if small.mem_qk_norm != big.mem_qk_norm:
      r.append(f"model.mem_qk_norm switched {'off' if small.mem_qk_norm else 'on'} "
               "(another read function)")
    if small.mem_read_logn != big.mem_read_logn:
      r.append(f"model.mem_read_logn switched {'off' if small.mem_read_logn else 'on'} "
               "(another read function)")
    if small.mem_residual != big.mem_residual:
      r.append(f"model.mem_residual switched {'off' if small.mem_residual else 'on'} "
               "(the read enters elsewhere)")
    if small.mem_sink != big.mem_sink:
      r.append(f"model.mem_sink switched {'off' if small.mem_sink else 'on'} "
               "(another read function)")
    if small.mem_pool != big.mem_pool:
      r.append(f"model.mem_pool changes ({small.mem_pool} -> {big.mem_pool}; another pooling)")
    if small.use_dpg != big.use_dpg:
      r.append(f"model.use_dpg switched {'off' if small.use_dpg else 'on'} (no identity form)")
    if small.use_moe and not big.use_moe:
      r.append("model.use_moe switched off (no identity form)")
    if small.use_moe and big.use_moe and small.moe_experts != big.moe_experts:
      r.append(f"model.moe_experts changes ({small.moe_experts} -> {big.moe_experts})")
  else:
    known = set(RUNTIME_FIELDS) | {"kind", "vocab_size", "d_model", "n_layers", "n_heads",
                                   "ffn_mult"}
    if set(small.to_dict()) - known:
      r.append(f"growth of model.kind={small.kind!r} is not exact yet (only mmrec)")
  return r


def check_growable(small, big, allow_inexact=False):
  """Raises ConfigError naming why growth is not exact (unless allow_inexact);
  returns the reasons."""
  reasons = inexact_reasons(small, big)
  if reasons and not allow_inexact:
    raise ConfigError(f"cannot grow {small.name} into {big.name} exactly: "
                      f"{'; '.join(reasons)}; pass --allow_inexact to grow anyway")
  return reasons


# ----------------------------------------------------------------------------- the expander


def _path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _upcycle_moe(small_p, small, big, key):
  """FFN -> top-2 MoE with every expert a copy of the FFN (exact: gates sum to 1)."""
  moe_small = small.replace(use_moe=True, moe_experts=big.moe_experts)
  router = nn.unbox(models.init_params(models.build(moe_small), key))["blocks"]["moe"]["router"]
  blocks = dict(small_p["blocks"])
  ffn = blocks.pop("ffn")
  E = big.moe_experts
  rep = lambda x: jnp.repeat(x[:, None], E, axis=1)   # [L, ...] -> [L, E, ...]
  blocks["moe"] = {"router": router, "w_up": rep(ffn["up"]["kernel"]),
                   "b_up": rep(ffn["up"]["bias"]), "w_down": rep(ffn["down"]["kernel"]),
                   "b_down": rep(ffn["down"]["bias"])}
  return dict(small_p, blocks=blocks)


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


def _grow_leaf(x, names, path, small, big, maps, key, noise):
  """One parameter: depth, vocab, width, then the input-axis split and its noise."""
  x = x.astype(jnp.float32)
  dims = list(names)
  # depth
  if "layers" in dims:
    ax = dims.index("layers")
    src = np.array([s for s, _ in maps["layers"]])
    x = jnp.take(x, src, axis=ax)
    writers = RESIDUAL_WRITERS + (("memory/out/kernel",) if getattr(big, "mem_residual", False)
                                  else ())
    if any(path.endswith("/" + w) or path == w for w in writers):
      keep = np.array([0.0 if new else 1.0 for _, new in maps["layers"]], np.float32)
      x = x * keep.reshape([-1 if i == ax else 1 for i in range(x.ndim)])
  # vocab
  if "vocab" in dims:
    ax = dims.index("vocab")
    Vn = big.vocab_size
    if Vn <= x.shape[ax]:
      x = jnp.take(x, np.arange(Vn), axis=ax)
    else:
      A = jnp.asarray(maps["vocab"])
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
    x = x / count.reshape(shape)
    # noise with zero sum over the copies of each input unit (exact: the copies' inputs
    # are equal); in an inserted block it also lands on the zeroed residual writers
    z = jax.random.normal(jax.random.fold_in(key, zlib.crc32(path.encode())), x.shape)
    zm = jnp.moveaxis(z, ax, 0)
    mean = jax.ops.segment_sum(zm, src, num_segments=n) / np.bincount(
        src, minlength=n).reshape((-1,) + (1,) * (zm.ndim - 1)).clip(1)
    z = jnp.moveaxis(zm - mean[src], 0, ax)
    x = x + noise * jnp.std(x) * z
  return x


def _grow_tree(small_params, small, big, key, noise, vocab_pieces):
  big_model = models.build(big)
  boxed = jax.eval_shape(lambda k: models.init_params(big_model, k), key)
  leaves = traverse_util.flatten_dict(boxed, sep="/")
  p = nn.unbox(small_params)
  if small.kind == "mmrec" and big.use_moe and not small.use_moe:
    p = _upcycle_moe(p, small, big, jax.random.fold_in(key, 1))
  small_flat = traverse_util.flatten_dict(p, sep="/")
  maps = {"layers": depth_map(small.n_layers, big.n_layers),
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
      out[path] = fresh[path].astype(want.dtype)
      continue
    x = _grow_leaf(small_flat[path], leaf.names, path, small, big, maps, wkey, noise)
    if path == TIED_HEAD_NORM and big.d_model != small.d_model:
      count = np.bincount(maps["width"], minlength=small.d_model)[maps["width"]]
      x = x / count.astype(np.float32)
    if path == QUERY_KERNEL and r > 1 and getattr(big, "mem_levels", 1):
      x = x.at[..., 0, :].multiply(1.0 / math.sqrt(r))
    if path.endswith(READ_SCALE) and r > 1:   # unit-RMS q, k: the same fix, on the scale
      x = x / math.sqrt(r)
    if x.shape != want.shape:
      raise ConfigError(f"growing {path}: got shape {x.shape}, the big model has "
                        f"{want.shape}: no growth rule for this change; align the configs")
    out[path] = x.astype(want.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def grow_params(small_params, small_cfg, big_cfg, key, noise=0.0, mesh=None,
                vocab_pieces=None, allow_inexact=False):
  """Parameters of `big_cfg` computing the same function as `small_params` of `small_cfg`.

  `noise`: scale (relative to each kernel's std) of noise that sums to zero over
  the copies of each input unit. `vocab_pieces`: for every new token (in id
  order) the old ids of its pieces; its row is their mean (default: the mean of
  all old rows). `mesh`: shard the output like the big model's parameters.
  Returns unboxed parameters (float arrays with the big init's dtypes).
  """
  small, big = models.make_config(small_cfg), models.make_config(big_cfg)
  check_growable(small, big, allow_inexact)
  pieces = None if vocab_pieces is None else tuple(tuple(int(i) for i in p)
                                                   for p in vocab_pieces)
  if mesh is not None:   # the small params, replicated onto the mesh
    small_params = jax.device_put(small_params, shard_lib.replicated(mesh))
  return _grow_jit(small, big, pieces, mesh)(small_params, key, jnp.float32(noise))


@functools.lru_cache(maxsize=16)
def _grow_jit(small, big, pieces, mesh):
  """The jitted expander of one (small, big) pair (noise is an argument: one compile)."""
  fn = lambda p, k, noise: _grow_tree(p, small, big, k, noise, pieces)
  if mesh is None:
    return jax.jit(fn)
  boxed = jax.eval_shape(lambda k: models.init_params(models.build(big), k), jax.random.key(0))
  return jax.jit(fn, out_shardings=shard_lib.logical_shardings(boxed, mesh))


def grow_state(state, small_cfg, big_cfg):
  """A decoding state of the small model as the big model's (streaming continues exactly).

  Width copies along the same map; memory slots hold [key, value] halves;
  inserted layers carry their neighbour's state (their output is zero anyway).
  """
  small, big = models.make_config(small_cfg), models.make_config(big_cfg)
  src_w = width_map(small.d_model, big.d_model, small.n_heads, big.n_heads)
  src_l = np.array([s for s, _ in depth_map(small.n_layers, big.n_layers)])
  d = small.d_model
  kv = np.concatenate([src_w, d + src_w])

  def one(path, x):
    x = jnp.take(x, src_l, axis=0)
    name = _path_str(path)
    if name.endswith("slots") or name.endswith("pend"):
      return jnp.take(x, kv, axis=-1)
    if name in ("h", "chunk_sum"):
      return jnp.take(x, src_w, axis=-1)
    return x
  return jax.tree_util.tree_map_with_path(one, state)


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


# ----------------------------------------------------------------------------- workdirs


def new_token_pieces(old_tok, new_tok):
  """For every token of `new_tok` beyond `old_tok`'s ids: its pieces' old ids."""
  V, Vn = old_tok.get_vocab_size(), new_tok.get_vocab_size()
  return [[t.id for t in old_tok.model.tokenize(new_tok.id_to_token(i))] for i in range(V, Vn)]


def check_extends(old_tok, new_tok, where):
  """UsageError unless every old id names the same token in `new_tok`."""
  for i in range(old_tok.get_vocab_size()):
    if new_tok.id_to_token(i) != old_tok.id_to_token(i):
      raise UsageError(f"{where} does not extend the old tokenizer (id {i} is "
                       f"{new_tok.id_to_token(i)!r}, was {old_tok.id_to_token(i)!r}); leave "
                       "data.tokenizer empty to extend the old one")


def big_tokenizer(old_tok, config):
  """The big run's tokenizer: `data.tokenizer` if set (it must extend the old one),
  else the old one extended to `model.vocab_size` on the train split."""
  d, V = config.data, config.model.vocab_size
  if d.tokenizer:
    tok = tokenizer_lib.load_tokenizer(d.tokenizer)
    check_extends(old_tok, tok, d.tokenizer)
  elif V == old_tok.get_vocab_size():
    tok = old_tok
  else:
    texts = (t for _, t in sources.split_documents(d, "train", d.tokenizer_max_bytes))
    tok = tokenizer_lib.extend_tokenizer(old_tok, texts, V)
  tokenizer_lib.check_tokenizer(tok, V)
  return tok


def _val_tokens(config, old_tok, seq_len, rows=2):
  """[rows, seq_len] int32 of validation text under the old tokenizer (train text if none)."""
  d = config.data
  ids = []
  for split in ("val", "train"):
    for _, text in sources.split_documents(d, split, 1 << 20):
      ids += [0] + old_tok.encode(text).ids
      if len(ids) >= rows * seq_len:
        break
    if len(ids) >= rows * seq_len:
      break
  ids = (ids * (rows * seq_len // max(len(ids), 1) + 1))[:rows * seq_len]
  return np.asarray(ids, np.int32).reshape(rows, seq_len)


def is_empty_dir(path):
  return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def grow_workdir(from_workdir, config, workdir, noise=0.05, allow_inexact=False,
                 checkpoint="best", seed=0, log=print, devices=None):
  """Writes a ready-to-train `workdir` for `config` grown from `from_workdir`'s
  checkpoint: grown params as the step-0 checkpoint (fresh optimizer state, a
  fresh data iterator), config.json and the extended tokenizer.json. Written
  into a temporary folder and renamed, so a crash leaves no half workdir.
  Returns the max logit difference measured on validation text."""
  if not is_empty_dir(workdir):
    raise UsageError(f"--workdir={workdir} is not empty; pass a new or empty directory to "
                     "grow into")
  config_lib.validate(config)
  old_cfg = ckpt_lib.load_run_config(from_workdir)
  small, big = models.make_config(old_cfg.model), models.make_config(config.model)
  reasons = check_growable(small, big, allow_inexact)
  small_params, step = ckpt_lib.restore_params(from_workdir, checkpoint)
  old_tok = tokenizer_lib.load_tokenizer(os.path.join(from_workdir, "tokenizer.json"))
  tok = big_tokenizer(old_tok, config)
  pieces = new_token_pieces(old_tok, tok)
  s = ts_lib.setup(config, devices)
  params = grow_params(small_params, small, big, jax.random.key(seed), noise=noise,
                       vocab_pieces=pieces, allow_inexact=allow_inexact, mesh=s.mesh)
  tokens = _val_tokens(config, old_tok, min(config.train.seq_len, 256))
  diff = logit_diff(small, small_params, big, params, tokens)
  log(f"grew {from_workdir} (step {step}, {small.name}: {models.count_params(small_params):,} "
      f"params) into {big.name} ({models.count_params(params):,} params), noise {noise}; "
      f"max logit difference on {tokens.size} validation tokens: {diff:.2e}"
      + (f" (inexact: {'; '.join(reasons)})" if reasons else ""))
  tmp = os.path.abspath(workdir).rstrip("/") + ".growing"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  tokenizer_lib.save_tokenizer(tok, os.path.join(tmp, "tokenizer.json"))
  ckpt_lib.save_run_config(tmp, config)
  state = ts_lib.create(s, init_from=params)
  ds = data_lib.build(config, tok)
  mngr = ckpt_lib.make_manager(tmp, keep=config.checkpoint.keep, async_save=False)
  ckpt_lib.save(mngr, 0, state.params, state.opt_state, state.rng, ds.train_iter().get_state(),
                extra={"best_val": None, "bad_evals": 0, "best_step": None,
                       "first_loss": None, "grown_from": os.path.abspath(from_workdir),
                       "grown_from_step": int(step), "grow_logit_diff": diff},
                carry=state.carry)
  mngr.wait_until_finished()
  mngr.close()
  if os.path.isdir(workdir):
    os.rmdir(workdir)
  os.replace(tmp, workdir)
  return diff


# ----------------------------------------------------------------------------- CLI


def main(argv):
  del argv
  F = flags.FLAGS
  config = config_lib.validate(F.config)
  grow_workdir(F.from_workdir, config, F.workdir, noise=F.noise, allow_inexact=F.allow_inexact,
               checkpoint=F.checkpoint, seed=F.seed)
  print(f"ready: python -m mmrec_jax.train --config={config_flags.get_config_filename(F['config'])} "
        f"--workdir={F.workdir}")


def entry():
  config_flags.DEFINE_config_file("config", None, cli.config_help("mmrec_jax.grow",
                                                                  "configs/mini.py"),
                                  lock_config=False)
  flags.DEFINE_string("from_workdir", None, "Trained run to grow from (e.g. runs/tiny).")
  flags.DEFINE_string("workdir", None, "New, empty run directory to write (e.g. runs/mini).")
  flags.DEFINE_float("noise", 0.05, "Zero-sum symmetry-breaking noise, relative to each "
                     "kernel's std (0: plain copies, which never diverge).")
  flags.DEFINE_bool("allow_inexact", False, "Grow even where the function changes; prints "
                    "the measured logit difference.")
  flags.DEFINE_string("checkpoint", "best", "Checkpoint of --from_workdir: best, latest or a step.")
  flags.DEFINE_integer("seed", 0, "Seed of the noise (and of any fresh part).")
  for f in ("config", "from_workdir", "workdir"):
    flags.mark_flag_as_required(f)
  cli.run(main)


if __name__ == "__main__":
  entry()
