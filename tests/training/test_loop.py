"""The training loop (`training/loop.py` and its hooks): an end-to-end run whose loss
goes down, the same numbers for the same seed, a finished run resumed, a NaN loss
stopping at the last good checkpoint, early stopping."""
import json
import os

import jax
import numpy as np
import pytest

from mmrec_jax import train
from mmrec_jax.errors import TrainError
from mmrec_jax.io import checkpoint as ckpt_lib
from tests.support import assert_trees_close, make_config


def test_end_to_end_loss_goes_down(reference):
  workdir, config, result = reference
  assert result.step == 12 and result.reason == "done"
  losses = [l for _, l in result.train_losses]
  assert len(losses) == 12 and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert [s for s, _ in result.val_losses] == [4, 8, 12]
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  val = [r for r in recs if r["split"] == "val"]
  assert {"loss", "perplexity", "bits_per_byte", "token_accuracy", "tokens"} <= set(val[-1])
  assert val[-1]["bits_per_byte"] > 0 and 0 <= val[-1]["token_accuracy"] <= 1
  params, step = ckpt_lib.restore_params(workdir, "latest")
  assert step == 12
  assert_trees_close(params, result.params, atol=0)
  best_params, best_step = ckpt_lib.restore_params(workdir, "best")
  best_val = min(result.val_losses, key=lambda x: x[1])[0]
  assert best_step == best_val
  assert ckpt_lib.load_run_config(workdir).to_dict() == config.to_dict()
  del best_params


def test_same_seed_same_numbers_and_resume_of_finished_run(reference, tmp_path):
  workdir, config, result = reference
  again = train.run(config, str(tmp_path / "run"), devices=jax.devices()[:1], quiet=True)
  assert again.train_losses == result.train_losses
  # Rerunning a finished workdir resumes at the last step and trains nothing more.
  done = train.run(config, workdir, devices=jax.devices()[:1], quiet=True)
  assert done.step == 12 and done.train_losses == []


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  config = make_config(corpus, **{"train.lr": 1e30, "train.steps": 10,
                                  "checkpoint.every": 1, "train.eval_every": 100})
  with pytest.raises(TrainError, match=r"at step \d+"):
    train.run(config, workdir, devices=jax.devices()[:1], quiet=True)
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  steps = mngr.all_steps()
  mngr.close()
  assert steps and max(steps) < 10
  params, _ = ckpt_lib.restore_params(workdir, "latest")
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_early_stopping(corpus, tmp_path):
  config = make_config(corpus, **{"train.steps": 40, "train.eval_every": 2,
                                  "train.early_stopping_patience": 2,
                                  "train.early_stopping_min_delta": 100.0})
  res = train.run(config, str(tmp_path / "run"), devices=jax.devices()[:1], quiet=True)
  assert res.reason == "early_stop" and res.step == 6
  assert [s for s, _ in res.val_losses] == [2, 4, 6]
  again = train.run(config, str(tmp_path / "run"), devices=jax.devices()[:1], quiet=True)
  assert again.reason == "early_stop" and again.step == 6 and again.train_losses == []
