"""Training job: end-to-end runs, exact resume, signals, NaN, sharding, early stopping, CLI."""
import contextlib
import io
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
from mmrec_jax import config as config_lib
from mmrec_jax import loading
from mmrec_jax import loop
from mmrec_jax import optimizer as opt_lib
from mmrec_jax import sharding as shard_lib
from mmrec_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
WORDS = ("the quick brown fox jumps over a lazy dog while birds sing in tall trees and "
         "every cat sat on the mat then ran away from the rain at night").split()

# Small-model overrides shared by in-process configs and CLI runs.
OVERRIDES = {
    "model.vocab_size": 300, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
    "model.chunk_size": 16, "model.mem_slots": 4, "model.mem_levels": 2,
    "train.seq_len": 32, "train.batch_size": 4, "train.steps": 12, "train.warmup_steps": 2,
    "train.eval_every": 4, "train.eval_batches": 2, "train.log_every": 1, "train.samples": 0,
    "checkpoint.every": 4, "checkpoint.keep": 2, "data.val_fraction": 0.1,
    "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  rnd = random.Random(0)
  for i in range(24):
    lines = (" ".join(rnd.choice(WORDS) for _ in range(12)) + "." for _ in range(50))
    (d / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
  return str(d)


def make_config(corpus, **kw):
  c = config_lib.load_config_file(TINY)
  for k, v in {**OVERRIDES, "data.path": corpus, **kw}.items():
    sec, name = k.split(".")
    c[sec][name] = v
  return config_lib.validate(c)


def cli_args(corpus, workdir=None, **kw):
  args = [f"--config={TINY}"] + ([f"--workdir={workdir}"] if workdir else [])
  return args + [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.path": corpus,
                                                    **kw}.items()]


def one_device_env(**extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
  env.pop("XLA_FLAGS", None)  # subprocesses: a single CPU device (fast)
  return env


def launch(args, cwd=REPO, slow_steps=0.0, **env):
  """The train CLI in a subprocess (one CPU device); `slow_steps` seconds of sleep after
  every step (tests/slow_train.py) give a test time to signal or kill it mid-run."""
  cmd = ([os.path.join(REPO, "tests", "slow_train.py"), str(slow_steps)] if slow_steps
         else ["-m", "mmrec_jax.train"])
  return subprocess.Popen([sys.executable, *cmd, *args], cwd=cwd,
                          env=one_device_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def train_steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    recs = [json.loads(l) for l in f if l.strip()]
  return max([r["step"] for r in recs if r["split"] == "train"], default=0)


def wait_for_step(proc, workdir, step, timeout=180):
  t0 = time.time()
  while train_steps_logged(workdir) < step:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() - t0 < timeout, "run did not reach the step in time"
    time.sleep(0.05)


def assert_trees_close(a, b, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """An uninterrupted 12-step in-process run on one device: (workdir, config, Result)."""
  os.environ["MMREC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "token_cache")
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  config = make_config(corpus)
  result = train.run(config, workdir, devices=jax.devices()[:1], quiet=True)
  return workdir, config, result


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


@pytest.mark.slow
def test_hard_kill_then_rerun_equals_uninterrupted(reference, corpus, tmp_path):
  _, _, result = reference
  workdir = str(tmp_path / "run")
  args = cli_args(corpus, workdir)
  proc = launch(args, slow_steps=0.3)
  wait_for_step(proc, workdir, 6)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert train_steps_logged(workdir) < 12
  proc = launch(args)
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "resumed from" in out
  params, step = ckpt_lib.restore_params(workdir, "latest")
  assert step == 12
  assert_trees_close(params, result.params, atol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_and_prints_resume_command(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  proc = launch(cli_args(corpus, workdir, **{"train.steps": 500}), slow_steps=0.2)
  wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, out[-3000:]   # as a shell reports SIGTERM: not a success
  assert "Traceback" not in out
  assert "Resume with" in out and "python -m mmrec_jax.train" in out
  assert f"--workdir={workdir}" in out
  _, step = ckpt_lib.restore_params(workdir, "latest")
  assert 3 <= step < 500
  assert step == train_steps_logged(workdir)


@pytest.mark.slow
def test_model_config_mismatch_on_resume_is_an_error(reference, corpus):
  workdir, config, _ = reference
  other = make_config(corpus, **{"model.d_model": 48})
  with pytest.raises(config_lib.ConfigError, match=r"model\.d_model.*--workdir"):
    train.run(other, workdir, devices=jax.devices()[:1], quiet=True)
  proc = launch(cli_args(corpus, workdir, **{"model.n_layers": 3}))
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 2, out[-3000:]
  err = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "model.n_layers" in err[0], out[-3000:]
  # How the model runs (precision, remat) may change on resume; its shape may not.
  notes = []
  loop.check_workdir_model(workdir, make_config(corpus, **{
      "model.dtype": "bfloat16", "model.remat": "full", "model.scan_layers": True,
      "model.max_seq_len": 4096}), notes.append)
  assert len(notes) == 1 and "model.scan_layers" in notes[0] and "model.max_seq_len" in notes[0]


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
  config, notes = reference[1].copy_and_resolve_references(), []
  assert config.model.mem_lr_scale == 0.1                       # today's default
  loop.keep_saved_fields(d, config, (), notes.append)
  assert config.model.mem_lr_scale == 1.0
  assert len(notes) == 1 and "model.mem_lr_scale" in notes[0] and "1.0" in notes[0]
  # Through a resume: the rewritten config.json records the value the run kept.
  config = reference[1].copy_and_resolve_references()
  done = train.run(config, d, devices=jax.devices()[:1], quiet=True)
  assert done.step == 12
  assert json.load(open(os.path.join(d, ckpt_lib.CONFIG_FILE)))["model"]["mem_lr_scale"] == 1.0
  # This command sets the field: its value wins.
  d = old_run("set")
  config = reference[1].copy_and_resolve_references()
  train.run(config, d, devices=jax.devices()[:1], quiet=True, overrides={"mem_lr_scale"})
  assert json.load(open(os.path.join(d, ckpt_lib.CONFIG_FILE)))["model"]["mem_lr_scale"] == 0.1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  config = make_config(corpus, **{"train.lr": 1e30, "train.steps": 10,
                                  "checkpoint.every": 1, "train.eval_every": 100})
  with pytest.raises(train.TrainError, match=r"at step \d+"):
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


@pytest.mark.slow
def test_readme_command(corpus, tmp_path):
  """`python -m mmrec_jax.train --config=configs/tiny.py` (default workdir runs/tiny)."""
  args = [f"--config={TINY}", f"--config.data.path={corpus}", "--config.model.vocab_size=300",
          "--config.train.steps=3", "--config.train.seq_len=64", "--config.train.eval_every=3",
          "--config.train.eval_batches=1", "--config.train.samples=2",
          "--config.train.sample_tokens=4", "--config.data.val_fraction=0.1"]
  proc = launch(args, cwd=str(tmp_path), JAX_DISABLE_MOST_OPTIMIZATIONS="0")  # as a user runs it
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "finished at step 3" in out and out.count("--- sample") == 2, out[-3000:]
  assert "\\n" not in out.split("--- sample 1", 1)[1]   # samples print as text, not reprs
  _, step = ckpt_lib.restore_params(str(tmp_path / "runs" / "tiny"), "latest")
  assert step == 3


def test_bad_config_is_one_line_error(tmp_path):
  proc = launch([f"--config={TINY}", "--config.train.batch_size=5",
                 "--config.train.grad_accum=2"], cwd=str(tmp_path))
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 2
  assert out.strip().splitlines()[-1].startswith("error: train.batch_size=5")


@pytest.mark.slow
def test_bad_mesh_and_garbage_workdir_config_are_one_line_errors(corpus, tmp_path):
  bad = tmp_path / "garbage"
  bad.mkdir()
  (bad / "config.json").write_text("\x00\x01 not json")
  for args, want in ((cli_args(corpus, str(tmp_path / "m"), **{"mesh.data": 3}), "mesh"),
                     (cli_args(corpus, str(bad)), "config.json is unreadable")):
    proc = launch(args, cwd=str(tmp_path))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    err = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and want in err[0], out[-2000:]


def test_lr_scales_scale_a_modules_steps_and_keep_the_optimizer_state():
  import ml_collections
  from mmrec_jax.errors import ConfigError
  t = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, steps=10, min_lr_ratio=1.0,
                                     b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0))
  params = {"embed": np.ones((4, 3), np.float32),
            "blocks": {"memory": {"out": {"kernel": np.full((3, 3), 2.0, np.float32)}},
                       "ffn": {"kernel": np.full((3, 3), -1.0, np.float32)}}}
  grads = jax.tree.map(lambda p: np.linspace(-1, 1, p.size, dtype=np.float32).reshape(p.shape),
                       params)
  mask = opt_lib.decay_mask(params)

  def step(spec):
    tx = opt_lib.make(t, mask, opt_lib.lr_scale_tree(params, spec))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    return updates, state

  plain, state_plain = step("")
  half, state_half = step("memory=0.5")
  frozen, _ = step("memory=0,embed=2")
  np.testing.assert_allclose(half["blocks"]["memory"]["out"]["kernel"],
                             0.5 * plain["blocks"]["memory"]["out"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(half["blocks"]["ffn"]["kernel"], plain["blocks"]["ffn"]["kernel"])
  assert not np.asarray(frozen["blocks"]["memory"]["out"]["kernel"]).any()
  np.testing.assert_allclose(frozen["embed"], 2 * plain["embed"], rtol=1e-6)
  # the optimizer state is the same structure and values: a run resumes with or without
  assert (jax.tree_util.tree_structure(state_half)
          == jax.tree_util.tree_structure(state_plain))
  for a, b in zip(jax.tree.leaves(state_half), jax.tree.leaves(state_plain)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="no parameter's path contains"):
    opt_lib.lr_scale_tree(params, "memroy=0.1")
  # the model's own factors (`model.mem_lr_scale`) apply unless train.lr_scales names
  # the same module; all factors 1 is no scaling at all
  from mmrec_jax import models
  cfg = dict(kind="mmrec", vocab_size=16, d_model=8, n_layers=1, n_heads=2)
  assert models.build(dict(cfg, mem_lr_scale=0.5)).lr_scales() == {"memory": 0.5}
  assert models.build(dict(cfg, mem_lr_scale=0.5, mem_levels=0)).lr_scales() == {}
  with pytest.raises(ConfigError, match="mem_lr_scale"):
    models.build(dict(cfg, mem_lr_scale=-1))
  tree = opt_lib.lr_scale_tree(params, "", {"memory": 0.5})
  assert tree["blocks"]["memory"]["out"]["kernel"] == 0.5 and tree["embed"] == 1.0
  assert opt_lib.lr_scale_tree(params, "memory=0.25", {"memory": 0.5})[
      "blocks"]["memory"]["out"]["kernel"] == 0.25
  assert opt_lib.lr_scale_tree(params, "memory=1", {"memory": 0.5}) is None
  assert opt_lib.lr_scale_tree(params, "", {"memory": 1.0}) is None
  for bad in ("memory", "memory=x", "memory=-1", "=0.5"):
    with pytest.raises(ConfigError, match="NAME=FACTOR"):
      opt_lib.parse_lr_scales(bad)


def test_decay_mask_and_shardings():
  from flax import linen as nn
  box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32),
                                                     names)
  tree = {"embed": box((300, 32), ("vocab", "embed")),
          "blocks": {"norm": {"scale": box((2, 32), ("layers", "embed"))},
                     "mlp": {"kernel": box((2, 32, 128), ("layers", "embed", "mlp")),
                             "bias": box((2, 128), ("layers", "mlp"))},
                     "gate_decay": {"w": box((2, 32, 32), ("layers", "embed", "kv"))},
                     "lam": box((2, 32), ("layers", "embed")),
                     "mem": {"kernel": box((2, 30, 30), ("layers", "kv", "kv_out"))}}}
  mask = opt_lib.decay_mask(tree)
  assert mask["embed"] and mask["blocks"]["mlp"]["kernel"]
  assert not mask["blocks"]["norm"]["scale"] and not mask["blocks"]["mlp"]["bias"]
  assert not mask["blocks"]["gate_decay"]["w"] and not mask["blocks"]["lam"]
  mesh = shard_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": -1}, jax.devices()[:1])
  sh = shard_lib.logical_shardings(tree, mesh)
  assert sh["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert sh["blocks"]["mem"]["kernel"].spec == jax.sharding.PartitionSpec(None, "tensor", None)
  if jax.device_count() >= 8:
    mesh8 = shard_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    sh8 = shard_lib.logical_shardings(tree, mesh8)   # 30 is not divisible by... it is (2)
    assert sh8["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    odd = shard_lib.logical_shardings({"x": box((3, 32), ("vocab", "embed"))}, mesh8)
    assert odd["x"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  with pytest.raises(ValueError, match="devices"):
    shard_lib.make_mesh({"data": 3, "fsdp": 1, "tensor": 1}, jax.devices()[:1])



def test_checkpoint_loads_with_scan_layers_either_way(reference, corpus):
  """One parameter layout: a run trained unrolled evaluates scanned, identically."""
  from mmrec_jax import load, models
  workdir, config, _ = reference
  assert not config.model.scan_layers   # tiny trains with the layers unrolled
  model, variables, _, _ = load(workdir, "latest")
  toks = jax.random.randint(jax.random.key(0), (2, 40), 0, config.model.vocab_size)
  ref = model.apply(variables, toks)[0]
  scanned = models.build(dict(config.model.to_dict(), scan_layers=True))
  np.testing.assert_array_equal(np.asarray(scanned.apply(variables, toks)[0]), np.asarray(ref))
  # ...and resuming the run with the other setting is allowed (shapes are the same).
  notes = []
  loop.check_workdir_model(workdir, make_config(corpus, **{"model.scan_layers": True}),
                           notes.append)
  assert notes and "scan_layers" in notes[0]


def test_init_from_starts_a_run_from_given_parameters(reference, corpus, tmp_path):
  from mmrec_jax import train_state
  workdir, config, result = reference
  params, _ = ckpt_lib.restore_params(workdir, "latest")
  s = train_state.setup(config, devices=jax.devices()[:1])
  state = train_state.create(s, init_from=params)
  assert int(state.step) == 0
  assert_trees_close(state.params, result.params, atol=0)
  cont = train.run(make_config(corpus, **{"train.steps": 2, "train.eval_every": 2}),
                   str(tmp_path / "grown"), devices=jax.devices()[:1], quiet=True,
                   init_from=params)
  # Starting from trained parameters, the first loss is far below a fresh init's.
  assert cont.train_losses[0][1] < result.train_losses[0][1] - 0.5
  with pytest.raises(config_lib.ConfigError, match="shape"):
    train_state.create(s, init_from=jax.tree.map(lambda x: x[..., :1], params))


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


@pytest.mark.slow
def test_second_run_in_a_workdir_is_refused_while_the_first_finishes(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  args = cli_args(corpus, workdir, **{"train.steps": 8})
  first = launch(args, slow_steps=0.3)
  wait_for_step(first, workdir, 1)
  second = launch(args)
  out2 = second.communicate(timeout=120)[0]
  assert second.returncode == 1, out2[-2000:]
  err = [l for l in out2.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and f"process {first.pid}" in err[0] and "Traceback" not in out2
  out1 = first.communicate(timeout=240)[0]
  assert first.returncode == 0, out1[-3000:]
  _, step = ckpt_lib.restore_params(workdir, "latest")
  assert step == 8


def test_summary_epochs_and_metrics_once_per_step(corpus, tmp_path):
  from mmrec_jax import metrics as metrics_lib
  workdir = str(tmp_path / "run")
  cfg = make_config(corpus, **{"train.epochs": 0.05, "train.eval_every": 100})
  res = train.run(cfg, workdir, devices=jax.devices()[:1], quiet=True)
  s = json.load(open(os.path.join(workdir, "summary.json")))
  assert s == res.summary and s["steps"] == res.step == cfg.train.steps
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


def test_a_step_with_the_loss_in_chunks_equals_one_piece():
  """train.loss_chunk reaches the train step: the same loss and update as in one piece."""
  from mmrec_jax import bench
  from mmrec_jax import train_state as ts_lib
  out = []
  for chunk in (0, 56):
    c = config_lib.load_config_file(TINY)
    c.model.vocab_size, c.model.d_model, c.model.n_layers = 64, 32, 1
    c.train.batch_size, c.train.seq_len, c.train.loss_chunk = 8, 40, chunk
    config_lib.validate(c)
    s = ts_lib.setup(c)
    state = ts_lib.create(s)
    batch = shard_lib.put_batch(bench.random_batch(np.random.default_rng(0), 8, 40, 64), s.mesh)
    out.append(s.train_step(state, batch))
  (a, ma), (b, mb) = out
  np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
  np.testing.assert_allclose(mb["grad_norm"], ma["grad_norm"], rtol=1e-4)
  assert_trees_close(a.params, b.params, atol=1e-5)
