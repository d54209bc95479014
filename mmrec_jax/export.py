"""Export a checkpoint as a portable folder: `python -m mmrec_jax.export --workdir=runs/tiny --out=DIR`.

The folder holds model.safetensors, config.json and tokenizer.json, readable
without JAX (`mmrec_jax.io.export`).
"""
from __future__ import annotations

import os

from absl import flags

from mmrec_jax import cli as cli_lib
from mmrec_jax.io.export import export

def main(argv):
  del argv
  f = flags.FLAGS
  meta = export(f.workdir, f.out, f.checkpoint, f.force)
  print(f"exported step {meta['source']['step']} ({meta['params']:,} params) to "
        f"{os.path.abspath(f.out)}")


def entry():
  flags.DEFINE_string("workdir", None, "Training workdir (or an exported folder).")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_string("checkpoint", "best", "best | latest | STEP.")
  flags.DEFINE_bool("force", False, "Replace --out if it holds a previous export (and only "
                    "then).")
  flags.mark_flags_as_required(["workdir", "out"])
  cli_lib.run(main)


if __name__ == "__main__":
  entry()
