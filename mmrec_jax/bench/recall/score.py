"""Scoring a trained model on recall tasks: greedy answers, the model fed a piece of
the training length at a time with its decoding state carried (as decoding does)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax.data import synthetic
from mmrec_jax.data import tasks


_FNS = {}


def _piece_fn(model):
  """The jitted piece step of a model (one per model config)."""
  key = (type(model), model.cfg)
  if key in _FNS:
    return _FNS[key]

  @jax.jit
  def piece(variables, x_BT, reset_BT, state):
    logits_BTV, state, _ = model.apply(variables, x_BT, state=state, reset=reset_BT)
    return jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32), state
  _FNS[key] = piece
  return piece


def predict(model, variables, inputs_NT, reset_NT, piece, batch=32):
  """Greedy predictions [N, T]: rows `batch` at a time, `piece` tokens at a time with the
  state carried; the model's state holds the whole sequence (`for_context`)."""
  N, T = inputs_NT.shape
  model = model.for_context(T)
  fn = _piece_fn(model)
  pred_NT = np.zeros((N, T), np.int32)
  for b0 in range(0, N, batch):
    x, r = inputs_NT[b0:b0 + batch], reset_NT[b0:b0 + batch]
    n = len(x)
    if n < batch:   # a full batch every call: one compile
      x = np.concatenate([x, np.zeros((batch - n, T), x.dtype)])
      r = np.concatenate([r, np.ones((batch - n, T), bool)])
    state = model.init_state(batch)
    for k in range(0, T, piece):
      p, state = fn(variables, x[:, k:k + piece], r[:, k:k + piece], state)
      pred_NT[b0:b0 + n, k:k + piece] = np.asarray(p)[:n]
  return pred_NT


def accuracy(model, variables, batch, piece):
  """Fraction of answer tokens predicted (greedy) in a tasks batch."""
  pred = predict(model, variables, batch["inputs"], batch["reset"], piece)
  return tasks.score(pred, batch)["acc"]


def eval_sets(train_len, examples, seed, vocab, pairs=(4, 8, 16, 32, 64), multiples=(1, 4, 16),
              spread_pairs=16, chunk=8, key_len=4):
  """{name: (tasks batch, what it is)} of fresh held-out sequences: MQAR by pairs at the
  training length; spread MQAR and passkey at each multiple of it."""
  rng = np.random.default_rng([seed, 7919])
  out = {}
  for n in pairs:
    if 1 + 4 * n <= train_len + 1:
      out[f"mqar:{n}"] = tasks.mqar(rng, examples, train_len, n, vocab=vocab)
  for m in multiples:
    T = m * train_len
    n = min(spread_pairs, T // chunk // 2 - 1)
    out[f"spread:{m}x"] = tasks.spread_mqar(rng, examples, T, n, chunk, vocab=vocab)
    out[f"passkey:{m}x"] = tasks.passkey(rng, examples, T, key_len=key_len, vocab=vocab)
  return out


def spread_pairs_at(train_len, m, spread_pairs=16, chunk=8):
  return min(spread_pairs, m * train_len // chunk // 2 - 1)


def score_all(model, variables, sets, piece):
  return {name: accuracy(model, variables, b, piece) for name, b in sets.items()}


def vocab_of(task_spec):
  return synthetic.parse(task_spec)[0].vocab
