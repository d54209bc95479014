"""MM-Rec's growth rules: what growing its parameters needs beyond their logical
axis names (the generic expander, `mmrec_jax.growth.expander`, asks these).

- which parameters write into the residual stream (zeroed in an inserted block);
- the memory query (slice 0 of the fused kernel), or with `mem_qk_norm` the
  read's per-head temperature, scaled so attention logits keep their value when
  the head size grows;
- the FFN upcycled into experts when `use_moe` is switched on (every expert a
  copy: exact, as the top-2 gates sum to 1);
- what cannot be exact: another memory geometry or read function, DPG switched,
  MoE switched off or another expert count;
- the decoding state (`LayerState`): width copies, [key, value] halves of slots.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmrec_jax.models import base
from mmrec_jax.models import moe

GEOMETRY_FIELDS = ("chunk_size", "mem_slots", "mem_levels")
# The fused kernel whose slice 0 is the memory query (scaled by 1/sqrt(head growth)).
QUERY_KERNEL = "blocks/fused/kernel"
# The per-head read temperature of `mem_qk_norm` (heads tile like the width map's).
READ_SCALE = "memory/read_scale"
# Switches of the memory's read and write: either setting is another function.
READ_SWITCHES = {"mem_qk_norm": "another read function", "mem_read_logn": "another read function",
                 "mem_residual": "the read enters elsewhere", "mem_sink": "another read function"}


def _path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class MMRecGrowth(base.GrowthRules):
  """Growth rules of `MMRecConfig` (see the module docstring)."""

  runtime_fields = base.GrowthRules.runtime_fields + (
      "scan_impl", "scan_chunk", "decay_min", "decay_max", "mem_out_init", "mem_lr_scale",
      "mem_write_grad", "moe_capacity_factor", "moe_loss_weight", "moe_impl", "uboo_weight",
      "use_uboo")

  def hidden_widths(self, cfg):
    out = dict(super().hidden_widths(cfg))
    out["MDI hidden width (d_model / mdi_hidden_div)"] = cfg.d_model // cfg.mdi_hidden_div
    return out

  def inexact_reasons(self, small, big):
    r = []
    if small.use_dpg and big.use_dpg and (big.rank < small.rank or big.rank % small.rank):
      r.append(f"DPG rank {small.rank} -> {big.rank} is not an integer multiple")
    for f in GEOMETRY_FIELDS:
      if getattr(small, f) != getattr(big, f):
        r.append(f"memory geometry model.{f} changes ({getattr(small, f)} -> "
                 f"{getattr(big, f)}); align it in the configs")
    for f, why in READ_SWITCHES.items():
      if getattr(small, f) != getattr(big, f):
        r.append(f"model.{f} switched {'off' if getattr(small, f) else 'on'} ({why})")
    if small.mem_key != big.mem_key:
      r.append(f"model.mem_key changes ({small.mem_key} -> {big.mem_key}; another write)")
    if small.mem_pool != big.mem_pool:
      r.append(f"model.mem_pool changes ({small.mem_pool} -> {big.mem_pool}; another pooling)")
    if small.use_dpg != big.use_dpg:
      r.append(f"model.use_dpg switched {'off' if small.use_dpg else 'on'} (no identity form)")
    if small.use_moe and not big.use_moe:
      r.append("model.use_moe switched off (no identity form)")
    if small.use_moe and big.use_moe and small.moe_experts != big.moe_experts:
      r.append(f"model.moe_experts changes ({small.moe_experts} -> {big.moe_experts})")
    return r

  def residual_writers(self, cfg):
    writers = ("mix_out/kernel", "ffn/down/kernel", "ffn/down/bias", "moe/w_down", "moe/b_down")
    return writers + (("memory/out/kernel",) if cfg.mem_residual else ())

  def prepare(self, params, small, big, key, moments=False):
    if big.use_moe and not small.use_moe:
      from mmrec_jax import models  # pylint: disable=import-outside-toplevel (the registry)
      moe_small = models.build(small.replace(use_moe=True, moe_experts=big.moe_experts))
      router = nn.unbox(models.init_params(moe_small, key))["blocks"]["moe"]["router"]
      if moments:
        router = jax.tree.map(jnp.zeros_like, router)
      params = moe.upcycle_ffn(params, router, big.moe_experts)
    return params

  def adjust(self, path, x, small, big, head_ratio):
    if head_ratio > 1 and path == QUERY_KERNEL and big.mem_levels:
      x = x.at[..., 0, :].multiply(1.0 / math.sqrt(head_ratio))
    if head_ratio > 1 and path.endswith(READ_SCALE):  # unit-RMS q, k: the same fix, on the scale
      x = x / math.sqrt(head_ratio)
    return x

  def grow_state(self, state, small, width_src, layer_src):
    d = small.d_model
    kv = jnp.concatenate([jnp.asarray(width_src), d + jnp.asarray(width_src)])

    def one(path, x):
      x = jnp.take(x, layer_src, axis=0)
      name = _path_str(path)
      if name.endswith("slots") or name.endswith("pend"):
        return jnp.take(x, kv, axis=-1)
      if name in ("h", "chunk_sum", "key_sum", "prev_x"):
        return jnp.take(x, width_src, axis=-1)
      return x
    return jax.tree_util.tree_map_with_path(one, state)
