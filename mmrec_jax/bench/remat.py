"""What each rematerialisation policy keeps for the backward pass, and that none
changes the numbers.

    python -m mmrec_jax.bench.remat --config=small --batch=32 --seq_len=2048
        [--policies=none,dots,projections,full] [--check_batch=2 --check_seq_len=128]

Per policy (`model.remat`): the train step compiled from abstract shapes at
--batch x --seq_len on one device (nothing allocated, any backend) and its
temporaries per training token from the compiled program's `memory_analysis()` —
what the backward pass keeps plus scratch — with the ratio to `none`. Then, at
--check_batch x --check_seq_len, one real train step from the same parameters and
batch under every policy: the loss and the largest parameter difference after the
step against `none` (a policy decides what is stored or recomputed, never the math).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from mmrec_jax import bench
from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax.errors import UsageError
from mmrec_jax.models import layers

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when it runs: importing this module defines none)."""
  config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                  "config file (or a shipped config's name, e.g. small)")
  flags.DEFINE_integer("batch", 4, "Rows of the compiled step.")
  flags.DEFINE_integer("seq_len", 512, "Tokens per row of the compiled step.")
  flags.DEFINE_list("policies", ["none", "dots", "projections", "full"],
                    f"model.remat policies compared ({', '.join(layers.REMAT_POLICIES)}).")
  flags.DEFINE_integer("check_batch", 2, "Rows of the step run under every policy.")
  flags.DEFINE_integer("check_seq_len", 128, "Tokens per row of the step run under every policy.")


def temporaries(c, policy, batch, seq_len):
  """(bytes of temporaries, compile seconds) of the train step under `policy`."""
  from mmrec_jax import plan  # pylint: disable=import-outside-toplevel
  c = c.override({"model.remat": policy, "train.batch_size": batch, "train.seq_len": seq_len,
                  "train.grad_accum": 1, "model.max_seq_len": max(c.model.max_seq_len, seq_len),
                  "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
  r = plan.compile_step(c, jax.devices()[:1])
  return r["temp"], r["compile_s"]


def one_step(c, policy, batch, seq_len):
  """(loss, parameters after one step) under `policy`, same init and batch for all."""
  c = c.override({"model.remat": policy, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
                  "train.grad_accum": 1})
  _, state, b, compiled, _ = bench.compiled_train_step(c, batch, seq_len)
  state, m = compiled(state, b)
  return float(m["loss"]), jax.device_get(state.params)


def main(argv):
  del argv
  for p in FLAGS.policies:
    if p not in layers.REMAT_POLICIES:
      raise UsageError(f"--policies: unknown policy {p!r}; use any of "
                       f"{', '.join(layers.REMAT_POLICIES)}")
  c = config_lib.typed(FLAGS.config)
  tokens = FLAGS.batch * FLAGS.seq_len
  print(f"model {c.model.name} ({c.model.kind}), {FLAGS.batch} x {FLAGS.seq_len} on one "
        f"{jax.devices()[0].device_kind}, dtype {c.model.dtype}")
  print(f"{'policy':<12} {'bytes/token':>12} {'GB':>8} {'vs none':>8} {'compile s':>10}")
  base = None
  for p in FLAGS.policies:
    temp, secs = temporaries(c, p, FLAGS.batch, FLAGS.seq_len)
    base = temp if p == "none" else base
    ratio = f"{temp / base:.3f}" if base else "-"
    print(f"{p:<12} {temp / tokens:>12,.0f} {temp / 1e9:>8.3f} {ratio:>8} {secs:>10.1f}",
          flush=True)
  print(f"one step at {FLAGS.check_batch} x {FLAGS.check_seq_len}, against "
        f"{FLAGS.policies[0]}:")
  ref_loss, ref_params = one_step(c, FLAGS.policies[0], FLAGS.check_batch, FLAGS.check_seq_len)
  for p in FLAGS.policies[1:]:
    loss, params = one_step(c, p, FLAGS.check_batch, FLAGS.check_seq_len)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    print(f"{p:<12} loss {loss:.7f} (diff {abs(loss - ref_loss):.1e}), "
          f"largest parameter difference after the step {diff:.1e}", flush=True)


def entry():
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
