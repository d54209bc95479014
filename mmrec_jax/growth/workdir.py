"""A grown run as a ready-to-train workdir: the old run's checkpoint grown, its
tokenizer extended so old ids keep their meaning, the config, the step-0 checkpoint.

    grow_workdir("runs/tiny", mini_config, "runs/mini", noise=0.05)
"""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.data import pipeline as data_lib
from mmrec_jax.data import sources
from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.errors import UsageError
from mmrec_jax.growth.expander import check_growable, grow_params, logit_diff
from mmrec_jax.growth.optimizer import grow_opt_state
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.training import state as ts_lib


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


OPTIMIZER = ("carry", "fresh")   # the small run's AdamW state grown, or a fresh one
SCHEDULE = ("continue", "restart")  # from the small run's step (minus a rewind), or from 0


def _restore_small(from_workdir, old_cfg, checkpoint, devices):
  """(params, opt_state, rng, data_state, step) of the small run's chosen checkpoint."""
  s = ts_lib.setup(old_cfg, devices)
  mngr = ckpt_lib.make_manager(from_workdir, async_save=False, read_only=True)
  try:
    try:
      step = ckpt_lib.resolve_step(mngr, checkpoint)
    except ValueError as e:
      raise UsageError(f"--from_workdir={from_workdir}: {e}") from None
    a = s.abstract_state
    params, opt_state, rng, data_state, _ = ckpt_lib.restore(mngr, step, a.params, a.opt_state,
                                                             a.rng)[:5]
  finally:
    mngr.close()
  return params, opt_state, rng, data_state, int(step)


def grow_workdir(from_workdir, config, workdir, noise=0.05, allow_inexact=False,
                 checkpoint="best", seed=0, log=print, devices=None, optimizer="fresh",
                 schedule="restart", rewind=0, depth="identity", new_moments="zero"):
  """Writes a ready-to-train `workdir` for `config` grown from `from_workdir`'s
  checkpoint, and returns the max logit difference measured on validation text.

  The workdir holds config.json, the tokenizer (the small run's, extended when the
  vocabulary grows) and one checkpoint: the grown parameters; with
  `optimizer="carry"` the small run's AdamW state grown with them
  (`growth.optimizer`), else a fresh one; with `schedule="continue"` at the small
  run's step minus `rewind` (training goes on along `config`'s learning-rate
  schedule from there: give it the whole ladder's `train.steps`), else at step 0.
  The data iterator continues the small run's stream when the tokenizer, batch and
  length are the same, else starts afresh. `depth`: `identity` blocks (exact) or
  `stack` (the trained stack repeated). Written into a temporary folder and renamed,
  so a crash leaves no half workdir."""
  if not is_empty_dir(workdir):
    raise UsageError(f"--workdir={workdir} is not empty; pass a new or empty directory to "
                     "grow into")
  if optimizer not in OPTIMIZER or schedule not in SCHEDULE or rewind < 0:
    raise UsageError(f"--optimizer={optimizer} / --schedule={schedule} / --rewind={rewind}: "
                     f"use one of {OPTIMIZER}, one of {SCHEDULE}, a rewind >= 0")
  config = config_lib.typed(config)
  old_cfg = ckpt_lib.load_run_config(from_workdir, flag="--from_workdir")
  small, big = models.make_config(old_cfg.model), models.make_config(config.model)
  reasons = check_growable(small, big, allow_inexact)
  small_params, small_opt, _, data_state, step = _restore_small(from_workdir, old_cfg,
                                                                  checkpoint, devices)
  start = max(0, step - rewind) if schedule == "continue" else 0
  if start >= config.train.steps:
    raise UsageError(f"the grown run would continue from step {start}, but its "
                     f"train.steps={config.train.steps}; give it the whole ladder's steps "
                     "(or --schedule=restart)")
  old_tok = tokenizer_lib.load_tokenizer(os.path.join(from_workdir, "tokenizer.json"))
  tok = big_tokenizer(old_tok, config)
  pieces = new_token_pieces(old_tok, tok)
  s = ts_lib.setup(config, devices)
  params = grow_params(small_params, small, big, jax.random.key(seed), noise=noise,
                       vocab_pieces=pieces, allow_inexact=allow_inexact, mesh=s.mesh,
                       depth=depth)
  tokens = _val_tokens(config, old_tok, min(config.train.seq_len, 256))
  diff = logit_diff(small, small_params, big, params, tokens)
  log(f"grew {from_workdir} (step {step}, {small.name}: {models.count_params(small_params):,} "
      f"params) into {big.name} ({models.count_params(params):,} params), noise {noise}, "
      f"depth {depth}; max logit difference on {tokens.size} validation tokens: {diff:.2e}"
      + (f" (inexact: {'; '.join(reasons)})" if reasons else "")
      + f"; optimizer {optimizer}, training from step {start}")
  state = ts_lib.create(s, init_from=params)
  if optimizer == "carry":
    opt = grow_opt_state(small_opt, small, big, state.opt_state, depth=depth,
                         vocab_pieces=pieces, allow_inexact=allow_inexact,
                         new_moments=new_moments)
    opt = jax.tree.map(lambda x: jnp.asarray(start, x.dtype) if getattr(x, "shape", None) == ()
                       and jnp.issubdtype(x.dtype, jnp.integer) else x, opt)   # counts
    state = state.replace(opt_state=jax.device_put(opt, s.state_sharding.opt_state))
  state = state.replace(step=jax.device_put(jnp.int32(start), s.state_sharding.step))
  same_stream = (tok.get_vocab_size() == old_tok.get_vocab_size()
                 and (config.train.batch_size, config.train.seq_len)
                 == (old_cfg.train.batch_size, old_cfg.train.seq_len)
                 and config.data == old_cfg.data.replace(tokenizer=config.data.tokenizer))
  ds = data_lib.build(config, tok)
  tmp = os.path.abspath(workdir).rstrip("/") + ".growing"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  tokenizer_lib.save_tokenizer(tok, os.path.join(tmp, "tokenizer.json"))
  ckpt_lib.save_run_config(tmp, config)
  mngr = ckpt_lib.make_manager(tmp, keep=config.checkpoint.keep, async_save=False)
  ckpt_lib.save(mngr, start, state.params, state.opt_state, state.rng,
                data_state if same_stream else ds.train_iter().get_state(),
                extra={"best_val": None, "bad_evals": 0, "best_step": None,
                       "first_loss": None, "grown_from": os.path.abspath(from_workdir),
                       "grown_from_step": int(step), "grow_logit_diff": diff},
                carry=state.carry)
  ckpt_lib.finish(mngr)
  if os.path.isdir(workdir):
    os.rmdir(workdir)
  os.replace(tmp, workdir)
  return diff
