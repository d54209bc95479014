"""Load a trained model for research: `from mmrec_jax import load`.

    model, variables, tokenizer, config = load("runs/tiny", checkpoint="best")
    logits_BTV, state, aux = model.apply(variables, tokens_BT)

`path` is a training workdir (Orbax checkpoints + config.json + tokenizer.json)
or a folder written by `mmrec_jax.export` (model.safetensors + config.json +
tokenizer.json). Only JSON, safetensors and Orbax array files are read: nothing
is unpickled or executed. Parameter shapes are checked against the config.

`mmrec_jax.load` is `mmrec_jax.io.loading.load`, imported lazily.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.data import tokenizer as tok_lib
from mmrec_jax.errors import ConfigError, DataError, LoadError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FORMAT = "mmrec_jax.export/1"


def flatten(tree):
  """{'a': {'b': x}} -> {'a/b': x} (the parameter names of exports)."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat):
  """{'a/b': x} -> {'a': {'b': x}}."""
  return traverse_util.unflatten_dict(flat, sep="/")


def is_export(path):
  return os.path.isfile(os.path.join(path, WEIGHTS_FILE))


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise LoadError(f"cannot read {path}: {str(e)[:200]}") from None


@dataclasses.dataclass(frozen=True)
class LoadedConfig(config_lib.Config):
  """A loaded run's config, with the checkpoint step its parameters come from
  (None for an export of an unknown step) and whether it is an export's (whose
  data section is not the run's)."""
  loaded_step: int | None = None
  is_export: bool = False


def read_config(path):
  """The typed config of a workdir or export (LoadError naming the problem). An
  export's config.json holds the model section and the training length."""
  if not os.path.isdir(path):
    raise LoadError(f"{path!r} is not a directory; pass a training workdir or an exported folder")
  cpath = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cpath):
    raise LoadError(f"{cpath} not found; {path!r} is not a training workdir or exported folder")
  d = _read_json(cpath)
  if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
    raise LoadError(f"{cpath} has no 'model' section")
  if d.get("format") == EXPORT_FORMAT:
    d = {"model": d["model"], "train": {"seq_len": int(d.get("train", {}).get("seq_len", 512))}}
    d["model"]["max_seq_len"] = max(int(d["model"].get("max_seq_len", 0)), d["train"]["seq_len"])
  try:
    return config_lib.from_dict(d, saved=True)
  except ConfigError as e:
    raise LoadError(f"{cpath}: bad config ({e})") from None


def _read_tokenizer(path, vocab_size):
  tpath = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(tpath):
    raise LoadError(f"{tpath} not found; the run directory is incomplete")
  try:
    return tok_lib.check_tokenizer(tok_lib.load_tokenizer(tpath), vocab_size, tpath)
  except DataError as e:
    raise LoadError(str(e)) from None


def _read_params(path, checkpoint):
  """(params, step) from an export or an Orbax workdir."""
  if is_export(path):
    meta = _read_json(os.path.join(path, CONFIG_FILE))
    try:
      flat = load_file(os.path.join(path, WEIGHTS_FILE))
    except Exception as e:  # pylint: disable=broad-except
      raise LoadError(f"cannot read {path}/{WEIGHTS_FILE}: {str(e)[:200]}") from None
    return unflatten(flat), meta.get("source", {}).get("step")
  if not os.path.isdir(ckpt_lib.checkpoint_dir(path)):
    raise LoadError(f"no checkpoints in {path!r}; train first (python -m mmrec_jax.train)")
  if checkpoint not in ("best", "latest"):
    try:
      checkpoint = int(checkpoint)
    except ValueError:
      raise LoadError(f"checkpoint={checkpoint!r}: use best, latest or a step number") from None
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)   # Orbax's read-only notices
  try:
    params, step = ckpt_lib.restore_params(path, checkpoint)
  except LoadError:
    raise
  except (ValueError, FileNotFoundError) as e:
    raise LoadError(f"{path}: {' '.join(str(e).split())[:300]}") from None
  finally:
    absl_log.setLevel(level)
  return params, step


def check_shapes(params, model):
  """LoadError naming the first parameter whose name or shape differs from `model`'s."""
  want = {k: tuple(v.shape) for k, v in flatten(models.param_shapes(model)).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  for k in sorted(set(want) | set(got)):
    if k not in got:
      raise LoadError(f"checkpoint lacks parameter {k!r}; it is from an incompatible model")
    if k not in want:
      raise LoadError(f"checkpoint has unexpected parameter {k!r}; it is from an "
                      "incompatible model")
    if want[k] != got[k]:
      raise LoadError(f"parameter {k!r} has shape {got[k]} in the checkpoint but {want[k]} "
                      "in config.json; the checkpoint is from an incompatible model")


def load(path, checkpoint="best"):
  """(model, variables, tokenizer, config) from a workdir or an exported folder.

  Args:
    path: training workdir or `mmrec_jax.export` output folder.
    checkpoint: 'best' | 'latest' | step (workdirs only; ignored for exports).
  Returns:
    model: the Flax module (`models.build(config.model)`);
    variables: {'params': ...} of jax arrays; tokenizer: `tokenizers.Tokenizer`; config: the run's typed config
      (`LoadedConfig`: `config.loaded_step` is the checkpoint's step).
  Raises:
    LoadError: missing files, bad config, or parameters that do not fit it.
  """
  path = os.fspath(path)
  cfg = read_config(path)
  model = models.build(cfg.model)
  tok = _read_tokenizer(path, model.cfg.vocab_size)
  params, step = _read_params(path, checkpoint)
  check_shapes(params, model)
  params = jax.tree.map(lambda x: jnp.asarray(x, model.cfg.params_dtype), params)
  cfg = LoadedConfig(**{s: getattr(cfg, s) for s in config_lib.SECTION_NAMES}, loaded_step=step,
                     is_export=is_export(path))
  return model, {"params": params}, tok, cfg
