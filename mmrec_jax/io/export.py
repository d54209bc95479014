"""Export a checkpoint as a portable folder.

    python -m mmrec_jax.export --workdir=runs/tiny --out=exported/tiny [--checkpoint=best]

The folder holds `model.safetensors` (float arrays named by their '/'-joined
parameter path, e.g. `blocks/fused/dense/kernel`; layers stacked on axis 0),
`config.json` (the model section, tokenizer ids, train.seq_len, the source
step) and `tokenizer.json`. It loads back with `mmrec_jax.load(DIR)` and is
readable without JAX:

    from safetensors.numpy import load_file
    weights = load_file("exported/tiny/model.safetensors")

An existing non-empty `--out` is replaced only with `--force`, and only if it
holds a previous export and nothing else (`workdir.guard_replace`: never a
training workdir, a checkpoint folder, a folder containing or inside one, the
current or home directory); the folder is written to a temp dir beside it and
renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np


from mmrec_jax.io import loading as load_lib
from mmrec_jax.io import workdir as workdir_lib
from mmrec_jax.errors import LoadError


def export(workdir, out, checkpoint="best", force=False):
  """Writes the folder `out` from `workdir`'s checkpoint; returns the config dict written."""
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from mmrec_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  shown, out = out, os.path.abspath(out)
  if os.path.realpath(workdir) == os.path.realpath(out):
    raise LoadError("--out must differ from --workdir; pass a new folder for --out")
  workdir_lib.guard_replace(shown, kind="export", flag="--out")   # even without --force
  if os.path.isdir(out) and os.listdir(out) and not force:
    raise LoadError(f"--out={shown} holds a previous export; pass --force to replace it")
  _, variables, tok, config = load_lib.load(workdir, checkpoint)
  flat = {k: np.ascontiguousarray(jax.device_get(v))
          for k, v in load_lib.flatten(variables["params"]).items()}
  # bfloat16 has no numpy dtype: stored as float32 (exact), cast back on load.
  flat = {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in flat.items()}
  meta = {
      "format": load_lib.EXPORT_FORMAT,
      "model": config.model.to_dict(),
      "tokenizer": {"vocab_size": tok.get_vocab_size(), "eod": tok_lib.EOD,
                    "eod_id": tok.token_to_id(tok_lib.EOD), "pad": tok_lib.PAD,
                    "pad_id": tok.token_to_id(tok_lib.PAD)},
      "train": {"seq_len": int(config.train.seq_len)},
      "source": {"workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint),
                 "step": None if config.loaded_step is None else int(config.loaded_step)},
      "params": int(sum(v.size for v in flat.values())),
  }
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=parent)
  try:
    save_file(flat, os.path.join(tmp, load_lib.WEIGHTS_FILE), metadata={"format": "np"})
    with open(os.path.join(tmp, load_lib.CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    tok.save(os.path.join(tmp, load_lib.TOKENIZER_FILE))
    os.chmod(tmp, 0o755)
    for name in os.listdir(tmp):
      os.chmod(os.path.join(tmp, name), 0o644)
    old = None
    if os.path.lexists(out):
      workdir_lib.guard_replace(shown, kind="export", flag="--out")  # again, just before
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old", dir=parent)
      os.rename(out, os.path.join(old, "x"))
    os.rename(tmp, out)
    if old:
      shutil.rmtree(old)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return meta
