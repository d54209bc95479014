"""Will a run fit, and how fast will it go? Plans a training run before renting devices.

    python -m mmrec_jax.plan --config=7b --devices=64 --device_kind=H100
        [--mesh=data:1,fsdp:-1,tensor:1 --batch_size=512 --seq_len=2048 --mfu=0.4
         --config.model.remat=full --config.train.grad_accum=8]
    python -m mmrec_jax.plan --config=7b --devices=8,64,256 --mesh=data:1,fsdp:-1,tensor:1

Lowers and compiles the train step for `--devices` devices without allocating any
parameter: abstract shapes on that many host (CPU) devices, so it runs on a laptop.
Prints per-device memory for the parameters and the optimizer state (from their
shardings) and for the activations and other temporaries (the compiled program's
memory analysis), the FLOPs of a step, and the step time and tokens/s at the
device's bf16 peak and `--mfu`; says plainly when it does not fit the device's
memory and what to change. Several device counts plan the same load per device
(the batch grows with the count) and print the per-device memory at each: it
should stay flat, and a growth is reported as a defect.

The step compiles as it trains: with a rolled layer loop (`model.scan_layers`, the
default) the compile time does not depend on depth (a 7B model for 256 devices
compiles in about a minute here) and the memory is the run's. `--n_layers=K`
compiles K and K+1 unrolled layers instead and extrapolates per layer (XLA then
schedules the unrolled layers' weight gathers together, so the figure is an upper
bound). The memory analysis is of the program XLA compiles for host CPUs:
temporaries on a TPU or GPU differ (other fusion, bf16 kept native), so treat
activations as an estimate with ~20% headroom.
"""
from __future__ import annotations

import os
import re
import sys
import time

_DEVICES_ENV = "MMREC_PLAN_DEVICES"


def _reexec_with_devices():
  """The host device count must be set before JAX starts: run again with it set."""
  n = None
  for i, a in enumerate(sys.argv[1:], 1):
    value = a.split("=", 1)[1] if a.startswith("--devices=") else (
        sys.argv[i + 1] if a == "--devices" and i + 1 < len(sys.argv) else None)
    if value is not None and re.fullmatch(r"\d+(,\d+)*", value):
      n = max(int(v) for v in value.split(","))
  if n is None or os.environ.get(_DEVICES_ENV) == str(n):
    return
  xla = [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{_DEVICES_ENV: str(n)},
             XLA_FLAGS=" ".join(xla + [f"--xla_force_host_platform_device_count={n}"]))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.execve(sys.executable, [sys.executable, "-m", "mmrec_jax.plan", *sys.argv[1:]], env)


if __name__ == "__main__":
  _reexec_with_devices()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmrec_jax import cli  # noqa: E402
from mmrec_jax import config as config_lib  # noqa: E402
from mmrec_jax import models  # noqa: E402
from mmrec_jax.training import sharding as shard_lib  # noqa: E402
from mmrec_jax.training import state as ts_lib  # noqa: E402
from mmrec_jax.errors import ConfigError, UsageError  # noqa: E402

# Per device: memory in bytes, dense bf16 peak FLOP/s (vendor figures).
DEVICES = {
    "H100": (80e9, 989e12), "H200": (141e9, 989e12), "A100": (80e9, 312e12),
    "B200": (180e9, 2250e12), "v5p": (95e9, 459e12), "v4": (32e9, 275e12),
    "v5e": (16e9, 197e12), "v6e": (32e9, 918e12),
}
HEADROOM = 0.9   # plan to use at most this much of a device's memory
GB = 1e9


def parse_mesh(text):
  """'data:1,fsdp:64,tensor:1[,dcn_data:2]' -> {axis: size}."""
  out = {}
  allowed = shard_lib.MESH_AXES + shard_lib.DCN_AXES
  for part in filter(None, text.split(",")):
    name, _, size = part.partition(":")
    if name not in allowed or not re.fullmatch(r"-?\d+", size):
      raise UsageError(f"--mesh={text!r}: each part is AXIS:SIZE with AXIS one of "
                       f"{', '.join(allowed)}, e.g. data:1,fsdp:64,tensor:1")
    out[name] = int(size)
  return out


def shard_bytes(tree):
  """Bytes per device of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return total


def compile_step(config, devices):
  """Compiles the train step on abstract inputs: sizes in bytes per device and FLOPs."""
  s = ts_lib.setup(config, devices)
  t = config.train
  bsh = shard_lib.batch_sharding(s.mesh)
  shapes = {"inputs": jnp.int32, "targets": jnp.int32, "reset": jnp.bool_,
            "mask": jnp.float32}
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), dt, sharding=bsh)
           for k, dt in shapes.items()}
  t0 = time.perf_counter()
  compiled = s.train_step.lower(s.abstract_state, batch).compile()
  secs = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "params": shard_bytes(s.abstract_state.params),
      "opt_state": shard_bytes(s.abstract_state.opt_state),
      "batch": shard_bytes(batch),
      "temp": int(mem.temp_size_in_bytes),
      "code": int(mem.generated_code_size_in_bytes),
      "flops": float(cost.get("flops", 0.0)),
      "compile_s": secs, "setup": s,
  }


def plan(config, n_devices, device_kind, mfu, n_layers=0, log=print):
  """Compiles (or extrapolates) and returns the figures as a dict; `log` gets progress."""
  if device_kind not in DEVICES:
    raise UsageError(f"--device_kind={device_kind!r}: one of {', '.join(DEVICES)}")
  devices = jax.devices()
  if len(devices) < n_devices:
    raise UsageError(f"{len(devices)} host devices but --devices={n_devices}; run as "
                     "python -m mmrec_jax.plan (it sets the host device count)")
  devices = devices[:n_devices]
  L, t = config.model.n_layers, config.train
  if n_layers and n_layers >= L:
    n_layers = 0
  full = None
  if n_layers:
    runs = []
    for k in (n_layers, n_layers + 1):
      c = config.override({"model.n_layers": k, "model.scan_layers": False})
      log(f"compiling the train step with {k} layer(s) for {n_devices} devices ...")
      runs.append(compile_step(c, devices))
      log(f"  {k} layer(s): temporaries {runs[-1]['temp'] / GB:.2f} GB, "
          f"{runs[-1]['flops']:.3e} FLOPs per device, {runs[-1]['compile_s']:.0f} s")
    a, b = runs
    # XLA's buffer reuse can make K+1 layers need fewer temporaries than K: then the
    # larger figure plus nothing per layer (a lower bound, said in the report).
    per_layer = {k: max(b[k] - a[k], 0) for k in ("temp", "flops")}
    est = {k: max(a[k], b[k]) + (L - n_layers - 1) * per_layer[k] for k in ("temp", "flops")}
    shrank = b["temp"] < a["temp"]
    compile_s = a["compile_s"] + b["compile_s"]
    code = b["code"]
    full = ts_lib.setup(config, devices)
    params = shard_bytes(full.abstract_state.params)
    opt_state = shard_bytes(full.abstract_state.opt_state)
    batch_b = a["batch"]
  else:
    c = config   # as it trains: a rolled layer loop compiles in a time independent of depth
    log(f"compiling the train step ({L} layers"
        f"{', rolled' if c.model.scan_layers else ''}) for {n_devices} devices ...")
    r = compile_step(c, devices)
    est = {"temp": r["temp"], "flops": r["flops"]}
    compile_s, code, params, opt_state, batch_b = (r["compile_s"], r["code"], r["params"],
                                                   r["opt_state"], r["batch"])
    full = r["setup"]
    shrank = False
  tokens = t.batch_size * t.seq_len
  p = {
      "devices": n_devices, "mfu": mfu, "mesh": dict(full.mesh.shape), "n_params": sum(
          int(np.prod(x.shape)) for x in jax.tree.leaves(full.abstract_state.params)),
      "params": params, "opt_state": opt_state, "batch": batch_b, "activations": est["temp"],
      "code": code, "total": params + opt_state + batch_b + est["temp"] + code,
      # the microbatch loop's body is counted once by the cost analysis
      "compiled_flops": est["flops"] * n_devices * t.grad_accum,
      "model_flops": ts_lib.flops_per_token_train(full, t.seq_len) * tokens,  # whole step
      "tokens": tokens, "compile_s": compile_s, "extrapolated": bool(n_layers),
      "lower_bound": shrank, "remat": config.model.remat, "grad_accum": t.grad_accum,
      "rolled": bool(config.model.scan_layers) and not n_layers,
      "rows_per_device": t.batch_size / t.grad_accum / (full.mesh.shape["data"]
                                                         * full.mesh.shape["fsdp"]),
  }
  return on_device(p, device_kind)


def on_device(p, device_kind):
  """The plan's figures for one kind of device: memory verdict, step time, tokens/s."""
  if device_kind not in DEVICES:
    raise UsageError(f"--device_kind={device_kind!r}: one of {', '.join(DEVICES)}")
  hbm, peak = DEVICES[device_kind]
  step_s = p["model_flops"] / (p["devices"] * peak * p["mfu"])
  return dict(p, device_kind=device_kind, hbm=hbm, peak=peak,
              fits=p["total"] <= HEADROOM * hbm, step_s=step_s,
              tokens_per_s=p["tokens"] / step_s)


def suggestions(p, config):
  """What would make a plan that does not fit fit (one line each)."""
  out, budget = [], HEADROOM * p["hbm"]
  state = p["params"] + p["opt_state"]
  mesh = p["mesh"]
  if state > 0.5 * budget:
    shards = mesh["fsdp"] * mesh["tensor"]
    need = int(np.ceil(state * shards / (0.5 * budget)))
    out.append(f"parameters + optimizer state take {state / GB:.1f} GB per device: shard "
               f"them over more devices (fsdp x tensor = {shards} now; at least {need}), "
               "e.g. --mesh=data:1,fsdp:-1,tensor:1 or more devices")
  act = p["activations"]
  room = budget - state - p["batch"] - p["code"]
  if act > max(room, 0):
    if p["remat"] in ("none", "dots_no_batch", "dots"):
      out.append(f"activations take {act / GB:.1f} GB per device: recompute them in the "
                 "backward pass, --config.model.remat=full")
    rows = p.get("rows_per_device", 1)   # sequences per device per microbatch
    k = int(2 ** np.ceil(np.log2(act / room))) if room > 0 else rows * 2
    if rows >= 2 and room > 0:
      k = min(k, int(rows))
      out.append(f"or split the batch into microbatches: --config.train.grad_accum="
                 f"{p['grad_accum'] * k} (activations / about {k})")
    else:
      out.append(f"one sequence per device already: lower --seq_len (activations grow at "
                 f"least linearly with it) or shard activations with tensor parallelism, "
                 f"e.g. --mesh=data:1,fsdp:{max(mesh['fsdp'] // 4, 1)},tensor:4")
  return out or ["lower --batch_size or --seq_len, or use more devices"]


def report(p, config, log=print):
  mesh = ", ".join(f"{k} {v}" for k, v in p["mesh"].items())
  how = " (per-layer extrapolation)" if p["extrapolated"] else ""
  n = p["n_params"]
  size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
  log(f"{config.model.name}: {size} parameters; {p['devices']} x "
      f"{p['device_kind']} ({p['hbm'] / GB:.0f} GB, {p['peak'] / 1e12:.0f} TFLOP/s bf16); "
      f"mesh {mesh}; batch {config.train.batch_size} x {config.train.seq_len} tokens, "
      f"remat {p['remat']}, grad_accum {p['grad_accum']}")
  log(f"memory per device{how}:")
  for name, key in (("parameters", "params"), ("optimizer state", "opt_state"),
                    ("activations and temporaries", "activations"), ("batch", "batch"),
                    ("code", "code")):
    log(f"  {name:<29}{p[key] / GB:9.2f} GB")
  if p.get("lower_bound"):
    log("  (activations: a lower bound; the compiled program needed fewer temporaries with "
        "one more layer; --n_layers=0 compiles every layer for the exact figure)")
  verdict = "fits" if p["fits"] else "DOES NOT FIT"
  log(f"  {'total':<29}{p['total'] / GB:9.2f} GB of {p['hbm'] / GB:.0f} GB: {verdict} "
      f"(planning to {HEADROOM:.0%})")
  if p.get("rolled"):
    log(f"FLOPs per step: {p['model_flops']:.3e} from flops_per_token (3 x forward; the "
        "compiled rolled layer loop's cost analysis counts its body once)")
  else:
    ratio = p["compiled_flops"] / p["model_flops"] if p["model_flops"] else float("nan")
    log(f"FLOPs per step: {p['model_flops']:.3e} from flops_per_token (3 x forward); the "
        f"compiled step does {p['compiled_flops']:.3e} ({ratio:.2f}x: recomputation, "
        "non-matmul ops, loops counted once)")
  log(f"at {p['mfu']:.0%} MFU: {p['step_s']:.2f} s per step, {p['tokens_per_s']:,.0f} tokens/s "
      f"({p['tokens_per_s'] / p['devices']:,.0f} per device); compiled in "
      f"{p['compile_s']:.0f} s")
  if not p["fits"]:
    for s in suggestions(p, config):
      log(f"  to fit: {s}")


FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", None, cli.config_help("mmrec_jax.plan",
                                                                  "configs/7b.py"),
                                  lock_config=False)
  flags.DEFINE_string("devices", None, "Devices to plan for: one count, or several "
                      "(e.g. 8,64,256: the same load per device, the batch grown with the "
                      "count; the mesh needs an axis of -1).")
  flags.DEFINE_string("mesh", "", "data:N,fsdp:N,tensor:N[,dcn_data:N,dcn_fsdp:N] "
                      "(default: the config's mesh).")
  flags.DEFINE_integer("batch_size", 0, "Global batch size (default: the config's).")
  flags.DEFINE_integer("seq_len", 0, "Sequence length (default: the config's).")
  flags.DEFINE_string("device_kind", "H100", f"One of {', '.join(DEVICES)}; several, "
                      "comma-separated, report each from one compile.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
  flags.DEFINE_integer("n_layers", -1, "Compile K and K+1 unrolled layers and extrapolate "
                       "(0: the whole model as configured; -1: the whole model with a rolled "
                       "layer loop, else 2 for models of over a billion parameters).")
  flags.mark_flags_as_required(["config", "devices"])


def device_counts(text):
  """'8,64,256' -> [8, 64, 256] (UsageError naming the flag otherwise)."""
  if not re.fullmatch(r"\d+(,\d+)*", text or ""):
    raise UsageError(f"--devices={text!r}: one device count or several, comma-separated "
                     "(e.g. --devices=64 or --devices=8,64,256)")
  counts = [int(v) for v in text.split(",")]
  if min(counts) < 1:
    raise UsageError(f"--devices={text}: every count must be >= 1")
  return counts


def auto_layers(config):
  """Layers compiled before extrapolating: none with a rolled layer loop (it compiles in
  a time independent of depth, and its memory is what a run uses); unrolled, 2 for a
  model of over a billion parameters (a 7B model compiles in minutes that way)."""
  if config.model.scan_layers:
    return 0
  n = models.count_params(models.param_shapes(models.build(config.model)))
  return 2 if n > 1e9 and config.model.n_layers > 3 else 0


def main(argv):
  del argv
  counts = device_counts(FLAGS.devices)
  over = {f"mesh.{k}": v for k, v in parse_mesh(FLAGS.mesh).items()}
  if FLAGS.batch_size:
    over["train.batch_size"] = FLAGS.batch_size
  if FLAGS.seq_len:
    over["train.seq_len"] = FLAGS.seq_len
  if not 0 < FLAGS.mfu <= 1:
    raise UsageError(f"--mfu={FLAGS.mfu} must be in (0, 1]")
  base = config_lib.validate(FLAGS.config).override(over)
  if len(counts) > 1 and -1 not in [getattr(base.mesh, a) for a in shard_lib.MESH_AXES]:
    raise UsageError("several --devices need a mesh axis that takes the rest of the devices, "
                     "e.g. --mesh=data:1,fsdp:-1,tensor:1")
  kinds = FLAGS.device_kind.split(",")
  for k in kinds:
    if k not in DEVICES:
      raise UsageError(f"--device_kind={k!r}: one of {', '.join(DEVICES)}")
  n_layers = auto_layers(base) if FLAGS.n_layers < 0 else FLAGS.n_layers
  rows = []
  for n in counts:
    # the same load per device: the batch grows with the devices
    c = base.override({"train.batch_size": base.train.batch_size * n // counts[0]})
    try:
      shard_lib.mesh_shape(c.mesh, n)
    except ConfigError as e:   # name the flag this command takes for the mesh
      raise ConfigError(str(e).replace("set --config.mesh.data=-1", "pass e.g. "
                                       "--mesh=data:-1,fsdp:1,tensor:1 (-1: the rest)")) from None
    if len(jax.devices()) < n:
      raise ConfigError(f"only {len(jax.devices())} host devices; run python -m mmrec_jax.plan")
    p = plan(c, n, kinds[0], FLAGS.mfu, n_layers)
    for i, k in enumerate(kinds):
      print()
      report(on_device(p, k), c)
    rows.append((n, c, p))
  if len(rows) > 1:
    scaling(rows)


def scaling(rows, log=print):
  """The per-device memory at each device count (the same load per device), and a
  defect when it grows with the count."""
  log("\nper-device memory at the same load per device:")
  log(f"  {'devices':>8} {'mesh':<28} {'batch':>7} {'params+opt GB':>14} "
      f"{'activations GB':>15} {'total GB':>9}")
  for n, c, p in rows:
    mesh = ",".join(f"{k}:{v}" for k, v in p["mesh"].items())
    log(f"  {n:>8} {mesh:<28} {c.train.batch_size:>7} "
        f"{(p['params'] + p['opt_state']) / GB:>14.2f} {p['activations'] / GB:>15.2f} "
        f"{p['total'] / GB:>9.2f}")
  first, last = rows[0][2]["activations"] + rows[0][2]["batch"], rows[-1][2]["activations"] + rows[-1][2]["batch"]
  if last > 1.1 * first:
    log(f"DEFECT: activations and temporaries per device grow with the device count at the "
        f"same load per device ({first / GB:.2f} GB at {rows[0][0]} devices, {last / GB:.2f} "
        f"GB at {rows[-1][0]}): some activation is not sharded over the batch")
  else:
    log(f"activations and temporaries per device are flat in the device count "
        f"({first / GB:.2f} GB at {rows[0][0]} devices, {last / GB:.2f} GB at {rows[-1][0]})")


def entry():
  _reexec_with_devices()   # as `mmrec-plan` too: JAX's backend has not started yet
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
