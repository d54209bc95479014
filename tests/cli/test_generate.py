"""`python -m mmrec_jax.generate`: greedy tokens streamed as the decoder makes them;
Ctrl-C between streamed tokens keeps the text, Ctrl-C while compiling exits 130."""
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from mmrec_jax import cli
from mmrec_jax import errors
from mmrec_jax import generate as gen_lib
from mmrec_jax.io import loading
from tests.support import REPO
from tests.support import run_module as _cli
from tests.support import one_device_env as _env



@pytest.mark.slow
def test_generate_cli_streams_greedy(run_dir, loaded):
  _, variables, tok, _, dec = loaded
  r = _cli("mmrec_jax.generate", f"--workdir={run_dir}", "--prompt=-", "--max_new_tokens=12",
           "--temperature=0", stdin="def main(")
  assert r.returncode == 0, r.stderr
  new = dec.generate(variables, [tok.encode("def main(").ids], 12, temperature=0)[0]
  want = "def main(" + gen_lib.decode_bytes(tok, new).decode("utf-8", errors="replace") + "\n"
  assert r.stdout == want


@pytest.mark.slow
def test_generate_stops_between_streamed_tokens_keeping_the_text(run_dir):
  model, variables, tok, _ = loading.load(run_dir, "latest")
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
def test_generate_ctrl_c_while_compiling_exits_130_cleanly(run_dir):
  p = subprocess.Popen(
      [sys.executable, "-m", "mmrec_jax.generate", f"--workdir={run_dir}",
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
