"""`python -m mmrec_jax.evaluate --json`: the library's metrics, as one JSON line."""
import json

import numpy as np
import pytest

from mmrec_jax.inference import evaluation as eval_lib
from tests.support import run_module as _cli



@pytest.mark.slow
def test_evaluate_cli_json(run_dir, loaded):
  model, variables, tok, config, _ = loaded
  r = _cli("mmrec_jax.evaluate", f"--workdir={run_dir}", "--json", "--batch_size=4")
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(got) == {"loss", "perplexity", "bits_per_byte", "token_accuracy", "tokens"}
  want = eval_lib.evaluate(model, variables, eval_lib.make_batches(
      eval_lib.eval_tokens(config, tok), tok, 32, batch_size=4))
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  assert got["tokens"] == want["tokens"]
