"""The ladder (`growth/ladder.py`): a run grown into a ready-to-train workdir, trained,
and a ladder of stages that skips finished ones and resumes."""
import json

import jax
import numpy as np
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.growth import ladder
from mmrec_jax.growth import workdir as grow_workdir_lib
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.training import loop
from tests.support import TINY, write_corpus

TOL = 1e-4

RUN = {
    "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2, "model.chunk_size": 8,
    "model.mem_slots": 2, "model.mem_levels": 2, "model.scan_layers": False,
    "train.seq_len": 16, "train.batch_size": 2, "train.steps": 2, "train.warmup_steps": 1,
    "train.eval_every": 2, "train.eval_batches": 1, "train.log_every": 1, "train.samples": 0,
    "checkpoint.every": 2, "data.val_fraction": 0.1, "mesh.data": 1,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("grow_corpus"), docs=16, lines=30)


def run_config(corpus, vocab, **kw):
  return config_lib.load(TINY, {**RUN, "model.vocab_size": vocab, "data.path": corpus, **kw})


@pytest.mark.slow
def test_grow_then_train_and_the_ladder_resumes(corpus, tmp_path):
  """A run grown across vocabularies keeps its function and old token ids; in a
  `carry` ladder the grown stage starts where stage 0 stopped (its step count goes
  on, 2 -> 4, its first step at its peak learning rate: no re-warmup); a finished
  stage is skipped, and a rerun skips both."""
  devices = jax.devices()[:1]
  over = [f"{k}={v}" for k, v in {**RUN, "data.path": corpus}.items()]
  small, big = ladder.stage_configs(
      [TINY] * 2, [2, 2], over, recipe="carry",
      stage_overrides=["0:model.vocab_size=270", "1:model.vocab_size=290",
                       "1:model.d_model=32", "1:model.n_layers=3"])
  dirs = [str(tmp_path / "tiny"), str(tmp_path / "mini")]
  loop.run(small, dirs[0], devices=devices, quiet=True)
  opts = dict(ladder.RECIPES["carry"])
  diff = grow_workdir_lib.grow_workdir(dirs[0], big, dirs[1], noise=0.05, log=lambda *a: None,
                                       devices=devices, **opts)
  assert diff < TOL
  tok = tokenizer_lib.load_tokenizer(str(tmp_path / "mini" / "tokenizer.json"))
  old = tokenizer_lib.load_tokenizer(str(tmp_path / "tiny" / "tokenizer.json"))
  grow_workdir_lib.check_extends(old, tok, "grown")
  with pytest.raises(Exception, match="is not empty"):
    grow_workdir_lib.grow_workdir(dirs[0], big, dirs[1])
  # the ladder: the finished stage is skipped, the grown-but-untrained one trained
  out = ladder.run_ladder([small, big], dirs, log=lambda *a: None, devices=devices, quiet=True,
                          recipe="carry")
  assert [o["skipped"] for o in out] == [True, False]
  assert out[1]["step"] == 4 and out[1]["reason"] == "done"
  with open(tmp_path / "mini" / "metrics.jsonl") as f:
    train = [r for r in map(json.loads, f) if r.get("split") == "train" and "loss" in r]
  assert train and all(np.isfinite([r["loss"] for r in train]))
  assert train[0]["step"] == 3 and train[0]["lr"] == pytest.approx(big.train.lr)
  assert ckpt_lib.restore_params(dirs[1], "latest")[1] == 4
  out = ladder.run_ladder([small, big], dirs, log=lambda *a: None, devices=devices, quiet=True,
                          recipe="carry")
  assert [o["skipped"] for o in out] == [True, True]


def test_carry_recipe_is_one_schedule_over_the_ladder(corpus):
  """`--recipe=carry`: stage i trains to the ladder's step so far, every stage warms
  up like stage 0, and only the last decays (over its own last fifth)."""
  configs = ladder.stage_configs([TINY] * 3, [10, 20, 40], [f"{k}={v}" for k, v in {
      **RUN, "data.path": corpus}.items()], recipe="carry")
  assert [c.train.steps for c in configs] == [10, 30, 70]
  assert {c.train.schedule for c in configs} == {"wsd"}
  assert {c.train.warmup_steps for c in configs} == {configs[0].train.warmup_steps}
  assert [c.train.decay_frac for c in configs[:2]] == [ladder.HOLD_DECAY] * 2
  assert configs[2].train.decay_frac * 70 == pytest.approx(ladder.DECAY * 40)
  assert {(c.train.rewarm_at, c.train.rewarm_steps) for c in configs} == {(0, 0)}
  again = ladder.stage_configs([TINY] * 3, [10, 20, 40], [], recipe="carry", rewarm=0.1)
  # each grown stage warms up again from where it starts, over a tenth of its steps
  assert [(c.train.rewarm_at, c.train.rewarm_steps) for c in again] == [(0, 0), (10, 2),
                                                                       (30, 4)]
  restart = ladder.stage_configs([TINY] * 2, [10, 20], [], recipe="restart")
  assert [c.train.steps for c in restart] == [10, 20]
  with pytest.raises(Exception, match="--recipe=other is unknown"):
    ladder.stage_configs([TINY], [10], [], recipe="other")


def test_one_vocabulary_gives_every_stage_the_last_stages_tokenizer(corpus, tmp_path):
  configs = [run_config(corpus, 270), run_config(corpus, 290, **{"model.d_model": 32})]
  one = ladder.one_vocabulary(configs, str(tmp_path), log=lambda *a: None)
  assert {c.model.vocab_size for c in one} == {290}
  assert {c.data.tokenizer for c in one} == {str(tmp_path / "tokenizer.json")}
  assert tokenizer_lib.load_tokenizer(one[0].data.tokenizer).get_vocab_size() == 290
  assert ladder.one_vocabulary(one, str(tmp_path / "again")) == one   # named: unchanged
