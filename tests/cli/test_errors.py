"""Every command's errors: one `error: ...` line on stderr, never a traceback, exit 2
for bad input (flags, config, overrides, data, a folder to load); `--help` exits 0."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO, TINY
from tests.support import run_module as _cli
from tests.support import one_device_env as _env



def _popen(args, **kw):
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _one_error_line(stderr):
  lines = stderr.strip().splitlines()
  return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr


@pytest.mark.slow
def test_cli_flag_and_config_errors_are_one_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  garbage = tmp_path / "garbage.json"
  garbage.write_text('{"model": 1')
  cases = [  # (args, expected exit code, text in the error line)
      (["-m", "mmrec_jax.train", f"--config={tmp_path}/missing.py"], 2, "not found"),
      (["-m", "mmrec_jax.train", f"--config={bad}"], 2, "syntax error at line 1"),
      (["-m", "mmrec_jax.train", f"--config={TINY}", "--config.train.stepz=3"], 2,
       "unknown config field train.stepz; did you mean train.steps?"),
      (["-m", "mmrec_jax.train", f"--config={TINY}", "--config.train.steps=abc"], 2,
       "train.steps takes an int"),
      (["-m", "mmrec_jax.tokenizer", f"--config={TINY}", "--config.trian.steps=3"], 2,
       "did you mean train.steps?"),
      (["-m", "mmrec_jax.tokenizer", f"--config={TINY}", f"--extend={tmp_path}/nope.json"], 2,
       "--extend="),
      (["-m", "mmrec_jax.tokenizer", f"--config={TINY}", f"--extend={garbage}"], 2,
       "--extend="),
      (["-m", "mmrec_jax.export", "--workdir=x", "--out=y", "stray"], 2, "unexpected argument"),
      (["-m", "mmrec_jax.generate", "--workdir=x", "--prompt=a", "--top_k=z"], 2, "--top_k=z"),
  ]
  procs = []
  for args, _, _ in cases:   # two at a time: the machine has few cores
    procs.append(_popen(args))
    if len(procs) >= 2:
      procs[-2].wait()
  for (args, code, text), p in zip(cases, procs):
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, (args, out, err)
    assert _one_error_line(err) and text in err, (args, err)
    assert "data.tokenizer" not in err


@pytest.mark.slow
def test_help_exits_zero():
  procs = [_popen(["-m", f"mmrec_jax.{m}", "--help"])
           for m in ("train", "generate", "export", "tokenizer")]
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in err, (p.args, err)
    assert "--workdir" in out or "--config" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("args, match", [
    (("mmrec_jax.generate", "--workdir={missing}", "--prompt=a"), "not a directory"),
    (("mmrec_jax.generate", "--workdir={bad}", "--prompt=a"), "incompatible model"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt="), "empty"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--max_new_tokens=0"),
     "max_new_tokens"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--temperature=-1"), "temperature"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--top_p=1.5"), "top_p"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--top_k=-2"), "top_k"),
    (("mmrec_jax.evaluate", "--workdir={wd}", "--data={short}"), "fewer than one window"),
])
def test_bad_input_cli(run_dir, tmp_path, args, match):
  bad = tmp_path / "bad"
  shutil.copytree(run_dir, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["model"]["d_model"] = 64
  (bad / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "short.txt").write_text("tiny text\n")
  fmt = dict(wd=run_dir, bad=bad, missing=tmp_path / "nope", short=tmp_path / "short.txt")
  r = _cli(*[a.format(**fmt) for a in args])
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_reports_bad_override_in_one_line():
  r = subprocess.run([sys.executable, "-m", "mmrec_jax.params", "--config=configs/tiny.py",
                      "--config.model.n_heads=3"], capture_output=True, text=True)
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: model.d_model=128 is not divisible")
