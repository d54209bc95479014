"""The end of a run (`training/report.py`): summary.json, epochs, and metrics.jsonl
keeping each step once (`training/metrics.py`)."""
import json
import os

import jax
import numpy as np

from mmrec_jax import train
from mmrec_jax.io.checkpoint import load_run_config
from mmrec_jax.training import metrics as metrics_lib
from tests.support import make_config


def test_summary_epochs_and_metrics_once_per_step(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = make_config(corpus, **{"train.epochs": 0.05, "train.eval_every": 100})
  res = train.run(cfg, workdir, devices=jax.devices()[:1], quiet=True)
  s = json.load(open(os.path.join(workdir, "summary.json")))
  # the run's config (config.json) holds the steps its epochs make
  assert s == res.summary and s["steps"] == res.step == load_run_config(workdir).train.steps
  assert s["steps"] == int(np.ceil(0.05 * s["steps_per_epoch"]))
  assert s["first_loss"] > s["final_loss"] and s["checkpoints"][-1] == res.step
  assert list(s["epoch_mean_loss"]) == ["1"]
  # A resumed run replays steps after its checkpoint: metrics.jsonl keeps each step once.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": res.step + 1, "split": "train", "loss": 9.0}) + "\n")
  w = metrics_lib.Writer(workdir, resume_step=res.step)
  w.write(res.step + 1, "train", {"loss": 1.0})
  w.close()
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in recs if r["split"] == "train"]
  assert len(steps) == len(set(steps)) and recs[-1]["loss"] == 1.0
