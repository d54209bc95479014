"""Data safety and one-line errors: the export guard, checkpoint fallback, the workdir
lock, CLI flag errors, `tokenizer --extend` errors and Ctrl-C in `generate`."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import errors
from mmrec_jax import export as export_lib
from mmrec_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
  env.pop("XLA_FLAGS", None)   # subprocesses: one CPU device
  return env


def _popen(args, **kw):
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _one_error_line(stderr):
  lines = stderr.strip().splitlines()
  return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


def _fake_workdir(path):
  os.makedirs(os.path.join(path, "checkpoints", "4"))
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "checkpoints/4/x"):
    with open(os.path.join(path, name), "w") as f:
      f.write("{}")
  return str(path)


# ----------------------------------------------------------------------------- export guard


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


# ----------------------------------------------------------------------------- checkpoints


def _abstract():
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=sh),
            "b": jax.ShapeDtypeStruct((8,), np.float32, sharding=sh)}
  opt = {"count": jax.ShapeDtypeStruct((), np.int32, sharding=sh)}
  return params, opt, jax.ShapeDtypeStruct((2,), np.uint32, sharding=sh)


def _checkpoints(wd, steps=(1, 2, 3)):
  """Orbax checkpoints of small random params at `steps`; returns {step: params}."""
  mngr = ckpt_lib.make_manager(wd, keep=len(steps), async_save=False)
  rng = jax.random.key_data(jax.random.key(0))
  saved = {}
  for s in steps:
    r = np.random.default_rng(s)
    saved[s] = {"w": r.standard_normal((64, 64)).astype(np.float32),
                "b": np.arange(8, dtype=np.float32) + s}
    ckpt_lib.save(mngr, s, saved[s], {"count": np.asarray(s, np.int32)}, rng, {"pos": s})
  mngr.wait_until_finished()
  mngr.close()
  return saved


def _corrupt(wd, step, how):
  item = os.path.join(wd, "checkpoints", str(step), "params")
  if how == "missing":
    shutil.rmtree(item)
    return
  data = max((f for f in glob.glob(f"{item}/**/d/*", recursive=True) if os.path.isfile(f)),
             key=os.path.getsize)
  if how == "truncated":
    os.truncate(data, os.path.getsize(data) // 2)
  else:   # bit flips where zstd notices (its frame header; see the report on silent flips)
    b = bytearray(open(data, "rb").read())
    b[:8] = bytes(x ^ 0xFF for x in b[:8])
    open(data, "wb").write(bytes(b))


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_resume_falls_back_past_a_bad_latest_checkpoint(tmp_path, how):
  wd = str(tmp_path / "run")
  saved = _checkpoints(wd)
  _corrupt(wd, 3, how)
  mngr = ckpt_lib.make_manager(wd, keep=3, async_save=False)
  try:
    params, opt, _, data_state, meta, step, skipped = ckpt_lib.restore_newest_good(
        mngr, *_abstract())
  finally:
    mngr.close()
  assert step == 2 and meta["step"] == 2 and data_state == {"pos": 2}
  assert int(opt["count"]) == 2
  for k in saved[2]:
    np.testing.assert_array_equal(np.asarray(params[k]), saved[2][k])
  assert [s for s, _ in skipped] == [3] and "\n" not in skipped[0][1], skipped
  assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))    # left for inspection
  with pytest.raises(errors.LoadError) as e:                       # inference: one line
    ckpt_lib.restore_params(wd, "latest")
  msg = str(e.value)
  assert "\n" not in msg and "step 3" in msg and "unreadable" in msg, msg
  assert "readable steps: 1, 2" in msg and "--checkpoint=2" in msg, msg
  params, step = ckpt_lib.restore_params(wd, 2)
  assert step == 2
  np.testing.assert_array_equal(np.asarray(params["w"]), saved[2]["w"])


def test_resume_with_no_readable_checkpoint_names_what_was_tried(tmp_path):
  wd = str(tmp_path / "run")
  _checkpoints(wd, steps=(1, 2))
  _corrupt(wd, 1, "missing")
  _corrupt(wd, 2, "truncated")
  mngr = ckpt_lib.make_manager(wd, keep=2, async_save=False)
  try:
    with pytest.raises(errors.TrainError, match=r"tried step 2: .*step 1: ") as e:
      ckpt_lib.restore_newest_good(mngr, *_abstract())
  finally:
    mngr.close()
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- workdir lock

_LOCKER = ("import sys, time; from mmrec_jax import workdir, errors\n"
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


# ----------------------------------------------------------------------------- CLI errors


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


def test_help_exits_zero():
  procs = [_popen(["-m", f"mmrec_jax.{m}", "--help"])
           for m in ("train", "generate", "export", "tokenizer")]
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in err, (p.args, err)
    assert "--workdir" in out or "--config" in out, out


def test_extend_with_a_larger_tokenizer_names_the_flag(tmp_path):
  from mmrec_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok = tok_lib._train_up_to(["def main return value " * 50], 300)
  n = tok.get_vocab_size()
  path = str(tmp_path / "tok.json")
  tok_lib.save_tokenizer(tok, path)
  with pytest.raises(errors.UsageError, match=rf"--extend=.* has {n} tokens, more than"):
    tok_lib.load_extend(path, n - 10)
  assert tok_lib.load_extend(path, n + 50).get_vocab_size() == n


def test_slurm_launcher_requeues_on_exit_143():
  path = os.path.join(REPO, "launch", "slurm_gpu.sh")
  subprocess.run(["bash", "-n", path], check=True)
  text = open(path).read()
  assert "status -eq 143" in text and "scontrol requeue" in text and "grep" not in text


# ----------------------------------------------------------------------------- Ctrl-C in generate

WORDS = "def main return for while class import self print value list dict".split()


@pytest.fixture(scope="module")
def gen_workdir(tmp_path_factory):
  """A tiny run directory (config.json, tokenizer.json, one checkpoint) for generate."""
  from mmrec_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mmrec_jax import data  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("gen")
  rnd = random.Random(0)
  (root / "corpus.txt").write_text("\n\n".join(
      " ".join(rnd.choice(WORDS) for _ in range(60)) for _ in range(30)) + "\n")
  c = config_lib.load_config_file(TINY)
  c.model.update(vocab_size=300, d_model=32, n_layers=2, n_heads=2, chunk_size=8,
                 mem_slots=2, mem_levels=2)
  c.train.seq_len = 32
  c.data.path = str(root / "corpus.txt")
  c.data.val_fraction = 0.2
  wd = str(root / "run")
  data.get_tokenizer(c, wd)
  params = _init_params(c.model)
  mngr = ckpt_lib.make_manager(wd, keep=1, async_save=False)
  ckpt_lib.save(mngr, 1, params, {"count": np.zeros((), np.int32)},
                jax.random.key_data(jax.random.key(0)), {}, val_loss=1.0)
  mngr.wait_until_finished()
  mngr.close()
  ckpt_lib.save_run_config(wd, c)
  return wd


def _init_params(model_cfg):
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  try:
    from mmrec_jax import models  # pylint: disable=g-import-not-at-top
    model = models.build(model_cfg)
    return nn.unbox(models.init_params(model, jax.random.key(0)))
  except ImportError:
    from mmrec_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    model = model_lib.MMRec(model_lib.ModelConfig.from_config(model_cfg))
    return nn.unbox(model_lib.init_params(model, jax.random.key(0)))


@pytest.mark.slow
def test_generate_stops_between_streamed_tokens_keeping_the_text(gen_workdir):
  import io  # pylint: disable=g-import-not-at-top
  from mmrec_jax import cli  # pylint: disable=g-import-not-at-top
  from mmrec_jax import generate as gen_lib  # pylint: disable=g-import-not-at-top
  from mmrec_jax import loading  # pylint: disable=g-import-not-at-top
  model, variables, tok, _ = loading.load(gen_workdir, "latest")
  stop = cli.StopRequest()

  class Stream(io.StringIO):
    def write(self, s):
      stop.requested = self.tell() > 0 or bool(s)   # Ctrl-C after the first token
      return super().write(s)

  out = Stream()
  with pytest.raises(errors.Interrupted) as e:
    gen_lib.generate(model, variables, tok, ["def main("], 50, 1.0, seed=0, stream=out,
                     stop=stop)
  assert e.value.exit_code == 130
  assert out.getvalue().endswith("\n") and len(out.getvalue()) > 1


@pytest.mark.slow
def test_generate_ctrl_c_while_compiling_exits_130_cleanly(gen_workdir):
  p = subprocess.Popen(
      [sys.executable, "-m", "mmrec_jax.generate", f"--workdir={gen_workdir}",
       "--prompt=def main(", "--max_new_tokens=64", "--checkpoint=latest"],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  got = b""
  deadline = time.time() + 120
  while not got.startswith(b"def main(") and time.time() < deadline:
    got += os.read(p.stdout.fileno(), 64)   # the prompt is printed just before compiling
    if p.poll() is not None and not got:
      break
  p.send_signal(signal.SIGINT)
  try:
    rest, err = p.communicate(timeout=120)
  finally:
    p.kill()
  out, err = (got + rest).decode(), err.decode()
  assert p.returncode == 130, (p.returncode, out, err)
  assert out.startswith("def main(") and "Traceback" not in err, err
  assert "interrupted" in err
