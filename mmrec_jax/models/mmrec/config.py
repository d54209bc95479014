"""MM-Rec's model section (`model.kind = "mmrec"`): its fields, defaults and validation."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mmrec_jax.models import base
from mmrec_jax.models.moe import MOE_IMPLS
from mmrec_jax.models.mmrec import memory as mem_lib
from mmrec_jax.models.mmrec.growth import MMRecGrowth
from mmrec_jax.models.mmrec.scan import IMPLS as SCAN_IMPLS

# Each of the two gates of the decay is bounded to [sigma(-GATE_BOUND), sigma(GATE_BOUND)].
GATE_BOUND = 15.0
# `mem_pool="exp"`: a token's pooling score is bounded to [-POOL_BOUND, POOL_BOUND]
# (weights from 4.5e-5, far above the memory's MIN_MASS, to 2.2e4).
POOL_BOUND = 10.0
MEM_POOLS = ("sigmoid", "exp")
MEM_KEYS = ("state", "previous")
MAX_INIT_DECAY = 0.99999


@dataclasses.dataclass(frozen=True)
class MMRecConfig(base.BaseConfig):
  """The MM-Rec model section (`model.kind = "mmrec"`)."""
  CARRIES_STATE: ClassVar[bool] = True    # the recurrence and a bounded memory
  GROWTH: ClassVar[Any] = MMRecGrowth()
  kind: str = "mmrec"
  BEFORE_FIELDS: ClassVar[dict] = {"mem_lr_scale": 1.0}   # runs saved before the field existed
  mdi_hidden_div: int = 4        # f_base / f_ctx hidden width = D / mdi_hidden_div
  # Long-term memory (HDS): chunks of `chunk_size` tokens; `mem_levels` levels of
  # `mem_slots` slots, level l holding means of 2**l chunk summaries.
  chunk_size: int = 64
  mem_slots: int = 8
  mem_levels: int = 4
  # The read's logits: False, q.k / sqrt(hd); True, queries and keys at unit RMS
  # per head times a learned per-head temperature (`read_scale`, init 1).
  mem_qk_norm: bool = False
  # A token's pooling weight: "sigmoid" of a learned score, in (0, 1); or "exp" of
  # it, bounded to [-POOL_BOUND, POOL_BOUND]: a softmax pooling over the chunk, and
  # (since merges weight by mass) over every chunk a coarse slot holds, so one
  # salient chunk can outweigh the many filler chunks it is merged with.
  mem_pool: str = "sigmoid"
  # What a chunk's key is a summary of: "state", the pooled recurrence output (the
  # same summary as its value); "previous", the pooled block input of the token
  # BEFORE each pooled token (with that token's weight), its value still the pooled
  # recurrence output. With "previous" a chunk whose pooling picks a token keys that
  # token's state by the token before it: a pair (a, b) is found by a later query a
  # (what attention needs two layers for: a previous-token head, then an induction head).
  mem_key: str = "state"
  # The read's logits times log(number of slots it sees) (scalable softmax): a
  # margin learned among the few slots of a training window keeps its weight
  # among the many slots of a longer document.
  mem_read_logn: bool = False
  # A null slot every read also sees (an attention sink): a learned logit per head
  # and a learned value (both zero at init). A token that finds nothing relevant
  # reads the null value instead of a mixture of summaries, and an empty memory
  # (the first chunk of a document) reads it too, not zeros it never reads later.
  mem_sink: bool = False
  # Initialisation scale of the memory's read-out projection (`memory/out`): 0 starts
  # the memory as an exact no-op that training opens (only `out` gets a gradient at
  # step 0; every other memory weight follows once `out` is non-zero); 1, the usual
  # initialisation (the earlier default; CHANGELOG).
  mem_out_init: float = 0.0
  # The memory's weights (every parameter under `memory`) step this factor times
  # the learning rate (their weight decay too); `train.lr_scales` overrides it.
  # AdamW steps every weight by about the learning rate however small its gradient,
  # and the memory's keys get ~200x less gradient than the rest (1 was the earlier
  # default; docs/experiments/quality.md for what the two defaults changed).
  mem_lr_scale: float = 0.1
  # False: the memory writes the recurrence's output without passing gradient back
  # into it (a stop-gradient on what is pooled); the memory's own weights still
  # learn, and the function is the same. Reads still train the query.
  mem_write_grad: bool = True
  # Where the read enters: False, the mixer, W_o((h + m) * GELU(v)) (gated by v);
  # True, its own residual branch, x + W_o(h * GELU(v)) + m, its read-out then
  # initialised like the other residual outputs (times 1 / (2 n_layers)).
  mem_residual: bool = False
  scan_impl: str = "auto"        # auto | associative | sequential | chunked | pallas
  scan_chunk: int = 64           # chunk length of the `chunked` scan
  # MDI: the per-channel decays at init span [decay_min, decay_max] (timescales
  # 1/(1-a) spaced geometrically, 10 to 1000 tokens by default).
  decay_min: float = 0.9
  decay_max: float = 0.999
  use_dpg: bool = False
  dpg_rank: int = 0              # 0: max(d_model // 16, 8)
  use_moe: bool = False
  moe_experts: int = 8
  moe_capacity_factor: float = 1.25  # ignored: routing is dropless (kept so old configs load)
  moe_loss_weight: float = 0.01
  moe_impl: str = "auto"         # auto | dense | ragged (see `MoE`)
  use_uboo: bool = False
  uboo_weight: float = 0.1       # lambda_P

  def validate(self):
    super().validate()
    base.check(self.kind == "mmrec", f"MMRecConfig has kind {self.kind!r}")
    base.check(isinstance(self.mem_levels, int) and self.mem_levels >= 0,
               f"model.mem_levels must be an integer >= 0 (0: no long-term memory), got "
               f"{self.mem_levels!r}")
    base.check(self.mem_pool in MEM_POOLS, f"model.mem_pool={self.mem_pool!r} is unknown; use "
               f"one of {', '.join(MEM_POOLS)}")
    base.check(self.mem_key in MEM_KEYS, f"model.mem_key={self.mem_key!r} is unknown; use "
               f"one of {', '.join(MEM_KEYS)}")
    base.check(isinstance(self.mem_out_init, (int, float)) and self.mem_out_init >= 0,
               f"model.mem_out_init must be a number >= 0 (0: the memory's read-out starts at "
               f"zero), got {self.mem_out_init!r}")
    base.check(isinstance(self.mem_lr_scale, (int, float)) and self.mem_lr_scale >= 0,
               f"model.mem_lr_scale must be a number >= 0 (the memory's learning-rate "
               f"factor), got {self.mem_lr_scale!r}")
    base.positive_ints(self, ("chunk_size", "mem_slots", "scan_chunk",
                              "mdi_hidden_div"))
    base.check(self.d_model % self.mdi_hidden_div == 0,
               f"model.d_model={self.d_model} is not divisible by "
               f"model.mdi_hidden_div={self.mdi_hidden_div}")
    base.check(self.scan_impl in SCAN_IMPLS,
               f"model.scan_impl={self.scan_impl!r} is unknown; use one of "
               f"{', '.join(SCAN_IMPLS)}")
    base.check(isinstance(self.decay_min, (int, float)) and isinstance(self.decay_max, (int, float))
               and 0 < self.decay_min <= self.decay_max <= MAX_INIT_DECAY,
               f"model.decay_min={self.decay_min} and model.decay_max={self.decay_max} must "
               f"satisfy 0 < decay_min <= decay_max <= {MAX_INIT_DECAY}")
    if self.use_dpg:
      base.check(isinstance(self.dpg_rank, int) and 0 <= self.dpg_rank <= self.d_model,
                 f"model.dpg_rank={self.dpg_rank} must be in 0..d_model (0: automatic)")
    if self.use_moe:
      base.check(isinstance(self.moe_experts, int) and self.moe_experts >= 2,
                 f"model.moe_experts={self.moe_experts} must be an integer >= 2 (top-2 routing)")
      base.check(self.moe_capacity_factor > 0,
                 f"model.moe_capacity_factor={self.moe_capacity_factor} must be positive")
      base.check(self.moe_loss_weight >= 0, "model.moe_loss_weight must be >= 0")
      base.check(self.moe_impl in MOE_IMPLS,
                 f"model.moe_impl={self.moe_impl!r} is unknown; use one of {', '.join(MOE_IMPLS)}")
    if self.use_uboo:
      base.check(self.uboo_weight >= 0, "model.uboo_weight must be >= 0")

  def inert_fields(self):
    """Without a long-term memory (`mem_levels=0`) its options change nothing."""
    return tuple(f for f in self.field_names() if f.startswith("mem_") and f != "mem_levels"
                 ) if not self.mem_levels else ()

  @property
  def rank(self):
    return self.dpg_rank or max(self.d_model // 16, 8)

  @property
  def mem_readable_slots(self):
    return mem_lib.readable_slots(self.mem_levels, self.mem_slots) if self.mem_levels else 0

  @property
  def n_slices(self):
    """Slices of the fused projection: q (the memory query, only with a memory), k, v, z, i."""
    return 5 if self.mem_levels else 4
