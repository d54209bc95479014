"""`python -m mmrec_jax.plan`: memory and time per step of a config on a device kind,
from a compile of a few layers extrapolated per layer, and advice when it does not fit."""
import os
import re
import subprocess
import sys

import pytest

from tests.support import OVERRIDES, REPO, TINY, make_config


@pytest.mark.slow
def test_plan_command_small_model():
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items() if k.startswith("model.")]
  proc = subprocess.run(
      [sys.executable, "-m", "mmrec_jax.plan", f"--config={TINY}", "--devices=2",
       "--mesh=data:1,fsdp:2,tensor:1", "--batch_size=4", "--seq_len=32",
       "--device_kind=v5p,H100", "--mfu=0.5", *args, "--config.model.n_layers=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=REPO))
  out = proc.stdout
  assert proc.returncode == 0, (out + proc.stderr)[-3000:]
  assert "2 x v5p (95 GB, 459 TFLOP/s bf16); mesh data 1, fsdp 2, tensor 1" in out
  assert "2 x H100 (80 GB, 989 TFLOP/s bf16)" in out   # both kinds from one compile
  assert "memory per device:" in out and ": fits" in out
  m = re.search(r"from flops_per_token .*? does ([\d.e+]+) \(([\d.]+)x", out)
  assert m and 0.8 < float(m.group(2)) < 3.0, out
  m = re.search(r"at 50% MFU: ([\d.]+) s per step, ([\d,]+) tokens/s", out)
  assert m and int(m.group(2).replace(",", "")) > 0


def test_plan_extrapolates_per_layer(monkeypatch, corpus):
  from mmrec_jax import plan  # pylint: disable=import-outside-toplevel
  seen = []

  def fake_compile(config, devices):
    k = config.model.n_layers
    seen.append((k, config.model.scan_layers, len(devices)))
    return {"params": 0, "opt_state": 0, "batch": 100, "temp": 1000 + 10 * k, "code": 1,
            "flops": 5.0 + 2.0 * k, "compile_s": 1.0}
  monkeypatch.setattr(plan, "compile_step", fake_compile)
  c = make_config(corpus, **{"model.n_layers": 6, "mesh.data": 1, "mesh.fsdp": 4,
                             "train.batch_size": 8})
  p = plan.plan(c, 4, "v5p", 0.5, n_layers=2, log=lambda *a: None)
  assert seen == [(2, False, 4), (3, False, 4)]
  assert p["activations"] == 1000 + 10 * 6 and p["compiled_flops"] == (5.0 + 2.0 * 6) * 4
  assert p["extrapolated"] and not p["lower_bound"]
  assert p["params"] > 0 and 0 <= p["opt_state"] - 2 * p["params"] < 100   # Adam: 2 moments
  tokens = c.train.batch_size * c.train.seq_len
  assert p["step_s"] == pytest.approx(p["model_flops"] / (4 * 459e12 * 0.5))
  assert p["tokens_per_s"] == pytest.approx(tokens / p["step_s"])
  h = plan.on_device(p, "H100")
  assert h["hbm"] == 80e9 and h["step_s"] == pytest.approx(p["step_s"] * 459 / 989)


def test_plan_mesh_flag_and_advice():
  from mmrec_jax import plan  # pylint: disable=import-outside-toplevel
  assert plan.parse_mesh("data:1,fsdp:-1,tensor:2,dcn_data:2") == {
      "data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2}
  with pytest.raises(plan.UsageError, match="AXIS:SIZE"):
    plan.parse_mesh("dp:8")
  p = {"hbm": 16e9, "params": 6e9, "opt_state": 12e9, "batch": 1e6, "code": 1e6,
       "activations": 30e9, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "remat": "dots",
       "grad_accum": 1}
  advice = " ".join(plan.suggestions(p, None))
  assert "at least" in advice and "--mesh=data:1,fsdp:-1" in advice
  assert "--config.model.remat=full" in advice
  p.update(params=1e9, opt_state=2e9, rows_per_device=8)
  assert "--config.train.grad_accum=4" in " ".join(plan.suggestions(p, None))
  p.update(rows_per_device=1)
  advice = " ".join(plan.suggestions(p, None))
  assert "lower --seq_len" in advice and "--mesh=data:1,fsdp:2,tensor:4" in advice
