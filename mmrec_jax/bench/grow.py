"""What growth saves: `python -m mmrec_jax.bench.grow [--steps=300] [--seeds=0,1,2]`.

    python -m mmrec_jax.bench.grow --small=tiny --big=mini --steps=300 --seeds=0,1,2 \
        [--arms=carry] [--grow_at=0.35] [--budgets=0.1,0.2] [--small_alone=0.25,0.35] \
        [--seq_len=128] [--batch_size=8] [--warmup=30] [--eval_batches=8] \
        [--set=SECTION.FIELD=VALUE ...] [--workdir=runs/bench_grow]

Per seed, on one data stream and ONE vocabulary (the scratch run trains the
tokenizer at the big config's `vocab_size`; every other run of the seed uses it,
the small config's `vocab_size` overridden to match), every run a complete run
with its warmup-stable-decay schedule fully decayed:

- scratch: the big config trained `--steps` steps; its final held-out bits per
  byte is the target;
- small: the small config trained for `--grow_at` of the scratch run's FLOPs at
  its peak learning rate (it is grown mid-run: no decay);
- per arm and budget b (`--budgets`, fractions of `--steps`): the small run grown
  into the big config, then b x `--steps` big-model steps:
  `restart`: fresh AdamW state, a `--rewarmup` warmup and a schedule of its own;
  `carry`: AdamW's moments and step count grown with the parameters, the ladder's
  schedule continued from the small run's step (minus `--rewind`);
  `stack`: `carry`, with depth grown by stacking the trained layers instead of
  identity blocks;
  `carry_nb`: `carry`, an inserted block's second moments copied from the block it
  copies (zero in `carry`);
  `carry_rw`: `carry`, the learning rate warmed up again from 0 over `--rewarm`
  steps after growth (`train.rewarm_steps`);
- the reference that does not grow (`--small_alone`, fractions of the scratch
  run's FLOPs): the small config alone, its own schedule fully decayed. Growth
  pays only where it beats this too: a big model trained far below its
  compute-optimal token count is worse per FLOP than the small one, and a
  saving against it is the small model's, not growth's.

Saving = 1 - FLOPs(small + grown) / FLOPs(scratch) at the target: from each arm's
final bits per byte against its FLOPs, interpolated between budgets (a bound when
the smallest budget already reaches the target or the largest does not), with and
without the small model's FLOPs (the small model alone: its FLOPs to the target).
FLOPs are analytic: 3 x `flops_per_token` (head
and scan included) x tokens. Prints one table per growth point (the mean over
seeds and each seed), writes `bench_grow.json` and `bench_grow.png` (held-out
bits per byte against cumulative FLOPs). Re-running resumes: finished runs are
kept.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags
from absl import logging

from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.data import pipeline as data_lib
from mmrec_jax.errors import UsageError
from mmrec_jax.growth import ladder
from mmrec_jax.growth import workdir as grow_workdir_lib
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.training import loop as loop_lib
from mmrec_jax.training import loss as loss_lib
from mmrec_jax.training import metrics as metrics_lib
from mmrec_jax.training import sharding as shard_lib
from mmrec_jax.training import state as ts_lib

# How each arm grows (growth/workdir.py: grow_workdir's options: the optimizer and
# schedule of progressive's recipes, growth/ladder.py: RECIPES, then the depth operator
# and the arm's own variations), and whether its learning rate warms up again after
# growth (`train.rewarm_steps`, --rewarm steps).
def _recipe(name, rewarm=False, **more):
  grow = {**{k: ladder.RECIPES[name][k] for k in ("optimizer", "schedule")},
          "depth": "identity", **more}
  return {"grow": grow, "rewarm": rewarm}


ARMS = {
    "restart": _recipe("restart"),
    "carry": _recipe("carry"),
    "stack": _recipe("carry", depth="stack"),
    # carry, an inserted block's second moments copied from its neighbour's
    "carry_nb": _recipe("carry", new_moments="neighbour"),
    # carry, the learning rate ramped from 0 again after growth
    "carry_rw": _recipe("carry", rewarm=True),
}
DECAY = ladder.DECAY   # every run's decay: the last fifth of its own steps, as a ladder's

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when it runs: importing this module defines none)."""
  flags.DEFINE_string("small", "tiny", "Config grown from.")
  flags.DEFINE_string("big", "mini", "Config grown into (and trained from scratch).")
  flags.DEFINE_integer("steps", 300, "Steps of the scratch run.")
  flags.DEFINE_integer("seq_len", 128, "train.seq_len of every run.")
  flags.DEFINE_integer("batch_size", 8, "train.batch_size of every run.")
  flags.DEFINE_integer("warmup", 30, "train.warmup_steps of the scratch and small runs.")
  flags.DEFINE_integer("eval_batches", 8, "train.eval_batches of every run.")
  flags.DEFINE_list("arms", ["carry"], f"Growth arms ({', '.join(ARMS)}).")
  flags.DEFINE_list("grow_at", ["0.35"], "Growth points: the small model's training as a "
                    "fraction of the scratch run's FLOPs.")
  flags.DEFINE_list("budgets", ["0.1", "0.2"], "Big-model steps after growth, as fractions "
                    "of --steps (each a complete run).")
  flags.DEFINE_list("small_alone", ["0.25", "0.35"], "The reference that does not grow: the "
                    "small config alone, its schedule fully decayed, at these fractions of "
                    "the scratch run's FLOPs (empty: not run).")
  flags.DEFINE_float("noise", 0.05, "Zero-sum noise over the copies of widened units.")
  flags.DEFINE_float("rewarmup", 0.03, "restart: warmup after growth, as a fraction of its steps.")
  flags.DEFINE_integer("rewind", 0, "carry, stack: steps the continued schedule is rewound.")
  flags.DEFINE_integer("rewarm", 30, "carry_rw: steps of the second warmup after growth.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (train.seed of every run).")
  flags.DEFINE_integer("eval_every", 30, "Steps between held-out evaluations.")
  flags.DEFINE_multi_string("set", [], "SECTION.FIELD=VALUE for every run.")
  flags.DEFINE_multi_string("small_set", [], "SECTION.FIELD=VALUE for the small config only.")
  flags.DEFINE_multi_string("big_set", [], "SECTION.FIELD=VALUE for the big config only.")
  flags.DEFINE_string("workdir", "runs/bench_grow", "Where the runs and results go.")
  flags.DEFINE_bool("json", False, "Print the savings as one JSON object on the last line.")


def flops_per_step(config):
  t = config.train
  return 3 * models.build(config.model).flops_per_token(t.seq_len) * t.batch_size * t.seq_len


def read_val(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("split") == "val"]


def held_out(config, workdir, devices):
  """Held-out metrics of a workdir's latest checkpoint (right after growth)."""
  s = ts_lib.setup(config, devices)
  params, _ = ckpt_lib.restore_params(workdir, "latest")
  ds = data_lib.build(config, data_lib.get_tokenizer(config, workdir))
  params = jax.device_put(params, s.state_sharding.params)
  ev = loss_lib.evaluate(s.eval_step, params,
                         ds.val_batches(max_batches=config.train.eval_batches or None),
                         put=lambda b: shard_lib.put_batch(b, s.mesh))
  return {k: float(v) for k, v in ev.items()}


def curve(val, flops_per_step, flops0=0.0, step0=0):
  """(FLOPs, bits per byte) of each held-out evaluation: `flops0` plus the steps after
  `step0` at `flops_per_step`."""
  return [(flops0 + (r["step"] - step0) * flops_per_step, r["bits_per_byte"]) for r in val]


def crossing(points, target):
  """FLOPs at which final bpb (points: (FLOPs, bpb), any order) reaches `target`,
  linear between budgets; (value, "=" | "<=" | ">") where "<=" means the smallest
  budget already reaches it and ">" that the largest does not."""
  pts = sorted(points)
  if pts[0][1] <= target:
    return pts[0][0], "<="
  for (f0, b0), (f1, b1) in zip(pts, pts[1:]):
    if b1 <= target:
      return f0 + (f1 - f0) * (b0 - target) / (b0 - b1), "="
  return pts[-1][0], ">"


def wsd(config, steps, warmup, decay_steps):
  return config.override({"train.steps": steps, "train.warmup_steps": warmup,
                          "train.schedule": "wsd", "checkpoint.every": steps,
                          "train.decay_frac": min(1.0, max(decay_steps, 1) / steps)})


def run_seed(seed, root, devices, log):
  common = [f"train.seq_len={FLAGS.seq_len}", f"train.batch_size={FLAGS.batch_size}",
            f"train.warmup_steps={FLAGS.warmup}", f"train.eval_batches={FLAGS.eval_batches}",
            *FLAGS.set, f"train.seed={seed}", f"train.eval_every={FLAGS.eval_every}",
            "train.samples=0", "train.early_stopping_patience=0"]
  big0, small0 = (config_lib.load(name) for name in (FLAGS.big, FLAGS.small))
  big0 = big0.override(config_lib.parse_overrides(common + list(FLAGS.big_set), big0))
  small0 = small0.override(config_lib.parse_overrides(common + list(FLAGS.small_set), small0))
  small0 = small0.override({"model.vocab_size": big0.model.vocab_size})
  d = lambda name: os.path.join(root, f"seed{seed}", name)
  f_big, f_small = flops_per_step(big0), flops_per_step(small0)
  steps = FLAGS.steps
  scratch = wsd(big0, steps, big0.train.warmup_steps, round(DECAY * steps))
  loop_lib.run(scratch, d("scratch"), devices=devices, quiet=True)
  tok = os.path.abspath(os.path.join(d("scratch"), "tokenizer.json"))  # one vocabulary
  sval = read_val(d("scratch"))
  target = sval[-1]["bits_per_byte"]
  out = {"scratch": {"flops": steps * f_big, "final_bpb": target}, "points": {}}
  curves = {"scratch": curve(sval, f_big)}
  log(f"seed {seed}: scratch {big0.model.name} {steps} steps -> {target:.4f} bits per byte")
  if FLAGS.small_alone:
    finals = []
    for a in FLAGS.small_alone:
      n = max(1, round(float(a) * steps * f_big / f_small))
      c = wsd(small0, n, small0.train.warmup_steps, round(DECAY * n)).override(
          {"data.tokenizer": tok})
      loop_lib.run(c, d(f"{small0.model.name}_alone_a{a}"), devices=devices, quiet=True)
      val = read_val(d(f"{small0.model.name}_alone_a{a}"))
      curves[f"small_alone a{a}"] = curve(val, f_small)
      finals.append({"budget": float(a), "flops": n * f_small,
                     "final_bpb": val[-1]["bits_per_byte"]})
      log(f"  {small0.model.name} alone, {a} of the scratch FLOPs ({n} steps): "
          f"{finals[-1]['final_bpb']:.4f} bits per byte")
    f, how = crossing([(x["flops"], x["final_bpb"]) for x in finals], target)
    out["small_alone"] = {"runs": finals, "flops_to_target": f, "bound": how,
                          "saving": 1 - f / (steps * f_big)}
  for g in FLAGS.grow_at if FLAGS.arms else ():   # no arms: no small run to grow
    n_small = max(1, round(float(g) * steps * f_big / f_small))
    small = wsd(small0, n_small, small0.train.warmup_steps, 1).override(
        {"data.tokenizer": tok, "train.decay_frac": ladder.HOLD_DECAY})   # grown mid-run
    loop_lib.run(small, d(f"small_g{g}"), devices=devices, quiet=True)
    small_flops = n_small * f_small
    curves[f"small g{g}"] = curve(read_val(d(f"small_g{g}")), f_small)
    res = out["points"][g] = {"small_steps": n_small, "small_flops": small_flops}
    for arm in FLAGS.arms:
      opts, rewarm, finals = ARMS[arm]["grow"], ARMS[arm]["rewarm"], []
      for b in FLAGS.budgets:
        n = max(1, round(float(b) * steps))
        if opts["schedule"] == "continue":
          start = max(0, n_small - FLAGS.rewind)
          c = wsd(big0, start + n, small0.train.warmup_steps, round(DECAY * n))
        else:
          start = 0
          c = wsd(big0, n, max(1, round(FLAGS.rewarmup * n)), round(DECAY * n))
        c = c.override({"data.tokenizer": tok})
        if rewarm:
          c = c.override({"train.rewarm_at": start, "train.rewarm_steps": FLAGS.rewarm})
        wd = d(f"{arm}_g{g}_b{b}")
        after_path = wd + ".after_growth.json"
        if not ladder.has_checkpoint(wd):
          diff = grow_workdir_lib.grow_workdir(
              d(f"small_g{g}"), c, wd, noise=FLAGS.noise, seed=seed, checkpoint="latest",
              log=lambda *a: None, devices=devices, rewind=FLAGS.rewind, **opts)
          with open(after_path, "w") as f:
            json.dump(dict(held_out(c, wd, devices), grow_logit_diff=diff), f)
        with open(after_path) as f:
          after = json.load(f)
        loop_lib.run(c, wd, devices=devices, quiet=True)
        val = read_val(wd)
        curves[f"{arm} g{g} b{b}"] = [(small_flops, after["bits_per_byte"])] + curve(
            val, f_big, small_flops, start)
        finals.append({"budget": float(b), "flops": small_flops + n * f_big,
                       "final_bpb": val[-1]["bits_per_byte"],
                       "bpb_after_growth": after["bits_per_byte"]})
        log(f"  {arm}, grown at {g}, budget {b}: {finals[-1]['final_bpb']:.4f} bits per byte "
            f"(right after growth {after['bits_per_byte']:.4f})")
      f, how = crossing([(x["flops"], x["final_bpb"]) for x in finals], target)
      res[arm] = {"runs": finals, "flops_to_target": f, "bound": how,
                  "saving": 1 - f / (steps * f_big),
                  "saving_without_small": 1 - (f - small_flops) / (steps * f_big)}
  return out, curves


BOUND = {"=": "", "<=": ">=", ">": "<"}   # a saving bound is the FLOPs bound reversed


def _row(label, rs, log):
  """A table row; a mean over seeds that holds a bound is marked `~` (not a measurement)."""
  sav = float(np.mean([r["saving"] for r in rs]))
  mark = "~" if any(r["bound"] != "=" for r in rs) else ""
  wo = ("" if "saving_without_small" not in rs[0] else
        f"{100 * float(np.mean([r['saving_without_small'] for r in rs])):.1f}%")
  per = ", ".join(f"{BOUND[r['bound']]}{100 * r['saving']:.0f}%" for r in rs)
  log(f"{label:<12}{mark + f'{100 * sav:.1f}%':>8}{wo:>11}{1 / (1 - sav):>7.2f}x   {per}")


def report(results, log=print):
  """One table per growth point (each arm's saving, mean over seeds, then per seed), then
  the small model alone (no growth)."""
  seeds = list(results)
  targets = ", ".join(f"{results[s]['scratch']['final_bpb']:.4f}" for s in seeds)
  log(f"\ntarget: each seed's scratch {FLAGS.big} ({targets} bits per byte)")
  header = f"{'arm':<12}{'saving':>8}{'w/o small':>11}{'ratio':>8}   per seed"
  rows = []
  for g in FLAGS.grow_at if FLAGS.arms else ():
    log(f"{FLAGS.small} grown at {g} of the scratch FLOPs\n{header}")
    for arm in FLAGS.arms:
      rows.append([results[s]["points"][g][arm] for s in seeds])
      _row(arm, rows[-1], log)
  if FLAGS.small_alone:
    log(f"no growth\n{header}")
    rows.append([results[s]["small_alone"] for s in seeds])
    _row(f"{FLAGS.small} alone", rows[-1], log)
  if any(r["bound"] != "=" for rs in rows for r in rs):
    log("~: the mean holds a bound (>=: the smallest budget reached the target, <: the "
        "largest did not), not a measurement")


def _stats(rs, key):
  vals = [r[key] for r in rs.values()]
  return {"per_seed": {s: r[key] for s, r in rs.items()},
          "mean": float(np.mean(vals)), "spread": float(np.std(vals))}


def summary(results, grow_at, arms):
  """(points, alone): per growth point and arm, `saving` and `saving_without_small` per
  seed, their mean and spread (population standard deviation), and whether each is a
  bound; the small model alone's `saving` likewise (None where it was not run)."""
  out = {}
  for g in grow_at:
    for arm in arms:
      rs = {s: results[s]["points"][g][arm] for s in results}
      row = {"bound": {s: BOUND[r["bound"]] for s, r in rs.items()}}
      for k in ("saving", "saving_without_small"):
        row[k] = _stats(rs, k)
      out.setdefault(g, {})[arm] = row
  alone = None
  if all("small_alone" in r for r in results.values()):
    rs = {s: results[s]["small_alone"] for s in results}
    alone = {"bound": {s: BOUND[r["bound"]] for s, r in rs.items()},
             "saving": _stats(rs, "saving")}
  return out, alone


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  for a in FLAGS.arms:
    if a not in ARMS:
      raise UsageError(f"--arms: unknown arm {a!r}; use any of {', '.join(ARMS)}")
  for name, vals in (("grow_at", FLAGS.grow_at), ("budgets", FLAGS.budgets),
                     ("small_alone", FLAGS.small_alone)):
    try:
      ok = all(0 < float(v) <= 1 for v in vals) and (vals or name == "small_alone")
    except ValueError:
      ok = False
    if not ok:
      raise UsageError(f"--{name}={','.join(vals)}: fractions in (0, 1], comma-separated")
  devices = jax.devices()[:1]
  root = FLAGS.workdir
  os.makedirs(root, exist_ok=True)
  results, all_curves = {}, {}
  for seed in [int(s) for s in FLAGS.seeds]:
    results[seed], all_curves[seed] = run_seed(seed, root, devices, print)
  report(results)
  path = os.path.join(root, "bench_grow.json")
  with open(path, "w") as f:
    points, alone = summary(results, FLAGS.grow_at, FLAGS.arms)
    json.dump({"results": results, "summary": points, "small_alone": alone,
               "curves": all_curves,
               "flags": {k: FLAGS[k].value for k in (
                   "small", "big", "steps", "seq_len", "batch_size", "warmup", "eval_batches",
                   "arms", "grow_at", "budgets", "small_alone", "noise", "rewarmup", "rewind",
                   "rewarm", "seeds", "set", "small_set", "big_set")}}, f, indent=1)
  styles = {"scratch": "k-", "small": "g:", "restart": "r--", "carry": "b-", "stack": "m-",
            "carry_nb": "c-", "carry_rw": "y-", "small_alone": "g-"}
  first = next(iter(all_curves), None)   # one legend entry per run kind (the first seed's)
  series = {(name if seed == first else f"_{name} s{seed}"): (
      [p[0] / results[seed]["scratch"]["flops"] for p in pts], [p[1] for p in pts],
      styles[name.split()[0]] + "o")
      for seed, curves in all_curves.items() for name, pts in curves.items()}
  png = os.path.join(root, "bench_grow.png")
  metrics_lib.plot_lines(png, series, "cumulative training FLOPs / the scratch run's",
                         "held-out bits per byte",
                         title="growth vs scratch")
  print(f"wrote {path} and {png}")
  if FLAGS.json:
    print(json.dumps({"bench": "grow", "small": FLAGS.small, "big": FLAGS.big,
                      "steps": FLAGS.steps, "budgets": FLAGS.budgets,
                      "grow_at": points, "small_alone": alone}))


def entry():
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
