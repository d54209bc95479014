"""The loss and the evaluation metrics, shared by training and `evaluate`.

Metric names everywhere (metrics.jsonl, TensorBoard, `evaluate --json`):
`loss` (nats per target token), `perplexity`, `bits_per_byte`,
`token_accuracy`, `tokens` (how many target tokens the figures are over).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils


BATCH_KEYS = ("inputs", "targets", "reset", "mask")
MAX_LOG_PERPLEXITY = 80.0   # perplexity is reported as exp(min(loss, 80))


def token_nll(logits_BTV, targets_BT):
  """(nll float32 [B, T], correct bool [B, T]) per target; no shift (targets are given)."""
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT)
  return nll_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


def cross_entropy(logits_BTV, targets_BT, mask_BT):
  """(sum of masked nats, number of real targets, correct predictions)."""
  nll_BT, correct_BT = token_nll(logits_BTV, targets_BT)
  mask_BT = mask_BT.astype(jnp.float32)
  return (jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT),
          jnp.sum(correct_BT.astype(jnp.float32) * mask_BT))


def head_cross_entropy(x_BTD, head, targets_BT, mask_BT, chunk):
  """`cross_entropy`'s sum of masked nats from the final hidden states (a model
  applied with `head=False`; `head(x_BTD)` gives their logits, e.g.
  `partial(model.logits, params)`), `chunk` tokens at a time: each chunk's logits are
  computed, reduced to its loss and, in the backward pass, recomputed, so the
  [B, T, V] logits and their gradient never exist at once (on a CPU, writing and
  reading them back cost more than the head's matmul itself)."""
  B, T, D = x_BTD.shape
  N = B * T
  chunk = max(1, min(chunk, N))
  pad = (-N) % chunk
  flat = lambda a: jnp.pad(a.reshape((N,) + a.shape[2:]), [(0, pad)] + [(0, 0)] * (a.ndim - 2))
  x_ND, t_N, m_N = flat(x_BTD), flat(targets_BT), flat(mask_BT.astype(jnp.float32))

  @jax.checkpoint
  def one(args):
    x_CD, t_C, m_C = args
    logits_CV = head(x_CD[None])[0]
    nll_C = optax.softmax_cross_entropy_with_integer_labels(logits_CV.astype(jnp.float32), t_C)
    return jnp.sum(nll_C * m_C)

  n = (N + pad) // chunk
  parts = jax.lax.map(one, (x_ND.reshape(n, chunk, D), t_N.reshape(n, chunk),
                            m_N.reshape(n, chunk)))
  return jnp.sum(parts)


def make_eval_step(model):
  """eval_step(params, batch) -> {'ce_sum', 'n', 'correct'}: sums over real targets,
  every window from a fresh state."""
  def eval_step(params, batch):
    logits_BTV, _, _ = model.apply({"params": params}, batch["inputs"], state=None,
                                   reset=batch["reset"], deterministic=True)
    ce_sum, n, correct = cross_entropy(logits_BTV, batch["targets"], batch["mask"])
    return {"ce_sum": ce_sum, "n": n, "correct": correct}
  return eval_step


def global_sum(x):
  """The sum over all processes of a host integer (exact up to 2**62; every process
  must call it). One process: `x` itself."""
  if jax.process_count() == 1:
    return int(x)
  x = int(x)
  parts = np.array([x >> 31, x & (2**31 - 1)], np.int32)   # int32: x64 may be off
  got = np.asarray(multihost_utils.process_allgather(parts)).astype(np.int64)
  return int(np.sum(got[:, 0]) * 2**31 + np.sum(got[:, 1]))


def summarize(ce_sum, n, correct, n_bytes):
  """The metrics from the sums (bits_per_byte is NaN when no bytes are known)."""
  n = float(n)
  loss = float(ce_sum) / max(n, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY)),
          "bits_per_byte": float(ce_sum) / math.log(2) / n_bytes if n_bytes else float("nan"),
          "token_accuracy": float(correct) / max(n, 1.0), "tokens": int(n)}


def evaluate(eval_step, params, batches, put=None):
  """Metrics over `batches` (dicts with BATCH_KEYS and optionally 'bytes').

  `eval_step` is a jitted `make_eval_step(model)`; `put` places a batch on the
  devices (default: as is). Multi-process: every process passes its rows of the same
  global batches; the step's sums are global, and so is the byte count (summed over
  processes here), so every figure is the global one.
  """
  tot = {"ce_sum": 0.0, "n": 0.0, "correct": 0.0}
  n_bytes = 0
  for b in batches:
    arrays = {k: b[k] for k in BATCH_KEYS}
    out = eval_step(params, put(arrays) if put else arrays)
    for k in tot:
      tot[k] += float(out[k])
    if "bytes" in b:
      n_bytes += int(np.sum(np.asarray(b["bytes"]) * (np.asarray(b["mask"]) > 0)))
  return summarize(tot["ce_sum"], tot["n"], tot["correct"], global_sum(n_bytes))
