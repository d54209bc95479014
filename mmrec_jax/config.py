"""Configuration: one ml_collections ConfigDict per size, built here and validated on load.

Every `configs/NAME.py` calls `make_config(...)` with the numbers of its row in the
size ladder; everything else (data, train, checkpoint, mesh) has shared defaults
that a user overrides with `--config.section.field=value`.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

SCAN_IMPLS = ("auto", "associative", "sequential", "chunked")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and what to do."""


def make_config(name, *, vocab_size, d_model, n_layers, n_heads, max_seq_len,
                use_dpg=False, use_uboo=False, use_moe=False, **model_overrides):
  """The full ConfigDict of one size of the ladder."""
  c = ml_collections.ConfigDict()
  m = c.model = ml_collections.ConfigDict()
  m.name = name
  m.vocab_size = vocab_size
  m.d_model = d_model
  m.n_layers = n_layers
  m.n_heads = n_heads
  m.max_seq_len = max_seq_len
  m.ffn_mult = 4
  m.mdi_hidden_div = 4          # f_base / f_ctx hidden width = D / mdi_hidden_div
  # Long-term memory (HDS): chunks of `chunk_size` tokens; `mem_levels` levels of
  # `mem_slots` slots, level l holding means of 2**l chunk summaries.
  m.chunk_size = 64
  m.mem_slots = 8
  m.mem_levels = 4
  m.scan_impl = "auto"          # auto | associative | sequential | chunked
  m.scan_chunk = 64             # chunk length of the `chunked` scan
  m.dropout = 0.0
  m.use_dpg = use_dpg
  m.dpg_rank = max(d_model // 16, 8)
  m.use_moe = use_moe
  m.moe_experts = 8
  m.moe_capacity_factor = 1.25
  m.moe_loss_weight = 0.01
  m.use_uboo = use_uboo
  m.uboo_weight = 0.1           # lambda_P
  m.dtype = "float32"           # compute dtype
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat = "none"              # none | full | dots | dots_no_batch
  for k, v in model_overrides.items():
    if k not in m:
      raise ConfigError(f"make_config: unknown model field {k!r}")
    m[k] = v

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
  t.batch_size = 4
  t.seq_len = 512
  t.lr = 3e-3
  t.min_lr_ratio = 0.1
  t.warmup_steps = 100
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  t.grad_accum = 1
  t.eval_every = 200
  t.eval_batches = 8
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
  return c


def _check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def validate_model(m):
  """Checks the model section; raises ConfigError naming the field and the fix."""
  for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_mult",
            "chunk_size", "mem_slots", "mem_levels", "scan_chunk", "mdi_hidden_div"):
    _check(isinstance(m[f], int) and m[f] > 0,
           f"model.{f} must be a positive integer, got {m[f]!r}")
  _check(m.d_model % m.n_heads == 0,
         f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
         "choose a width that is a multiple of the head count")
  _check(m.d_model % m.mdi_hidden_div == 0,
         f"model.d_model={m.d_model} is not divisible by model.mdi_hidden_div={m.mdi_hidden_div}")
  _check(m.scan_impl in SCAN_IMPLS,
         f"model.scan_impl={m.scan_impl!r} is unknown; use one of {', '.join(SCAN_IMPLS)}")
  _check(m.remat in REMAT_POLICIES,
         f"model.remat={m.remat!r} is unknown; use one of {', '.join(REMAT_POLICIES)}")
  _check(m.dtype in DTYPES, f"model.dtype={m.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
  _check(m.param_dtype in DTYPES,
         f"model.param_dtype={m.param_dtype!r} is unknown; use one of {', '.join(DTYPES)}")
  _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
  if m.use_dpg:
    _check(isinstance(m.dpg_rank, int) and 0 < m.dpg_rank <= m.d_model,
           f"model.dpg_rank={m.dpg_rank} must be in 1..d_model")
  if m.use_moe:
    _check(isinstance(m.moe_experts, int) and m.moe_experts >= 2,
           f"model.moe_experts={m.moe_experts} must be an integer >= 2 (top-2 routing)")
    _check(m.moe_capacity_factor > 0,
           f"model.moe_capacity_factor={m.moe_capacity_factor} must be positive")
    _check(m.moe_loss_weight >= 0, "model.moe_loss_weight must be >= 0")
  if m.use_uboo:
    _check(m.uboo_weight >= 0, "model.uboo_weight must be >= 0")


def validate(c):
  """Checks a whole config; raises ConfigError with a one-line message."""
  for section in ("model", "data", "train", "checkpoint", "mesh"):
    _check(section in c, f"config has no '{section}' section; start from configs/tiny.py")
  validate_model(c.model)
  t = c.train
  for f in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "log_every"):
    _check(isinstance(t[f], int) and t[f] > 0, f"train.{f} must be a positive integer, got {t[f]!r}")
  _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
  _check(t.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0")
  _check(t.early_stopping_min_delta >= 0, "train.early_stopping_min_delta must be >= 0")
  _check(t.samples >= 0 and t.sample_tokens >= 0,
         "train.samples and train.sample_tokens must be >= 0")
  _check(t.lr > 0, f"train.lr={t.lr} must be positive")
  _check(t.seq_len <= c.model.max_seq_len,
         f"train.seq_len={t.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}")
  _check(t.batch_size % t.grad_accum == 0,
         f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  _check(c.checkpoint.every > 0, "checkpoint.every must be a positive integer")
  _check(c.checkpoint.keep > 0, "checkpoint.keep must be a positive integer")
  for ax in ("data", "fsdp", "tensor"):
    v = c.mesh[ax]
    _check(isinstance(v, int) and (v > 0 or v == -1),
           f"mesh.{ax}={v!r} must be a positive integer or -1 (the rest of the devices)")
  _check(list(c.mesh.values()).count(-1) <= 1, "at most one mesh axis may be -1")
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


def model_config_from_dict(d):
  """A model ConfigDict from a plain dict (e.g. read from config.json), validated."""
  base = make_config(d.get("name", "custom"), vocab_size=d["vocab_size"], d_model=d["d_model"],
                     n_layers=d["n_layers"], n_heads=d["n_heads"], max_seq_len=d["max_seq_len"])
  m = base.model
  for k, v in d.items():
    if k not in m:
      raise ConfigError(f"unknown model field {k!r} in saved config")
    m[k] = v
  validate_model(m)
  return m
