"""What the benchmarks share (`bench/__init__.py`): an interrupted arm stops the
benchmark, and an arm never scores a run trained otherwise."""
import json

import pytest

from mmrec_jax import bench
from mmrec_jax.bench import arms
from mmrec_jax.errors import Interrupted, UsageError
from mmrec_jax.training import loop


def test_an_interrupted_arm_stops_the_benchmark(monkeypatch):
  """A benchmark whose training run was stopped by a signal exits (130 / 143)
  instead of scoring the half-trained model; a finished run is returned."""
  result = {}
  monkeypatch.setattr(loop, "run", lambda c, w, quiet, **kw: result["r"])
  result["r"] = loop.Result(601, "interrupted", [], [], signal="SIGTERM")
  with pytest.raises(Interrupted, match="interrupted by SIGTERM at step 601") as e:
    bench.train_arm(None, "wd")
  assert e.value.exit_code == 143
  result["r"] = loop.Result(1000, "done", [], [])
  assert bench.train_arm(None, "wd").step == 1000


def test_an_arm_never_reuses_a_run_trained_otherwise(tmp_path):
  """A benchmark folder from before an arm's defaults changed: the arm that keeps
  the old values reuses its run, the arm at the new defaults refuses it (one-line
  error naming the fields), and a field saved before it existed counts at its old
  value."""
  old = arms.load_arm("mmrec_v0")
  saved = old.to_dict()
  del saved["model"]["mem_lr_scale"]          # a config saved before the field existed
  (tmp_path / "config.json").write_text(json.dumps(saved))
  bench.check_same_run(arms.load_arm("mmrec_v0"), str(tmp_path))
  with pytest.raises(UsageError, match="mem_lr_scale, model.mem_out_init differ") as e:
    bench.check_same_run(arms.load_arm("mmrec"), str(tmp_path))
  assert "\n" not in str(e.value)
  nomem = arms.load_arm("mmrec_nomem").to_dict()
  nomem["model"].update(mem_out_init=1.0, mem_lr_scale=1.0)   # no memory: they mean nothing
  (tmp_path / "config.json").write_text(json.dumps(nomem))
  bench.check_same_run(arms.load_arm("mmrec_nomem"), str(tmp_path))
  seeded = arms.load_arm("mmrec_nomem", overrides={"train.seed": 7})
  with pytest.raises(UsageError, match="train.seed"):
    bench.check_same_run(seeded, str(tmp_path))
