"""`python -m mmrec_jax.train`: a hard kill or SIGTERM then a rerun resume exactly,
the README command, one-line errors and their exit codes, one run per workdir."""
import signal

import pytest

from mmrec_jax.io import checkpoint as ckpt_lib
from tests.support import (TINY, assert_trees_close, cli_args, launch, train_steps_logged,
                           wait_for_step)


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
  """One line naming the field, exit 2 (in process: tests/training/test_resume.py)."""
  workdir, _, _ = reference
  proc = launch(cli_args(corpus, workdir, **{"model.n_layers": 3}))
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 2, out[-3000:]
  err = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "model.n_layers" in err[0], out[-3000:]


@pytest.mark.slow
def test_readme_command(corpus, tmp_path):
  """`python -m mmrec_jax.train --config=configs/tiny.py` (default workdir runs/tiny)."""
  args = [f"--config={TINY}", f"--config.data.path={corpus}", "--config.model.vocab_size=300",
          "--config.train.steps=3", "--config.train.seq_len=64", "--config.train.eval_every=3",
          "--config.train.eval_batches=1", "--config.train.samples=2",
          "--config.train.sample_tokens=4", "--config.data.val_fraction=0.1"]
  proc = launch(args, cwd=str(tmp_path))
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "finished at step 3" in out and out.count("--- sample") == 2, out[-3000:]
  assert "\\n" not in out.split("--- sample 1", 1)[1]   # samples print as text, not reprs
  _, step = ckpt_lib.restore_params(str(tmp_path / "runs" / "tiny"), "latest")
  assert step == 3


@pytest.mark.slow
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
