"""Evaluation (`inference/evaluation.py`): the metrics equal a direct computation;
the loss by position streamed in pieces equals one pass."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax.data import tokenizer as tok_lib
from mmrec_jax.inference import evaluation as eval_lib


def test_evaluate_matches_direct_computation(loaded):
  model, variables, tok, config, _ = loaded
  tokens = eval_lib.eval_tokens(config, tok)
  batches = eval_lib.make_batches(tokens, tok, 32, batch_size=4)
  res = eval_lib.evaluate(model, variables, batches)
  nll, correct, n, n_bytes = 0.0, 0, 0, 0
  toks = np.asarray(tokens, np.int64)
  apply = jax.jit(model.apply)
  for start in range(0, len(toks) - 1, 32):        # windows, each from a fresh state
    w = toks[start:start + 33]
    x, y = w[:-1], w[1:]
    x_1T = np.pad(x, (0, 32 - len(x)), constant_values=1)[None]
    logits, _, _ = apply(variables, jnp.asarray(x_1T, jnp.int32), reset=x_1T == 0)
    lg = np.asarray(logits[0, :len(y)], np.float64)
    lp = lg - lg.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    nll -= lp[np.arange(len(y)), y].sum()
    correct += int((lg.argmax(-1) == y).sum())
    n += len(y)
    n_bytes += sum(len(tok_lib.token_bytes(tok, int(t))) for t in y)
  assert res["tokens"] == n == len(toks) - 1
  np.testing.assert_allclose(res["loss"], nll / n, rtol=1e-5)
  np.testing.assert_allclose(res["perplexity"], np.exp(nll / n), rtol=1e-5)
  np.testing.assert_allclose(res["bits_per_byte"], nll / np.log(2) / n_bytes, rtol=1e-5)
  assert res["token_accuracy"] == correct / n


def test_loss_by_position_streams_like_one_pass(loaded, tmp_path):
  model, variables, tok, config, _ = loaded
  tokens = eval_lib.eval_tokens(config, tok)
  sums, counts = eval_lib.loss_by_position(model, variables, tokens, 0, 1, 16, 4, batch_size=2,
                                           max_docs=3)
  x, y, m = eval_lib.long_windows(tokens, 0, 1, 64, max_docs=3)
  logits, _, _ = jax.jit(model.apply)(variables, jnp.asarray(x), reset=jnp.asarray(x == 0))
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), y[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums, (nll * m).sum(0), rtol=2e-5)
  np.testing.assert_array_equal(counts, m.sum(0))
  assert counts[0] == 3 and counts[-1] >= 1
  rows = eval_lib.bucket_table(sums, counts, 8)
  tsv, png = eval_lib.write_loss_by_position(str(tmp_path), rows, 16)
  assert open(tsv).read().count("\n") == len(rows) + 1 and os.path.getsize(png) > 0
