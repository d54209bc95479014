"""What growth saves: `python -m mmrec_jax.bench.grow [--steps=1000] [--small_frac=0.25]`.

Arms, per seed, on the same data order and tokenizer (every big run uses the
small run's tokenizer extended to the big vocabulary, and starts from a fresh
iterator of that seed):
- scratch: the big config (default configs/mini.py) trained `--steps` steps;
- grown, noise: the small config (configs/tiny.py) trained for `--small_frac` of
  the scratch run's FLOPs, grown into the big one with zero-sum noise
  (`--noise`), then trained `--steps` steps with a `--rewarmup` warmup;
- grown, no noise: the same with plain copies.

Prints, per arm: the FLOPs (the small model's training counted) needed to reach
the scratch run's final held-out bits per byte (interpolated between
evaluations; "not reached" otherwise) and the saving against scratch, the
held-out loss right after growth and the worst train loss in the first 200
steps after it; writes `<workdir>/bench_grow.json` and a plot of held-out loss
against cumulative FLOPs (`bench_grow.png`). FLOPs are analytic
(3 x `flops_per_token` x tokens per step).

Smoke test (a few minutes on 2 busy cores; the numbers mean nothing):
  python -m mmrec_jax.bench.grow --steps=4 --seeds=0 --eval_every=2 --workdir=/tmp/bg \
      --set=data.path=CORPUS --set=data.val_fraction=0.2 --set=train.seq_len=32 \
      --set=train.batch_size=2 --set=train.eval_batches=1 --set=model.chunk_size=8 \
      --set=model.mem_slots=2 --set=model.mem_levels=2 --small_set=model.vocab_size=270 \
      --small_set=model.d_model=16 --small_set=model.n_layers=2 --small_set=model.n_heads=2 \
      --big_set=model.vocab_size=290 --big_set=model.d_model=32 --big_set=model.n_layers=3 \
      --big_set=model.n_heads=2
Re-running resumes: finished runs are kept, unfinished ones resume.
"""
from __future__ import annotations

import json
import math
import os

import jax
from absl import flags
from absl import logging

from mmrec_jax import cli
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.data import pipeline as data_lib
from mmrec_jax.growth import workdir as grow_workdir_lib
from mmrec_jax.training import loop as loop_lib
from mmrec_jax.training import loss as loss_lib
from mmrec_jax.training import metrics as metrics_lib
from mmrec_jax import models
from mmrec_jax.growth import ladder as progressive
from mmrec_jax.training import sharding as shard_lib
from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.training import state as ts_lib

flags.DEFINE_string("small", "configs/tiny.py", "Config grown from.")
flags.DEFINE_string("big", "configs/mini.py", "Config grown into (and trained from scratch).")
flags.DEFINE_integer("steps", 1000, "Steps of the big model (scratch and after growth).")
flags.DEFINE_float("small_frac", 0.25, "Small model's training, as a fraction of the scratch "
                   "run's FLOPs.")
flags.DEFINE_float("noise", 0.05, "Zero-sum noise of the noisy grown arm.")
flags.DEFINE_float("rewarmup", 0.03, "Warmup after growth, as a fraction of --steps.")
flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds (train.seed of every run).")
flags.DEFINE_integer("eval_every", 50, "Steps between held-out evaluations.")
flags.DEFINE_multi_string("set", [], "SECTION.FIELD=VALUE for both configs.")
flags.DEFINE_multi_string("small_set", [], "SECTION.FIELD=VALUE for the small config only.")
flags.DEFINE_multi_string("big_set", [], "SECTION.FIELD=VALUE for the big config only.")
flags.DEFINE_string("workdir", "runs/bench_grow", "Where the runs and results go.")
FLAGS = flags.FLAGS


def flops_per_step(config):
  t = config.train
  return 3 * models.build(config.model).flops_per_token(t.seq_len) * t.batch_size * t.seq_len


def read_metrics(workdir):
  """(val records, train records) of a run's metrics.jsonl."""
  val, train = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      (val if r.get("split") == "val" else train).append(r)
  return val, train


def flops_to_reach(points, target):
  """First cumulative FLOPs at which bpb <= target (linear between evals); None if never."""
  prev = None
  for f, bpb in points:
    if bpb <= target:
      if prev is None or prev[1] == bpb:
        return f
      (f0, b0) = prev
      return f0 + (f - f0) * (b0 - target) / (b0 - bpb)
    prev = (f, bpb)
  return None


def held_out(config, workdir, devices):
  """Held-out metrics of a workdir's step-0 checkpoint (the loss right after growth)."""
  s = ts_lib.setup(config, devices)
  params, _ = ckpt_lib.restore_params(workdir, "latest")
  tok = data_lib.get_tokenizer(config, workdir)
  ds = data_lib.build(config, tok)
  batches = ds.val_batches(max_batches=config.train.eval_batches or None)
  params = jax.device_put(params, s.state_sharding.params)
  ev = loss_lib.evaluate(s.eval_step, params, batches,
                         put=lambda b: shard_lib.put_batch(b, s.mesh))
  return {k: float(v) for k, v in ev.items()}


def run_seed(seed, root, devices, log):
  common = list(FLAGS.set) + [f"train.seed={seed}", f"train.eval_every={FLAGS.eval_every}",
                              "train.samples=0", "train.early_stopping_patience=0"]
  big = progressive.stage_configs([FLAGS.big], [FLAGS.steps], common + list(FLAGS.big_set))[0]
  big = big.override({"checkpoint.every": FLAGS.steps})
  small = progressive.stage_configs([FLAGS.small], [1], common + list(FLAGS.small_set))[0]
  f_big, f_small = flops_per_step(big), flops_per_step(small)
  n_small = max(1, int(round(FLAGS.small_frac * FLAGS.steps * f_big / f_small)))
  small = small.override({"train.steps": n_small, "checkpoint.every": n_small})
  d = lambda name: os.path.join(root, f"seed{seed}", name)
  out = {}
  log(f"seed {seed}: scratch {big.model.name} {FLAGS.steps} steps ({f_big:.3g} FLOPs/step); "
      f"{small.model.name} {small.train.steps} steps ({f_small:.3g} FLOPs/step)")
  loop_lib.run(small, d("small"), devices=devices, quiet=True)
  # One tokenizer for every big arm: the small run's, extended (old ids keep their meaning).
  tok_path = os.path.join(root, f"seed{seed}", "big_tokenizer.json")
  if not os.path.isfile(tok_path):
    old_tok = tokenizer_lib.load_tokenizer(os.path.join(d("small"), "tokenizer.json"))
    tokenizer_lib.save_tokenizer(grow_workdir_lib.big_tokenizer(old_tok, big), tok_path)
  big = big.override({"data.tokenizer": tok_path})
  loop_lib.run(big, d("scratch"), devices=devices, quiet=True)
  val, _ = read_metrics(d("scratch"))
  target = val[-1]["bits_per_byte"]
  curves = {"scratch": [(r["step"] * f_big, r["bits_per_byte"], r["loss"]) for r in val]}
  sval, _ = read_metrics(d("small"))
  small_flops = small.train.steps * f_small
  curves["small"] = [(r["step"] * f_small, r["bits_per_byte"], r["loss"]) for r in sval]
  for arm, noise in (("grown_noise", FLAGS.noise), ("grown_plain", 0.0)):
    g = big.override({"train.warmup_steps": max(1, int(round(FLAGS.rewarmup * FLAGS.steps)))})
    after_path = os.path.join(root, f"seed{seed}", f"{arm}_after_growth.json")
    if not progressive.has_checkpoint(d(arm)):
      diff = grow_workdir_lib.grow_workdir(d("small"), g, d(arm), noise=noise, seed=seed,
                               log=lambda *a: None, devices=devices)
      after = dict(held_out(g, d(arm), devices), grow_logit_diff=diff)
      with open(after_path, "w") as f:
        json.dump(after, f)
    with open(after_path) as f:
      after = json.load(f)
    diff = after["grow_logit_diff"]
    loop_lib.run(g, d(arm), devices=devices, quiet=True)
    val, train = read_metrics(d(arm))
    pts = [(small_flops, after["bits_per_byte"], after["loss"])]
    pts += [(small_flops + r["step"] * f_big, r["bits_per_byte"], r["loss"]) for r in val]
    curves[arm] = pts
    worst = max((r["loss"] for r in train if r["step"] <= 200), default=float("nan"))
    out[arm] = {"loss_after_growth": after["loss"], "bpb_after_growth": after["bits_per_byte"],
                "worst_train_loss_first_200": worst, "grow_logit_diff": diff,
                "flops_to_target": flops_to_reach([(f, b) for f, b, _ in pts], target)}
  scratch_pts = [(f, b) for f, b, _ in curves["scratch"]]
  out["scratch"] = {"flops_to_target": flops_to_reach(scratch_pts, target),
                    "final_bpb": target}
  out["small"] = {"steps": small.train.steps, "flops": small_flops,
                  "final_bpb": sval[-1]["bits_per_byte"] if sval else None}
  return out, curves


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  devices = jax.devices()[:1]
  root = FLAGS.workdir
  os.makedirs(root, exist_ok=True)
  results, all_curves = {}, {}
  for seed in [int(s) for s in FLAGS.seeds.split(",") if s]:
    results[seed], all_curves[seed] = run_seed(seed, root, devices, print)
  print(f"\n{'arm':<14}{'seed':>5}{'FLOPs to scratch bpb':>22}{'saving':>9}"
        f"{'loss after growth':>19}{'worst loss, 200 steps':>23}")
  for seed, r in results.items():
    base = r["scratch"]["flops_to_target"]
    for arm in ("scratch", "grown_noise", "grown_plain"):
      f = r[arm]["flops_to_target"]
      saving = f"{100 * (1 - f / base):.0f}%" if f and base else "-"
      fl = f"{f:.3g}" if f else "not reached"
      after = r[arm].get("loss_after_growth")
      worst = r[arm].get("worst_train_loss_first_200")
      print(f"{arm:<14}{seed:>5}{fl:>22}{saving:>9}"
            f"{(f'{after:.4f}' if after is not None else '-'):>19}"
            f"{(f'{worst:.4f}' if worst is not None else '-'):>23}")
  with open(os.path.join(root, "bench_grow.json"), "w") as f:
    json.dump({"results": results, "curves": all_curves, "flags": {
        k: FLAGS[k].value for k in ("small", "big", "steps", "small_frac", "noise", "rewarmup",
                                    "seeds", "set", "small_set", "big_set")}}, f, indent=1)
  series = {}
  for seed, curves in all_curves.items():
    for arm, pts in curves.items():
      style = {"scratch": "k-", "small": "g:", "grown_noise": "b-", "grown_plain": "r--"}[arm]
      series[f"{arm} s{seed}"] = ([p[0] for p in pts], [p[1] for p in pts], style + "o")
  path = os.path.join(root, "bench_grow.png")
  # bits per byte, not loss per token: the small model's tokenizer is not the big one's
  metrics_lib.plot_lines(path, series, "cumulative training FLOPs", "held-out bits per byte",
                         title="growth vs scratch")
  print(f"wrote {os.path.join(root, 'bench_grow.json')} and {path}")
  if any(math.isnan(r["grown_noise"]["worst_train_loss_first_200"]) for r in results.values()):
    print("note: no train loss logged in the first 200 steps after growth")


if __name__ == "__main__":
  cli.run(main)
