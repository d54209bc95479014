"""A grown run as a ready-to-train workdir: the old run's checkpoint grown, its
tokenizer extended so old ids keep their meaning, the config, the step-0 checkpoint.

    grow_workdir("runs/tiny", mini_config, "runs/mini", noise=0.05)
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.data import pipeline as data_lib
from mmrec_jax.data import sources
from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.errors import UsageError
from mmrec_jax.growth.expander import check_growable, grow_params, logit_diff
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
  config = config_lib.typed(config)
  old_cfg = ckpt_lib.load_run_config(from_workdir, flag="--from_workdir")
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
