"""The sections of a config besides the model: data, train, checkpoint, mesh.

Each is a frozen, validated dataclass holding its defaults (the only place they
live); `configs/NAME.py` sets only what its size changes.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from mmrec_jax.schema import Section, check, is_int, is_number


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """Where the text comes from and how it is read and tokenized."""
  SECTION: ClassVar[str] = "data"
  path: str = ""                   # empty: the built-in corpus (Python stdlib sources)
  val_path: str = ""
  tokenizer: str = ""              # path of a tokenizer.json to reuse
  text_field: str = "text"         # JSONL field / Parquet column
  val_fraction: float = 0.02
  cache_dir: str = ""              # empty: ~/.cache/mmrec_jax
  max_bytes: int = 0               # 0: no limit on corpus size read
  num_workers: int = 0
  include_tests: bool = False      # built-in corpus: include the stdlib's test files
  tokenizer_max_bytes: int = 200_000_000  # text used to train the tokenizer (0: all)
  prefetch: int = 8                # batches prefetched by the train iterator
  # A generated task instead of text (`NAME:key=value,...`, e.g. "mqar:mix=64x4"; see
  # data/synthetic.py): fresh random bindings every batch, the loss on answers only.
  task: str = ""

  def validate(self):
    check(is_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0,
          "data.val_fraction must be in [0, 1)")
    self.nonnegative_ints(("max_bytes", "num_workers", "tokenizer_max_bytes", "prefetch"))
    check(isinstance(self.text_field, str) and self.text_field,
          "data.text_field must be a non-empty field/column name")
    if self.task:
      from mmrec_jax.data import synthetic  # pylint: disable=import-outside-toplevel
      synthetic.parse(self.task)
    for f in ("path", "val_path", "tokenizer", "cache_dir", "task"):
      check(isinstance(getattr(self, f), str), f"data.{f} must be a string (a path)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """The optimisation: steps, batch, schedule, loss options, evaluation, sampling."""
  SECTION: ClassVar[str] = "train"
  steps: int = 1000
  epochs: float = 0.0              # > 0: train this many passes over the training windows instead
  batch_size: int = 4
  seq_len: int = 512
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 100
  # After the warmup: "cosine" decay to lr * min_lr_ratio at the last step, or "wsd"
  # (warmup-stable-decay): lr held, then a linear decay over the last decay_frac.
  schedule: str = "cosine"
  decay_frac: float = 0.2
  # A second warmup inside the schedule (a grown run continuing its ladder's
  # schedule): from step rewarm_at the learning rate ramps linearly from 0 to the
  # schedule's over rewarm_steps steps. 0 steps: none.
  rewarm_at: int = 0
  rewarm_steps: int = 0
  weight_decay: float = 0.1
  # Per-module learning-rate factors, "NAME=FACTOR,...": every parameter under a
  # module (or itself) named NAME (e.g. memory, ffn, fused, embed) steps FACTOR
  # times as far (its weight decay too). Empty: the model's own factors (MM-Rec:
  # model.mem_lr_scale for `memory`), one learning rate for the rest.
  lr_scales: str = ""
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  grad_accum: int = 1
  # > 0: the head and the loss of a step are computed this many tokens at a time
  # (each chunk's logits recomputed in the backward pass), never all [B, T, V]
  # logits at once. 0: in one piece.
  loss_chunk: int = 0
  # Carry each row's recurrent state from one step to the next (truncated
  # backpropagation through time): row j of the batch reads consecutive windows of
  # its own stretch of the training stream, and a step starts from the state the
  # previous one ended with (no gradient through it). Needs a model with a
  # fixed-size state (`CARRIES_STATE`).
  carry_state: bool = False
  eval_every: int = 200
  eval_batches: int = 0            # validation batches per evaluation (0: the whole split)
  early_stopping_patience: int = 0  # evaluations without improvement; 0 disables
  early_stopping_min_delta: float = 0.0  # an improvement must lower val loss by more than this
  seed: int = 0
  log_every: int = 10
  samples: int = 3                 # sampled continuations printed at the end
  sample_tokens: int = 48          # tokens generated per sample

  def validate(self):
    self.positive_ints(("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
                        "log_every"))
    check(is_number(self.epochs) and self.epochs >= 0,
          f"train.epochs={self.epochs} must be >= 0 (0: use train.steps)")
    check(is_int(self.eval_batches) and self.eval_batches >= 0,
          f"train.eval_batches={self.eval_batches!r} must be an integer >= 0 (0: the whole split)")
    check(is_int(self.warmup_steps) and self.warmup_steps >= 0,
          f"train.warmup_steps={self.warmup_steps} must be >= 0")
    for f in ("rewarm_at", "rewarm_steps"):
      check(is_int(getattr(self, f)) and getattr(self, f) >= 0,
            f"train.{f}={getattr(self, f)!r} must be an integer >= 0")
    check(is_int(self.early_stopping_patience) and self.early_stopping_patience >= 0,
          "train.early_stopping_patience must be >= 0")
    check(is_number(self.early_stopping_min_delta) and self.early_stopping_min_delta >= 0,
          "train.early_stopping_min_delta must be >= 0")
    check(is_int(self.samples) and is_int(self.sample_tokens) and self.samples >= 0
          and self.sample_tokens >= 0, "train.samples and train.sample_tokens must be >= 0")
    check(is_number(self.lr) and self.lr > 0, f"train.lr={self.lr} must be positive")
    for f in ("min_lr_ratio", "weight_decay", "grad_clip"):
      check(is_number(getattr(self, f)) and getattr(self, f) >= 0,
            f"train.{f}={getattr(self, f)!r} must be a number >= 0")
    check(self.schedule in ("cosine", "wsd"),
          f"train.schedule={self.schedule!r} is unknown; use cosine or wsd")
    check(is_number(self.decay_frac) and 0 < self.decay_frac <= 1,
          f"train.decay_frac={self.decay_frac!r} must be in (0, 1]")
    for f in ("b1", "b2"):
      check(is_number(getattr(self, f)) and 0 <= getattr(self, f) < 1,
            f"train.{f}={getattr(self, f)!r} must be in [0, 1)")
    check(is_int(self.loss_chunk) and self.loss_chunk >= 0,
          f"train.loss_chunk={self.loss_chunk!r} must be an integer >= 0 (tokens per "
          "piece of the head and loss; 0: one piece)")
    check(is_int(self.seed), f"train.seed={self.seed!r} must be an integer")
    from mmrec_jax.training import optimizer  # pylint: disable=import-outside-toplevel
    optimizer.parse_lr_scales(self.lr_scales)
    check(self.batch_size % self.grad_accum == 0,
          f"train.batch_size={self.batch_size} is not divisible by train.grad_accum="
          f"{self.grad_accum}")
    if self.carry_state:
      check(self.grad_accum == 1, f"train.carry_state splits no batch into microbatches: set "
            f"train.grad_accum=1 (got {self.grad_accum}) and lower train.batch_size instead")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
  """How often checkpoints are written and how many are kept."""
  SECTION: ClassVar[str] = "checkpoint"
  every: int = 500
  keep: int = 2
  async_save: bool = True

  def validate(self):
    self.positive_ints(("every", "keep"))


MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
  """The device mesh: axes within a slice / node, and across slices / nodes."""
  SECTION: ClassVar[str] = "mesh"
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # Multi-slice TPU / multi-node GPU: how many slices (nodes) the data / fsdp axes span
  # over the slow data-center network; the axes above are then per slice (node).
  dcn_data: int = 1
  dcn_fsdp: int = 1

  def validate(self):
    for ax in MESH_AXES:
      v = getattr(self, ax)
      check(is_int(v) and (v > 0 or v == -1),
            f"mesh.{ax}={v!r} must be a positive integer or -1 (the rest of the devices)")
    check([getattr(self, ax) for ax in MESH_AXES].count(-1) <= 1,
          "at most one mesh axis may be -1")
    for ax in ("dcn_data", "dcn_fsdp"):
      v = getattr(self, ax)
      check(is_int(v) and v > 0, f"mesh.{ax}={v!r} must be a positive integer")


SECTIONS = {"data": DataConfig, "train": TrainConfig, "checkpoint": CheckpointConfig,
            "mesh": MeshConfig}
