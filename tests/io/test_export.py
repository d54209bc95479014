"""Export (`io/export.py`): the folder loads back to the same function and reads
without JAX; it never replaces anything but a previous export."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import errors
from mmrec_jax.io import export as export_lib
from mmrec_jax.io import loading as load_lib


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


def _fake_workdir(path):
  os.makedirs(os.path.join(path, "checkpoints", "4"))
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "checkpoints/4/x"):
    with open(os.path.join(path, name), "w") as f:
      f.write("{}")
  return str(path)


def test_export_refuses_a_workdirs_parent_and_deletes_nothing(tmp_path):
  wd = _fake_workdir(tmp_path / "runs" / "tiny")
  other = _fake_workdir(tmp_path / "other")
  before = _files(tmp_path)
  for out in (tmp_path / "runs", tmp_path, tmp_path / "runs" / "tiny" / "checkpoints"):
    with pytest.raises(errors.UsageError, match="refusing to replace") as e:
      export_lib.export(wd, str(out), force=True)
    assert "\n" not in str(e.value)
  with pytest.raises(errors.UsageError) as e:   # without --force: no "pass --force" advice
    export_lib.export(wd, other)
  assert "training workdir" in str(e.value) and "pass --force" not in str(e.value)
  assert _files(tmp_path) == before


@pytest.mark.slow
def test_export_round_trip(run_dir, loaded, tmp_path):
  model, variables, _, _, _ = loaded
  out = str(tmp_path / "exported")
  export_lib.export(run_dir, out, "best")
  model2, v2, tok2, c2 = load_lib.load(out)
  assert c2.loaded_step == 1 and tok2.get_vocab_size() == 300
  x = jnp.array([[0, 5, 9, 42, 7, 0, 3]])
  reset = x == 0
  np.testing.assert_array_equal(model.apply(variables, x, reset=reset)[0],
                                model2.apply(v2, x, reset=reset)[0])
  with pytest.raises(load_lib.LoadError, match="--force"):
    export_lib.export(run_dir, out, "latest")
  export_lib.export(run_dir, out, "latest", force=True)
  assert load_lib.load(out)[3].loaded_step == 2
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no temp dirs left
  code = ("import json, sys; from safetensors.numpy import load_file; "
          f"w = load_file({out + '/model.safetensors'!r}); "
          f"c = json.load(open({out + '/config.json'!r})); "
          "assert w['embed'].shape == (c['model']['vocab_size'], c['model']['d_model']); "
          "assert c['tokenizer']['eod_id'] == 0 and 'jax' not in sys.modules; print(len(w))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert int(r.stdout) == len(load_lib.flatten(v2["params"]))
