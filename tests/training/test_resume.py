"""Resuming a run (`training/resume.py`): another model's shapes refused, how the
model runs may change, a field the run predates keeps the value it trained with, a
truncated checkpoint skipped, a carried state resumed exactly."""
import contextlib
import io
import json
import os
import random
import shutil

import jax
import numpy as np
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax import train
from mmrec_jax.errors import ConfigError
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.io import loading
from mmrec_jax.training import resume
from tests.support import assert_trees_close, carry_config, make_config


def test_another_models_shapes_are_refused_and_how_it_runs_may_change(reference, corpus):
  workdir, _, _ = reference
  other = make_config(corpus, **{"model.d_model": 48})
  with pytest.raises(config_lib.ConfigError, match=r"model\.d_model.*--workdir"):
    train.run(other, workdir, devices=jax.devices()[:1], quiet=True)
  # How the model runs (precision, remat) may change on resume; its shape may not.
  notes = []
  resume.check_resumable(workdir, make_config(corpus, **{
      "model.dtype": "bfloat16", "model.remat": "full", "model.scan_layers": True,
      "model.max_seq_len": 4096}), notes.append)
  assert len(notes) == 1 and "model.scan_layers" in notes[0] and "model.max_seq_len" in notes[0]
  # ...so resuming with the other layer loop is allowed (the shapes are the same).
  notes = []
  resume.check_resumable(workdir, make_config(corpus, **{"model.scan_layers": True}),
                         notes.append)
  assert notes and "scan_layers" in notes[0]


def test_a_run_saved_before_a_field_existed_resumes_as_it_trained(reference, tmp_path):
  """model.mem_lr_scale came with a new default (0.1; 1 before it existed): a run
  saved without the field resumes at 1 unless this command sets it, and says so."""
  workdir, _, _ = reference

  def old_run(name):
    d = str(tmp_path / name)
    shutil.copytree(workdir, d, ignore=shutil.ignore_patterns(".lock*"))
    path = os.path.join(d, ckpt_lib.CONFIG_FILE)
    saved = json.load(open(path))
    del saved["model"]["mem_lr_scale"]
    json.dump(saved, open(path, "w"))
    return d

  d = old_run("kept")
  assert ckpt_lib.load_run_config(d).model.mem_lr_scale == 1.0   # read as it ran
  assert loading.read_config(d).model.mem_lr_scale == 1.0        # so do inference, export
  config, notes = reference[1], []
  assert config.model.mem_lr_scale == 0.1                       # today's default
  config = resume.keep_saved_fields(d, config, (), notes.append)
  assert config.model.mem_lr_scale == 1.0
  assert len(notes) == 1 and "model.mem_lr_scale" in notes[0] and "1.0" in notes[0]
  # Through a resume: the rewritten config.json records the value the run kept.
  config = reference[1]
  done = train.run(config, d, devices=jax.devices()[:1], quiet=True)
  assert done.step == 12
  assert json.load(open(os.path.join(d, ckpt_lib.CONFIG_FILE)))["model"]["mem_lr_scale"] == 1.0
  # This command sets the field: its value wins.
  d = old_run("set")
  config = reference[1]
  train.run(config, d, devices=jax.devices()[:1], quiet=True, overrides={"model.mem_lr_scale"})
  assert json.load(open(os.path.join(d, ckpt_lib.CONFIG_FILE)))["model"]["mem_lr_scale"] == 0.1


def test_resume_falls_back_past_a_truncated_latest_checkpoint(reference, tmp_path):
  """Bitwise equal to an uninterrupted run; the bad checkpoint is kept for inspection."""
  workdir, config, result = reference
  b = str(tmp_path / "b")
  shutil.copytree(workdir, b, ignore=shutil.ignore_patterns(".lock"))
  bad = os.path.join(b, "checkpoints", "12")
  for root, _, files in os.walk(os.path.join(bad, "params")):
    for f in files:
      path = os.path.join(root, f)
      if os.path.getsize(path) > 64 and "metadata" not in f:
        with open(path, "r+b") as fh:
          fh.truncate(os.path.getsize(path) // 2)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rb = train.run(config, b, devices=jax.devices()[:1])
  text = out.getvalue()
  assert "checkpoint step 12 is unreadable" in text and "resumed from" in text, text[-2000:]
  assert rb.step == 12 and len(rb.train_losses) == 4    # steps 9..12 redone from step 8
  assert_trees_close(rb.params, result.params, atol=0)
  assert os.path.isdir(bad + ".unreadable")
  params, step = ckpt_lib.restore_params(b, "latest")
  assert step == 12
  assert_trees_close(params, result.params, atol=0)


@pytest.fixture(scope="module")
def carry_corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("carry_corpus")
  words = "the quick brown fox jumps over a lazy dog while birds sing in tall trees".split()
  rnd = random.Random(0)
  for i in range(20):
    (d / f"doc{i}.txt").write_text(" ".join(rnd.choice(words) for _ in range(300)) + "\n")
  return str(d)


@pytest.mark.slow
def test_resume_with_a_carried_state_equals_uninterrupted(carry_corpus, tmp_path):
  const = {"train.min_lr_ratio": 1.0}   # the schedule does not depend on train.steps
  one = train.run(carry_config(carry_corpus, **const), str(tmp_path / "a"), jax.devices()[:1],
                  quiet=True)
  b = str(tmp_path / "b")
  train.run(carry_config(carry_corpus, **const, **{"train.steps": 3}), b, jax.devices()[:1], quiet=True)
  two = train.run(carry_config(carry_corpus, **const), b, jax.devices()[:1], quiet=True)
  assert two.step == 6 and [l for s, l in two.train_losses] == [l for s, l in one.train_losses
                                                               if s > 3]
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # the carried state was saved with the step, and a run without it is refused
  mngr = ckpt_lib.make_manager(b, read_only=True)
  assert "carry" in mngr.item_metadata(6)["train"]
  with pytest.raises(ConfigError, match="train.carry_state=True"):
    train.run(carry_config(carry_corpus, **const, **{"train.carry_state": False, "train.steps": 9}), b,
              jax.devices()[:1], quiet=True)
