"""Evaluate a trained model: `python -m mmrec_jax.evaluate --workdir=runs/tiny [--data=PATH]`.

Loss, perplexity, bits per byte and token accuracy on the run's validation split
or any file the data pipeline reads; `--long_context=K` also the loss by position
up to K x train.seq_len (`mmrec_jax.inference.evaluation`).
"""
from __future__ import annotations

import json

from absl import flags

from mmrec_jax import cli
from mmrec_jax.data import tokenizer as tok_lib
from mmrec_jax.errors import UsageError
from mmrec_jax.inference.evaluation import (bucket_table, eval_tokens, evaluate, loss_by_position,
                                            make_batches, write_loss_by_position)
from mmrec_jax.io import loading as load_lib

def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("batch_size", "long_context", "max_docs"):
    if f[name].value < (1 if name != "long_context" else 0):
      raise UsageError(f"--{name}={f[name].value} is out of range")
  if f.seq_len is not None and f.seq_len < 1:
    raise UsageError(f"--seq_len={f.seq_len} must be positive")
  model, variables, tok, config = load_lib.load(f.workdir, f.checkpoint)
  seq_len = f.seq_len or config.train.seq_len
  if seq_len > config.model.max_seq_len:   # the rule train applies to train.seq_len
    raise UsageError(f"--seq_len={seq_len} exceeds the model's max_seq_len="
                     f"{config.model.max_seq_len}; pass --seq_len <= {config.model.max_seq_len} "
                     "(--long_context=K measures longer contexts)")
  tokens = eval_tokens(config, tok, f.data)
  batches = make_batches(tokens, tok, seq_len, f.batch_size, f.max_batches)
  res = evaluate(model, variables, batches)
  print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  bits/byte "
        f"{res['bits_per_byte']:.4f}  token accuracy {res['token_accuracy']:.4f}  "
        f"({res['tokens']:,} tokens, seq_len {seq_len})")
  if f.long_context:
    sums, counts = loss_by_position(
        model, variables, tokens, tok.token_to_id(tok_lib.EOD), tok.token_to_id(tok_lib.PAD),
        seq_len, f.long_context, f.batch_size, f.max_docs)
    length = seq_len * f.long_context
    rows = bucket_table(sums, counts, f.bucket or max(1, length // 64))
    tsv, png = write_loss_by_position(f.out or f.workdir, rows, seq_len)
    inside = sums[:seq_len].sum() / max(counts[:seq_len].sum(), 1)
    beyond = sums[seq_len:].sum() / max(counts[seq_len:].sum(), 1)
    print(f"loss by position: {inside:.4f} within train.seq_len={seq_len}, {beyond:.4f} in "
          f"[{seq_len}, {length}) ({int(counts[seq_len:].sum()):,} tokens); {tsv}, {png}")
  if f.json:
    print(json.dumps(res))


def entry():
  flags.DEFINE_string("workdir", None, "Training workdir or exported folder.")
  flags.DEFINE_string("checkpoint", "best", "best | latest | STEP (workdirs only).")
  flags.DEFINE_string("data", None, "File, directory or glob to evaluate (default: val split).")
  flags.DEFINE_integer("seq_len", None, "Window length (default: train.seq_len).")
  flags.DEFINE_integer("batch_size", 8, "Windows per batch.")
  flags.DEFINE_integer("max_batches", None, "Evaluate at most this many batches.")
  flags.DEFINE_bool("json", False, "Print the metrics as one JSON object on the last line.")
  flags.DEFINE_integer("long_context", 0, "Also loss by position up to K * seq_len (0: off).")
  flags.DEFINE_integer("max_docs", 64, "Documents (the longest) used for loss by position.")
  flags.DEFINE_integer("bucket", 0, "Positions per table row (0: 1/64 of the window).")
  flags.DEFINE_string("out", None, "Folder for loss_by_position.* (default: the workdir).")
  flags.mark_flag_as_required("workdir")
  cli.run(main)


if __name__ == "__main__":
  entry()
