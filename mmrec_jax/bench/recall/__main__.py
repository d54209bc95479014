"""`python -m mmrec_jax.bench.recall`: the gate, the arms, the tables (see __init__)."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from absl import flags

from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax.bench.recall import report
from mmrec_jax.bench.recall import runs
from mmrec_jax.bench.recall import score
from mmrec_jax.data import tasks
from mmrec_jax.errors import UsageError
from mmrec_jax.io import loading
from mmrec_jax.io import workdir as workdir_lib

GATE_THRESHOLD = 0.9

flags.DEFINE_list("arms", list(runs.DEFAULT_ARMS), f"Arms to train (any of "
                  f"{', '.join(runs.ARMS)}).")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds: every arm trains once per seed and learning rate.")
flags.DEFINE_list("lrs", ["1e-3", "3e-3"], "Peak learning rates swept for every arm; each "
                  "arm is scored at its best (held-out answer accuracy, mean over seeds).")
flags.DEFINE_integer("steps", 1000, "Training steps of every arm.")
flags.DEFINE_integer("batch", 32, "Rows per batch.")
flags.DEFINE_integer("seq_len", 128, "Training length (tokens per row).")
flags.DEFINE_string("task", runs.TRAIN_TASK, "The arms' training mix (a data.task spec).")
flags.DEFINE_integer("gate_steps", 3000, "Steps of the gate's Transformer.")
flags.DEFINE_float("gate_lr", 1e-3, "Peak learning rate of the gate's Transformer.")
flags.DEFINE_integer("examples", 64, "Fresh held-out sequences per scored cell.")
flags.DEFINE_list("multiples", ["1", "4", "16"], "Lengths scored, as multiples of --seq_len.")
flags.DEFINE_list("pairs", ["4", "8", "16", "32"], "MQAR pairs scored at --seq_len.")
flags.DEFINE_integer("spread_pairs", 16, "Spread MQAR: pairs per sequence (fewer where the "
                     "length holds fewer chunks).")
flags.DEFINE_multi_string("set", [], "SECTION.FIELD=VALUE for every arm's config (not the gate).")
flags.DEFINE_bool("skip_gate", False, "Do not train or score the gate.")
flags.DEFINE_list("geometries", [], "SLOTS:LEVELS, ...: also score every arm with a memory "
                  "with these memory geometries (the same trained parameters): does recall "
                  "fail for want of room?")
flags.DEFINE_string("out", "runs/recall", "Output folder (one workdir per run, recall.png, "
                    "recall.json).")
flags.DEFINE_bool("json", False, "Print the results as one JSON object on the last line.")
FLAGS = flags.FLAGS


def _ints(name, least=1):
  try:
    vals = [int(x) for x in FLAGS[name].value]
  except ValueError:
    raise UsageError(f"--{name}: integers expected, got {','.join(FLAGS[name].value)}") from None
  if not vals or min(vals) < least:
    raise UsageError(f"--{name} must list integers >= {least}")
  return vals


def gate(out, log):
  """Trains (or reuses) the gate's Transformer; its accuracy on fresh MQAR (64, 4)."""
  recipe = runs.Recipe(steps=FLAGS.gate_steps, batch=FLAGS.batch, seq_len=64, lr=FLAGS.gate_lr,
                       warmup=max(1, FLAGS.gate_steps // 20), task=runs.GATE_TASK)
  t0 = time.time()
  wd, _ = runs.train(out, "gate", recipe, log=log)
  model, variables, _, _ = loading.load(wd, "latest")
  vocab = score.vocab_of(runs.GATE_TASK)

  batch = tasks.mqar(np.random.default_rng([1, 7919]), 4 * FLAGS.examples, 64, 4, vocab=vocab)
  acc = score.accuracy(model, variables, batch, 64)
  ok = acc >= GATE_THRESHOLD
  log(f"gate: the Transformer ({model.cfg.d_model} wide, {model.cfg.n_layers} layers) on MQAR "
      f"with 4 pairs in 64 tokens, {recipe.steps} steps: accuracy {acc:.3f} "
      f"({'passed' if ok else 'FAILED'}: >= {GATE_THRESHOLD} needed; chance 1/4 = 0.25 within "
      f"the sequence, 1/{vocab.n_values} overall) [{time.time() - t0:.0f}s]")
  if not ok:
    log("gate FAILED: the recipe (learning rate, steps, vocabulary) cannot teach attention "
        "this task, so the comparison below measures the recipe, not the models")
  return acc, ok


def main(argv):
  del argv
  log = lambda *a: print(*a, flush=True)
  runs.check_arms(FLAGS.arms)
  seeds, multiples, pairs = _ints("seeds", 0), _ints("multiples"), _ints("pairs")
  try:
    lrs = [float(x) for x in FLAGS.lrs]
  except ValueError:
    raise UsageError(f"--lrs: numbers expected, got {','.join(FLAGS.lrs)}") from None
  if not lrs or min(lrs) <= 0:
    raise UsageError("--lrs must list positive learning rates")
  geometries = [g.split(":") for g in FLAGS.geometries]
  if not all(len(g) == 2 and all(x.isdigit() and int(x) >= 1 for x in g) for g in geometries):
    raise UsageError(f"--geometries={','.join(FLAGS.geometries)}: SLOTS:LEVELS pairs of "
                     "positive integers expected, e.g. 64:2,32:3")
  geometries = [(int(s), int(n)) for s, n in geometries]
  overrides = config_lib.parse_overrides(FLAGS.set)
  out = FLAGS.out
  os.makedirs(out, exist_ok=True)
  T = FLAGS.seq_len
  vocab = score.vocab_of(FLAGS.task)
  log(f"recall: arms {', '.join(FLAGS.arms)}; seeds {seeds}; learning rates {lrs}; "
      f"{FLAGS.steps} steps of {FLAGS.batch} x {T} on {FLAGS.task}; vocabulary {vocab.size}; "
      f"{FLAGS.examples} fresh sequences per cell")
  gate_acc, gate_ok = gate(out, log) if not FLAGS.skip_gate else (None, None)

  sets = score.eval_sets(T, FLAGS.examples, 12345, vocab, pairs=pairs, multiples=multiples,
                         spread_pairs=FLAGS.spread_pairs, chunk=runs.CHUNK)
  results, best_lr, val = {}, {}, {}
  for arm in FLAGS.arms:
    t0 = time.time()
    val[arm] = {}
    wds = {}
    for lr in lrs:
      for seed in seeds:
        recipe = runs.Recipe(steps=FLAGS.steps, batch=FLAGS.batch, seq_len=T, lr=lr,
                             warmup=max(1, FLAGS.steps // 20), task=FLAGS.task, seed=seed)
        wds[lr, seed], val[arm][f"{lr:g}:{seed}"] = runs.train(out, arm, recipe, overrides, log)
    mean_val = {lr: sum(val[arm][f"{lr:g}:{s}"] or 0 for s in seeds) / len(seeds) for lr in lrs}
    best = max(lrs, key=lambda lr: mean_val[lr])
    best_lr[arm] = best
    for seed in seeds:
      model, variables, _, _ = loading.load(wds[best, seed], "latest")
      forms = {arm: variables}
      off = model.without_memory_read(variables)
      if off is not None:
        forms[f"{arm}/read_off"] = off
      forms = {name: (model, v) for name, v in forms.items()}
      for slots, levels in geometries:
        other = model.with_memory_geometry(slots, levels)
        if other is not None:
          forms[f"{arm}@{slots}x{levels}"] = (other, variables)
      for name, (m, v) in forms.items():
        for row, acc in score.score_all(m, v, sets, T).items():
          results.setdefault(name, {}).setdefault(row, []).append(acc)
    log(f"  {arm}: best learning rate {best:g} (held-out answer accuracy by lr: "
        + ", ".join(f"{lr:g} {mean_val[lr]:.3f}" for lr in lrs) + f") [{time.time() - t0:.0f}s]")

  columns = list(results)
  mqar_rows = [r for r in sets if r.startswith("mqar")]
  long_rows = [r for r in sets if not r.startswith("mqar")]
  if gate_acc is not None:
    log(f"\ngate: transformer MQAR (64, 4) {gate_acc:.3f} ({'passed' if gate_ok else 'FAILED'})")
  report.table(results, columns, mqar_rows, f"MQAR by pairs at the training length {T} "
               f"(answer accuracy; chance 1/N within the sequence, 1/{vocab.n_values} overall)",
               log)
  spread_n = {m: score.spread_pairs_at(T, m, FLAGS.spread_pairs, runs.CHUNK) for m in multiples}
  report.table(results, columns, long_rows, "spread MQAR (pairs per length: " + ", ".join(
      f"{m}x {n}" for m, n in spread_n.items()) + ") and a 4-token passkey, beyond the "
      "training length (state carried across pieces)", log)
  png = os.path.join(out, "recall.png")
  report.plot(png, results, columns, mqar_rows, long_rows, T)
  obj = {"task": "recall", "gate": {"transformer_mqar_64_4": gate_acc, "passed": gate_ok},
         "arms": {c: {r: report.mean_spread(v)[0] for r, v in results[c].items()}
                  for c in columns},
         "per_seed": results, "best_lr": best_lr, "val_accuracy": val,
         "chance": {"values": 1.0 / vocab.n_values, "pairs": {r: 1.0 / int(r.split(":")[1])
                                                              for r in mqar_rows}},
         "spread_pairs": {f"{m}x": n for m, n in spread_n.items()},
         "train": {"steps": FLAGS.steps, "batch": FLAGS.batch, "seq_len": T, "task": FLAGS.task,
                   "lrs": lrs, "seeds": seeds, "set": list(FLAGS.set)}}
  workdir_lib.atomic_write(os.path.join(out, "recall.json"), json.dumps(obj, indent=1))
  log(f"wrote {png} and {os.path.join(out, 'recall.json')}")
  if FLAGS.json:
    print(json.dumps(obj))


if __name__ == "__main__":
  cli.run(main)
