"""Quality benchmark: does MM-Rec learn as well as a Transformer of the same size,
and does its long-term memory pay?

    python -m mmrec_jax.bench.quality [--data=PATH --val_data=PATH] [--tokens=2000000]
        [--seq_len=1024] [--seeds=0,1] [--carry_state] [--out=runs/quality] [--json]

Trains three arms with the project's own trainer on the same data order,
tokenizer (trained once, shared), number of tokens and seeds: MM-Rec tiny,
MM-Rec tiny with its long-term memory off (`model.mem_levels=0`) and the
Transformer baseline of the same size (`configs/baselines/transformer_tiny.py`).
Prints held-out loss and bits per byte at several points of training (mean and
spread over seeds), training tokens/s, and the loss by position in the document
up to `--long` x the training length (state carried across pieces; the
Transformer's KV cache holds the whole window); writes `quality_by_position.png`
and `quality.json` in `--out`. Default data: the built-in corpus.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags

from mmrec_jax import bench
from mmrec_jax.bench import arms
from mmrec_jax import cli
from mmrec_jax.data import pipeline as data_lib
from mmrec_jax.inference import evaluation as eval_lib
from mmrec_jax.io import loading as loading
from mmrec_jax.training import metrics as metrics_lib
from mmrec_jax import models
from mmrec_jax.data import tokenizer as tok_lib
from mmrec_jax.errors import UsageError

ARMS = arms.ARMS

flags.DEFINE_string("data", "", "Training data (default: the built-in corpus).")
flags.DEFINE_string("val_data", "", "Held-out data (default: a hash split of --data).")
flags.DEFINE_integer("tokens", 2_000_000, "Training tokens per arm (the budget).")
flags.DEFINE_integer("seq_len", 1024, "Training length.")
flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds (each arm trains once per seed).")
flags.DEFINE_list("arms", ["mmrec", "mmrec_nomem", "transformer"],
                  f"Arms to train ({', '.join(ARMS)}).")
flags.DEFINE_integer("evals", 5, "Held-out evaluations during training.")
flags.DEFINE_integer("eval_batches", 16, "Validation batches per evaluation (0: all).")
flags.DEFINE_integer("long", 4, "Loss by position up to this many training lengths.")
flags.DEFINE_integer("max_docs", 32, "Documents (the longest) for the loss by position.")
flags.DEFINE_bool("carry_state", False, "Train the MM-Rec arms with train.carry_state (each "
                  "row's state carried from one window to the next, so a long document is "
                  "seen whole; the Transformer arm trains without).")
flags.DEFINE_string("out", "runs/quality", "Output folder (one workdir per arm and seed).")
flags.DEFINE_bool("json", False, "Print the results as one JSON object on the last line.")
FLAGS = flags.FLAGS


def arm_config(arm, seed, steps, tokenizer_path):
  c = arms.load_arm(arm)
  # loss by position: the decoding state holds the whole long window (a KV cache)
  model = c.model.replace(max_seq_len=max(c.model.max_seq_len, FLAGS.seq_len)).for_context(
      FLAGS.long * FLAGS.seq_len)
  return c.replace(model=model).override({
      "data.path": FLAGS.data, "data.val_path": FLAGS.val_data, "data.tokenizer": tokenizer_path,
      "train.seed": seed, "train.seq_len": FLAGS.seq_len, "train.batch_size": FLAGS.batch,
      "train.steps": steps, "train.warmup_steps": max(1, steps // 20),
      "train.eval_every": max(1, steps // FLAGS.evals), "train.eval_batches": FLAGS.eval_batches,
      "train.samples": 0, "checkpoint.every": steps,
      "train.carry_state": FLAGS.carry_state and type(c.model).CARRIES_STATE})


def mean_spread(xs):
  return statistics.mean(xs), (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  for a in FLAGS.arms:
    if a not in ARMS:
      raise UsageError(f"--arms: unknown arm {a!r}; use {', '.join(ARMS)}")
  steps = max(1, FLAGS.tokens // (FLAGS.batch * FLAGS.seq_len))
  os.makedirs(FLAGS.out, exist_ok=True)
  # One tokenizer for every arm, trained once on the training split.
  c0 = arm_config("mmrec", seeds[0], steps, "")
  tok = data_lib.get_tokenizer(c0, os.path.join(FLAGS.out, "shared"))
  tok_path = os.path.abspath(os.path.join(FLAGS.out, "shared", "tokenizer.json"))
  eod, pad = tok.token_to_id(tok_lib.EOD), tok.token_to_id(tok_lib.PAD)
  val_tokens = eval_lib.eval_tokens(c0, tok, FLAGS.val_data or None)
  print(f"quality: {len(FLAGS.arms)} arms x {len(seeds)} seeds, {steps} steps of "
        f"{FLAGS.batch} x {FLAGS.seq_len} = {steps * FLAGS.batch * FLAGS.seq_len:,} training tokens "
        f"per arm; data: {FLAGS.data or 'built-in corpus'}; held-out: "
        f"{FLAGS.val_data or 'hash split'} ({len(val_tokens):,} tokens)"
        + ("; MM-Rec arms carry their state across windows" if FLAGS.carry_state else ""),
        flush=True)
  res = {}
  for arm in FLAGS.arms:
    for seed in seeds:
      c = arm_config(arm, seed, steps, tok_path)
      carried = "_carry" if c.train.carry_state else ""   # never reuse a run trained otherwise
      workdir = os.path.join(FLAGS.out, f"{arm}_seed{seed}{carried}")
      t0 = time.time()
      r = bench.train_arm(c, workdir)
      recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
      val = [x for x in recs if x["split"] == "val"]
      rates = [x["tokens_per_s"] for x in recs if x["split"] == "train" and "compile_s" not in x]
      model, variables, _, _ = loading.load(workdir, "latest")
      sums, counts = eval_lib.loss_by_position(model, variables, val_tokens, eod, pad,
                                               FLAGS.seq_len, FLAGS.long, 8, FLAGS.max_docs)
      res.setdefault(arm, []).append({
          "seed": seed, "val": [(x["step"], x["loss"], x["bits_per_byte"]) for x in val],
          "tokens_per_s": statistics.median(rates) if rates else float("nan"),
          "by_position": (sums, counts), "params": models.count_params(models.param_shapes(model))})
      print(f"  {arm} seed {seed}: final val loss {val[-1]['loss']:.4f} bpb "
            f"{val[-1]['bits_per_byte']:.4f} in {time.time() - t0:.0f}s ({r.step} steps)",
            flush=True)
  report(res, steps)


def report(res, steps):
  tokens_per_step = FLAGS.batch * FLAGS.seq_len
  print("\nheld-out loss / bits per byte (mean ± half-range over seeds)")
  evals = [s for s, _, _ in next(iter(res.values()))[0]["val"]]
  print(f"{'tokens':>10}  " + "  ".join(f"{arm:>26}" for arm in res))
  out = {"tokens_per_arm": steps * tokens_per_step, "seq_len": FLAGS.seq_len,
         "carry_state": FLAGS.carry_state, "arms": {}}
  for i, step in enumerate(evals):
    cells = []
    for arm, runs in res.items():
      lm, ls = mean_spread([r["val"][i][1] for r in runs])
      bm, bs = mean_spread([r["val"][i][2] for r in runs])
      cells.append(f"{lm:.4f}±{ls:.4f} / {bm:.3f}±{bs:.3f}")
    print(f"{step * tokens_per_step:>10,}  " + "  ".join(f"{c:>26}" for c in cells))
  L = FLAGS.seq_len
  edges = [0, L // 8, L // 2, L] + [k * L for k in range(2, FLAGS.long + 1)]
  print("\nloss by position in the document (mean over seeds)")
  print(f"{'positions':>14}  " + "  ".join(f"{arm:>12}" for arm in res))
  series = {}
  for arm, runs in res.items():
    sums = sum(r["by_position"][0] for r in runs)
    counts = sum(r["by_position"][1] for r in runs)
    rows = eval_lib.bucket_table(sums, counts, max(1, L // 16))
    series[arm] = ([(a + b) / 2 for a, b, _, _ in rows], [x for _, _, _, x in rows], ".-")
    final = [r["val"][-1] for r in runs]
    out["arms"][arm] = {
        "params": runs[0]["params"],
        "final_loss": mean_spread([f[1] for f in final]),
        "final_bits_per_byte": mean_spread([f[2] for f in final]),
        "tokens_per_s": statistics.median([r["tokens_per_s"] for r in runs]),
        # None (JSON null) where no held-out document reaches those positions
        "loss_by_position": {f"{a}-{b}": (float(sums[a:b].sum() / counts[a:b].sum())
                                          if counts[a:b].sum() else None)
                             for a, b in zip(edges, edges[1:])},
    }
  for a, b in zip(edges, edges[1:]):
    vals = [out["arms"][arm]["loss_by_position"][f"{a}-{b}"] for arm in res]
    print(f"{f'[{a}, {b})':>14}  " + "  ".join(
        f"{'n/a':>12}" if v is None else f"{v:>12.4f}" for v in vals)
          + ("  (no held-out document is this long)" if None in vals else ""))
  print("\ntraining tokens/s (median over seeds, same run): " + ", ".join(
      f"{arm} {v['tokens_per_s']:,.0f}" for arm, v in out["arms"].items()))
  png = os.path.join(FLAGS.out, "quality_by_position.png")
  metrics_lib.plot_lines(png, series, "position in document (tokens)", "loss (nats / token)",
                         "Held-out loss by position", vline=(L, f"training length {L}"))
  with open(os.path.join(FLAGS.out, "quality.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {png} and {os.path.join(FLAGS.out, 'quality.json')}")
  if FLAGS.json:
    print(json.dumps(out))


if __name__ == "__main__":
  cli.run(main)
