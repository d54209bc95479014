"""Evaluation: loss, perplexity, bits per byte, token accuracy; loss by position.

    python -m mmrec_jax.evaluate --workdir=runs/tiny [--data=PATH] [--json]
    python -m mmrec_jax.evaluate --workdir=runs/tiny --long_context=4

Data: the run's validation split, or any file / directory / glob the data
pipeline reads (`--data`), cut into windows of `train.seq_len` (+1) tokens
that each start from a fresh state (as validation during training).

`--long_context=K` also measures the loss at every position of windows of
K * train.seq_len tokens that start at a document start (the longest
documents first), streamed through the model in pieces of train.seq_len with
the state carried. It writes `loss_by_position.tsv` and `.png` (in the
workdir or `--out`): a flat or falling curve past train.seq_len means the
model extrapolates and uses the longer context.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from mmrec_jax.data import pipeline as data
from mmrec_jax.training import loss as loss_lib
from mmrec_jax.training import metrics as metrics_lib
from mmrec_jax.data import tokenizer as tok_lib
from mmrec_jax.io import workdir as workdir_lib
from mmrec_jax.errors import DataError, UsageError

TABLE = "loss_by_position.tsv"
PLOT = "loss_by_position.png"


def eval_tokens(config, tok, data_path=None):
  """Token ids (each document preceded by `<|eod|>`) of `data_path` or the val split."""
  if data_path:
    try:
      docs = data.read_documents(data_path, config.data.text_field)
      parts = list(data.encode_documents(docs, tok))
    except DataError as e:   # name the flag this command reads the path from
      raise DataError(str(e).replace("check data.path / data.val_path", "check --data")) from None
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
  if getattr(config, "is_export", False):
    raise UsageError("an exported folder holds no data config; pass --data=PATH")
  if config.data.task:
    raise UsageError(f"the run trained on a generated task ({config.data.task}); score it "
                     "with python -m mmrec_jax.bench.recall, or pass --data=PATH")
  if not (config.data.val_path or config.data.val_fraction > 0):
    raise UsageError("the run has no validation split (data.val_fraction=0, no data.val_path); "
                     "pass --data=PATH")
  return data.cached_tokens(config.data, "val", tok)


def make_batches(tokens, tok, seq_len, batch_size=8, max_batches=None):
  """Validation batches (with 'bytes'); UsageError if `tokens` fill no window."""
  if len(tokens) < seq_len + 1:
    raise UsageError(f"the evaluation data has {len(tokens)} tokens, fewer than one window of "
                     f"seq_len+1={seq_len + 1}; use more text or a smaller --seq_len")
  return data.eval_batches(
      tokens, seq_len, batch_size, eod_id=tok.token_to_id(tok_lib.EOD),
      pad_id=tok.token_to_id(tok_lib.PAD), bytes_per_token=tok_lib.bytes_per_token(tok),
      max_batches=max_batches)


def evaluate(model, variables, batches):
  """`loss.summarize` metrics ('loss', 'perplexity', 'bits_per_byte', 'token_accuracy',
  'tokens') over `batches`, every window from a fresh state."""
  step = jax.jit(loss_lib.make_eval_step(model))
  return loss_lib.evaluate(step, variables["params"], batches)


def long_windows(tokens, eod_id, pad_id, length, max_docs=64):
  """Document-aligned windows: inputs, targets int32 [N, length], mask float32 [N, length].

  Window i holds the first `length` (+1) tokens of one of the `max_docs`
  longest documents (from its `<|eod|>`); the rest is padding with mask 0.
  """
  tokens = np.asarray(tokens)
  starts = np.flatnonzero(tokens == eod_id)
  ends = np.append(starts[1:], len(tokens))
  order = np.argsort(-(ends - starts), kind="stable")[:max_docs]
  n = len(order)
  win = np.full((n, length + 1), pad_id, np.int32)
  mask = np.zeros((n, length), np.float32)
  for i, d in enumerate(order):
    seg = tokens[starts[d]:min(ends[d], starts[d] + length + 1)]
    win[i, :len(seg)] = seg
    mask[i, :len(seg) - 1] = 1.0
  return win[:, :-1], win[:, 1:], mask


def loss_by_position(model, variables, tokens, eod_id, pad_id, seq_len, multiple,
                     batch_size=8, max_docs=64):
  """(nll sum, count) float64 [multiple * seq_len] by position in the document.

  Windows are streamed in pieces of `seq_len` with the state carried (one
  compiled step), so the model sees `multiple` times its training length.
  """
  length = multiple * seq_len
  inputs, targets, mask = long_windows(tokens, eod_id, pad_id, length, max_docs)
  if not len(inputs) or mask.sum() == 0:
    raise UsageError("the evaluation data has no document to measure loss by position on")

  @jax.jit
  def piece(variables, inputs_BT, targets_BT, state):
    logits_BTV, state, _ = model.apply(variables, inputs_BT, state=state,
                                       reset=inputs_BT == eod_id)
    return loss_lib.token_nll(logits_BTV, targets_BT)[0], state

  sums, counts = np.zeros(length), np.zeros(length)
  for b0 in range(0, len(inputs), batch_size):
    sl = slice(b0, b0 + batch_size)
    x, y, m = inputs[sl], targets[sl], mask[sl]
    if len(x) < batch_size:  # pad the batch (one compile)
      fill = batch_size - len(x)
      x = np.concatenate([x, np.full((fill, length), pad_id, np.int32)])
      y = np.concatenate([y, np.full((fill, length), pad_id, np.int32)])
      m = np.concatenate([m, np.zeros((fill, length), np.float32)])
    state = model.init_state(batch_size)
    for k in range(multiple):
      p = slice(k * seq_len, (k + 1) * seq_len)
      nll_BT, state = piece(variables, x[:, p], y[:, p], state)
      sums[p] += np.sum(np.asarray(nll_BT, np.float64) * m[:, p], axis=0)
      counts[p] += m[:, p].sum(axis=0)
  return sums, counts


def bucket_table(sums, counts, bucket):
  """Rows (start, end, tokens, loss) per bucket of positions with any tokens."""
  rows = []
  for s in range(0, len(sums), bucket):
    n = counts[s:s + bucket].sum()
    if n:
      rows.append((s, min(s + bucket, len(sums)), int(n), float(sums[s:s + bucket].sum() / n)))
  return rows


def write_loss_by_position(out_dir, rows, seq_len):
  """Writes TABLE and PLOT into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  tsv, png = os.path.join(out_dir, TABLE), os.path.join(out_dir, PLOT)
  workdir_lib.atomic_write(tsv, "position_start\tposition_end\ttokens\tloss\n" + "".join(
      f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]:.6f}\n" for r in rows))
  metrics_lib.plot_lines(
      png, {"loss": ([(r[0] + r[1]) / 2 for r in rows], [r[3] for r in rows], ".-")},
      "position in document (tokens)", "loss (nats / token)", "Loss by position",
      vline=(seq_len, f"train.seq_len={seq_len}"))
  return tsv, png
