"""The command lines' answers to bad input: one `error:` line naming the flag the user
passed, exit code 2, no traceback."""
import subprocess
import sys

import pytest

from tests import support


def _run(*args, stdin=None):
  r = subprocess.run([sys.executable, "-m", *args], capture_output=True, input=stdin,
                     env=support.one_device_env(), cwd=support.REPO, timeout=300)
  return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


CASES = [
    (("mmrec_jax.train",), "--config is required; pass e.g. --config=tiny"),
    (("mmrec_jax.params", "--config=tiny", "--depth=-3"), "--depth=-3 must be >= 1"),
    (("mmrec_jax.grow", "--from_workdir=/nonexistent/run", "--config=mini",
      "--workdir=/nonexistent/out"), "--from_workdir=/nonexistent/run is not a directory"),
    (("mmrec_jax.train", "--config=nonexistent_size"), "shipped config"),
    (("mmrec_jax.plan", "--config=tiny", "--devices=2", "--mesh=data:3,fsdp:1,tensor:1"),
     "pass e.g. --mesh=data:-1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", CASES)
def test_bad_input_is_one_line_naming_the_flag(args, message):
  code, out, err = _run(*args)
  assert code == 2, err
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


@pytest.mark.slow
def test_evaluate_refuses_a_length_train_would_refuse(run_dir):
  code, _, err = _run("mmrec_jax.evaluate", f"--workdir={run_dir}", "--seq_len=5000")
  assert code == 2 and "--seq_len=5000 exceeds the model's max_seq_len" in err, err


@pytest.mark.slow
def test_evaluate_names_its_data_flag(run_dir):
  code, _, err = _run("mmrec_jax.evaluate", f"--workdir={run_dir}", "--data=/nonexistent/x.txt")
  assert code == 2 and "check --data" in err and "data.path" not in err, err


@pytest.mark.slow
def test_invalid_utf8_prompt_bytes_are_replaced_not_a_traceback(run_dir):
  code, out, err = _run("mmrec_jax.generate", f"--workdir={run_dir}", "--prompt=-",
                        "--max_new_tokens=2", "--temperature=0", stdin=b"\xff\xfe\x80abc")
  assert code == 0, err
  assert "Traceback" not in err and "not valid UTF-8" in err
  assert out.startswith("\ufffd")


def test_prompts_from_arguments_with_bad_bytes_become_text():
  from mmrec_jax import generate  # pylint: disable=import-outside-toplevel
  bad = b"\xff\xfeabc".decode("utf-8", "surrogateescape")   # how argv carries such bytes
  assert generate.read_prompts([bad]) == ["\ufffd\ufffdabc"]
