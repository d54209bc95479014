"""Workdir safety (`io/workdir.py`): one guard for every deletion, one run per
workdir (the lock names its holder and never outlives it), atomic writes."""
import json
import os
import subprocess
import sys

import pytest

from mmrec_jax import errors
from mmrec_jax.io import workdir as workdir_lib
from tests.support import one_device_env as _env


def test_guard_replace_allows_only_a_previous_export(tmp_path, monkeypatch):
  guard = workdir_lib.guard_replace
  guard(tmp_path / "new")                              # missing: fine
  prev = tmp_path / "prev"
  prev.mkdir()
  for name in ("model.safetensors", "config.json", "tokenizer.json"):
    (prev / name).write_text("x")
  guard(prev)                                          # a previous export: fine
  (prev / "notes.txt").write_text("mine")
  with pytest.raises(errors.UsageError, match="notes.txt"):
    guard(prev)
  deep = tmp_path / "a" / "b" / "c"
  deep.mkdir(parents=True)
  (deep / "config.json").write_text("{}")
  (deep / ".lock").write_text("")
  with pytest.raises(errors.UsageError, match="contains the training workdir"):
    guard(tmp_path / "a")
  (deep / "sub").mkdir()
  with pytest.raises(errors.UsageError, match="inside the training workdir"):
    guard(deep / "sub")
  monkeypatch.chdir(tmp_path / "a")
  with pytest.raises(errors.UsageError, match="current directory"):
    guard(tmp_path / "a")
  with pytest.raises(errors.UsageError, match="home directory"):
    guard(os.path.expanduser("~"))
  with pytest.raises(errors.UsageError, match="it is /"):
    guard("/")
  assert (deep / "config.json").exists()


_LOCKER = ("import sys, time; from mmrec_jax import errors; from mmrec_jax.io import workdir\n"
           "try:\n"
           "  with workdir.lock(sys.argv[1]):\n"
           "    print('locked', flush=True)\n"
           "    time.sleep(float(sys.argv[2]))\n"
           "except errors.WorkdirBusyError as e:\n"
           "  print(e); sys.exit(e.exit_code)\n")


def test_second_lock_is_refused_naming_the_holder(tmp_path):
  wd = str(tmp_path / "run")
  with workdir_lib.lock(wd):
    r = subprocess.run([sys.executable, "-c", _LOCKER, wd, "0"], env=_env(), text=True,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 1, r
    assert f"in use by process {os.getpid()}" in r.stdout and "--workdir" in r.stdout, r.stdout
    with pytest.raises(errors.WorkdirBusyError):   # a second lock in this process too
      with workdir_lib.lock(wd):
        pass
  # A holder that dies (kill -9) never blocks: the kernel drops its flock.
  p = subprocess.Popen([sys.executable, "-c", _LOCKER, wd, "60"], env=_env(), text=True,
                       stdout=subprocess.PIPE)
  try:
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(errors.WorkdirBusyError, match=f"process {p.pid} "):
      with workdir_lib.lock(wd):
        pass
  finally:
    p.kill()
    p.wait()
  with workdir_lib.lock(wd):
    pass
  # A stale file naming a dead process does not block either.
  with open(os.path.join(wd, ".lock"), "w") as f:
    json.dump({"pid": p.pid, "host": "elsewhere", "cmd": "python -m mmrec_jax.train"}, f)
  with workdir_lib.lock(wd):
    holder = json.load(open(os.path.join(wd, ".lock")))
    assert holder["pid"] == os.getpid()


def test_lock_on_a_file_is_a_usage_error(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(errors.UsageError, match="is a file"):
    with workdir_lib.lock(str(tmp_path / "f")):
      pass


def test_atomic_write(tmp_path):
  p = tmp_path / "d" / "s.json"
  workdir_lib.atomic_write_json(p, {"b": 1, "a": [1, 2]})
  assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
  workdir_lib.atomic_write(p, b"raw")
  assert p.read_bytes() == b"raw" and os.listdir(tmp_path / "d") == ["s.json"]
