"""Configuration: one ml_collections ConfigDict per size, built here and validated on load.

Every `configs/NAME.py` calls `make_config(...)` with the numbers of its row in the
size ladder; everything else (data, train, checkpoint, mesh) has shared defaults
that a user overrides with `--config.section.field=value`.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from mmrec_jax import models
from mmrec_jax import optimizer
from mmrec_jax.errors import ConfigError  # pylint: disable=unused-import (re-exported)


def make_config(name, kind="mmrec", **model_fields):
  """The full ConfigDict of one model size: the model section comes from the model's
  schema (`mmrec_jax.models`, the only place its defaults live) with `model_fields`
  set; the other sections have shared defaults."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(
      models.schema(kind).from_dict(dict(model_fields, kind=kind, name=name)).to_dict())

  d = c.data = ml_collections.ConfigDict()
  d.path = ""                   # empty: the built-in corpus (Python stdlib sources)
  d.val_path = ""
  d.tokenizer = ""              # path of a tokenizer.json to reuse
  d.text_field = "text"         # JSONL field / Parquet column
  d.val_fraction = 0.02
  d.cache_dir = ""              # empty: ~/.cache/mmrec_jax
  d.max_bytes = 0               # 0: no limit on corpus size read
  d.num_workers = 0
  d.include_tests = False       # built-in corpus: include the stdlib's test files
  d.tokenizer_max_bytes = 200_000_000  # text used to train the tokenizer (0: all)
  d.prefetch = 8                # batches prefetched by the train iterator

  t = c.train = ml_collections.ConfigDict()
  t.steps = 1000
  t.epochs = 0.0                # > 0: train this many passes over the training windows instead
  t.batch_size = 4
  t.seq_len = 512
  t.lr = 3e-3
  t.min_lr_ratio = 0.1
  t.warmup_steps = 100
  t.weight_decay = 0.1
  # Per-module learning-rate factors, "NAME=FACTOR,...": every parameter under a
  # module (or itself) named NAME (e.g. memory, ffn, fused, embed) steps FACTOR
  # times as far (its weight decay too). Empty: the model's own factors (MM-Rec:
  # model.mem_lr_scale for `memory`), one learning rate for the rest.
  t.lr_scales = ""
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  t.grad_accum = 1
  # > 0: the head and the loss of a step are computed this many tokens at a time
  # (each chunk's logits recomputed in the backward pass), never all [B, T, V]
  # logits at once. 0: in one piece.
  t.loss_chunk = 0
  # Carry each row's recurrent state from one step to the next (truncated
  # backpropagation through time): row j of the batch reads consecutive windows of
  # its own stretch of the training stream, and a step starts from the state the
  # previous one ended with (no gradient through it). Lets training see
  # dependencies longer than train.seq_len. MM-Rec only (its state has a fixed size).
  t.carry_state = False
  t.eval_every = 200
  t.eval_batches = 0            # validation batches per evaluation (0: the whole split)
  t.early_stopping_patience = 0  # evaluations without improvement; 0 disables
  t.early_stopping_min_delta = 0.0  # an improvement must lower val loss by more than this
  t.seed = 0
  t.log_every = 10
  t.samples = 3                 # sampled continuations printed at the end
  t.sample_tokens = 48          # tokens generated per sample

  k = c.checkpoint = ml_collections.ConfigDict()
  k.every = 500
  k.keep = 2
  k.async_save = True

  s = c.mesh = ml_collections.ConfigDict()
  s.data = -1
  s.fsdp = 1
  s.tensor = 1
  # Multi-slice TPU / multi-node GPU: how many slices (nodes) the data / fsdp axes span
  # over the slow data-center network; the axes above are then per slice (node).
  s.dcn_data = 1
  s.dcn_fsdp = 1
  return c


def _check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def validate_model(m):
  """The model section's schema instance; ConfigError naming the field and the fix."""
  return models.make_config(m)


def validate(c):
  """Checks a whole config; raises ConfigError with a one-line message."""
  for section in ("model", "data", "train", "checkpoint", "mesh"):
    _check(section in c, f"config has no '{section}' section; start from configs/tiny.py")
  validate_model(c.model)
  t = c.train
  for f in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "log_every"):
    _check(isinstance(t[f], int) and t[f] > 0, f"train.{f} must be a positive integer, got {t[f]!r}")
  _check(t.epochs >= 0, f"train.epochs={t.epochs} must be >= 0 (0: use train.steps)")
  _check(isinstance(t.eval_batches, int) and t.eval_batches >= 0,
         f"train.eval_batches={t.eval_batches!r} must be an integer >= 0 (0: the whole split)")
  _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
  _check(t.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0")
  _check(t.early_stopping_min_delta >= 0, "train.early_stopping_min_delta must be >= 0")
  _check(t.samples >= 0 and t.sample_tokens >= 0,
         "train.samples and train.sample_tokens must be >= 0")
  _check(t.lr > 0, f"train.lr={t.lr} must be positive")
  _check(isinstance(t.get("loss_chunk", 0), int) and t.get("loss_chunk", 0) >= 0,
         f"train.loss_chunk={t.get('loss_chunk')!r} must be an integer >= 0 (tokens per "
         "piece of the head and loss; 0: one piece)")
  optimizer.parse_lr_scales(t.get("lr_scales", ""))
  _check(t.seq_len <= c.model.max_seq_len,
         f"train.seq_len={t.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}")
  _check(t.batch_size % t.grad_accum == 0,
         f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  if t.get("carry_state", False):
    _check(c.model.get("kind", "mmrec") == "mmrec",
           f"train.carry_state needs a fixed-size recurrent state (model.kind=mmrec), not "
           f"model.kind={c.model.kind!r}; turn it off for this model")
    _check(t.grad_accum == 1, f"train.carry_state splits no batch into microbatches: set "
           f"train.grad_accum=1 (got {t.grad_accum}) and lower train.batch_size instead")
  _check(c.checkpoint.every > 0, "checkpoint.every must be a positive integer")
  _check(c.checkpoint.keep > 0, "checkpoint.keep must be a positive integer")
  for ax in ("data", "fsdp", "tensor"):
    v = c.mesh[ax]
    _check(isinstance(v, int) and (v > 0 or v == -1),
           f"mesh.{ax}={v!r} must be a positive integer or -1 (the rest of the devices)")
  _check(list(c.mesh.values()).count(-1) <= 1, "at most one mesh axis may be -1")
  for ax in ("dcn_data", "dcn_fsdp"):
    v = c.mesh.get(ax, 1)
    _check(isinstance(v, int) and v > 0, f"mesh.{ax}={v!r} must be a positive integer")
  _check(0.0 <= c.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
  for f in ("max_bytes", "num_workers", "tokenizer_max_bytes", "prefetch"):
    v = c.data[f]
    _check(isinstance(v, int) and v >= 0, f"data.{f} must be an integer >= 0, got {v!r}")
  _check(isinstance(c.data.text_field, str) and c.data.text_field,
         "data.text_field must be a non-empty field/column name")
  return c


def load_config_file(path):
  """Imports a config file (a Python module with get_config()) and validates it."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; pass e.g. --config=configs/tiny.py")
  spec = importlib.util.spec_from_file_location("_mmrec_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return validate(mod.get_config())
