"""Dropless top-2 mixture of expert FFNs, routed per token (any model with
`use_moe`, `moe_experts`, `moe_impl` in its config may use it)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmrec_jax.models.layers import dense, logical

MOE_IMPLS = ("auto", "dense", "ragged")


def moe_impl(cfg) -> str:
  """The MoE implementation that runs: `auto` is `ragged` on TPU (a native grouped
  matmul), `dense` elsewhere (on CPU `ragged_dot` falls back to a masked dense
  product over all experts for every assignment, 2x the cost of `dense`; on GPU
  `ragged` is available by name, not yet measured against `dense`)."""
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  return "ragged" if jax.default_backend() == "tpu" else "dense"


def moe_experts_run(cfg) -> int:
  """Expert FFNs computed per token by the implementation that runs."""
  impl = moe_impl(cfg)
  if impl == "dense":
    return cfg.moe_experts
  return 2 if jax.default_backend() in ("gpu", "tpu") else 2 * cfg.moe_experts


class MoE(nn.Module):
  """Top-2 mixture of expert FFNs, routed per token, dropless.

  Every token goes to its two most probable experts, weighted by their
  renormalised probabilities; there is no capacity and no router noise, so a
  token's output depends on that token alone: the same in one pass, in pieces,
  token by token, in a batch or alone, whatever shares its row, in training and
  at inference (`deterministic` changes nothing here). Cost is linear in T:
  - `ragged`: the B*T*2 (token, expert) assignments sorted by expert, two
    grouped matmuls (`jax.lax.ragged_dot`), combined back in token order;
  - `dense`: every expert on every token, combined with the gates (zero for the
    experts not chosen): E/2 x the FLOPs of `ragged`, exact, no sort.
  Returns (y, load-balancing loss E * sum_e frac_routed_e * mean_prob_e).
  """
  cfg: Any    # a model config with use_moe, moe_experts, moe_impl, ffn_mult, d_model

  @nn.compact
  def __call__(self, x_BTD, deterministic):
    del deterministic  # routing is deterministic and dropless in training and inference
    cfg = self.cfg
    B, T, D = x_BTD.shape
    E, F = cfg.moe_experts, cfg.ffn_mult * cfg.d_model
    N = B * T
    logits_BTE = dense(E, ("embed", "expert"), cfg, "router")(x_BTD).astype(jnp.float32)
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    gate_BTK, idx_BTK = jax.lax.top_k(probs_BTE, 2)
    gate_BTK = gate_BTK / jnp.sum(gate_BTK, axis=-1, keepdims=True)
    pd, dt = cfg.params_dtype, cfg.compute_dtype
    w1 = self.param("w_up", logical(nn.initializers.lecun_normal(batch_axis=(0,)), "expert",
                                    "embed", "mlp"), (E, D, F), pd).astype(dt)
    b1 = self.param("b_up", logical(nn.initializers.zeros, "expert", "mlp"), (E, F), pd).astype(dt)
    w2 = self.param("w_down", logical(nn.initializers.lecun_normal(batch_axis=(0,)), "expert",
                                      "mlp", "embed"), (E, F, D), pd).astype(dt)
    b2 = self.param("b_down", logical(nn.initializers.zeros, "expert", "embed"), (E, D),
                    pd).astype(dt)
    x_ND = x_BTD.reshape(N, D).astype(dt)
    onehot_NKE = jax.nn.one_hot(idx_BTK.reshape(N, 2), E, dtype=jnp.float32)
    if moe_impl(cfg) == "dense":
      comb_NE = jnp.einsum("nke,nk->ne", onehot_NKE, gate_BTK.reshape(N, 2)).astype(dt)
      h_NEF = nn.gelu(jnp.einsum("nd,edf->nef", x_ND, w1) + b1)
      y_ND = (jnp.einsum("nef,efd->nd", h_NEF * comb_NE[..., None], w2)
              + jnp.einsum("ne,ed->nd", comb_NE, b2))
    else:
      e_S = idx_BTK.reshape(N * 2)                       # assignment s = 2 * token + choice
      order_S = jnp.argsort(e_S, stable=True)
      inv_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(N * 2, dtype=order_S.dtype))
      es_S = e_S[order_S]
      sizes_E = jnp.bincount(e_S, length=E).astype(jnp.int32)
      xs_SD = x_ND[order_S // 2]
      h_SF = nn.gelu(jax.lax.ragged_dot(xs_SD, w1, sizes_E) + b1[es_S])
      ys_SD = jax.lax.ragged_dot(h_SF, w2, sizes_E) + b2[es_S]
      ys_SD = ys_SD * gate_BTK.reshape(N * 2)[order_S][:, None].astype(dt)
      y_ND = ys_SD[inv_S].reshape(N, 2, D).sum(axis=1)
    frac_E = jnp.mean(onehot_NKE, axis=(0, 1))
    prob_E = jnp.mean(probs_BTE, axis=(0, 1))
    lb = E * jnp.sum(frac_E * prob_E)
    return y_ND.reshape(B, T, D), lb


def upcycle_ffn(params, router, experts):
  """Parameters whose every block's FFN (`blocks/ffn`, layers stacked) becomes
  `experts` copies of it behind `router` (the router's parameters): the same
  function, as the top-2 gates sum to 1."""
  blocks = dict(params["blocks"])
  ffn = blocks.pop("ffn")
  rep = lambda x: jnp.repeat(x[:, None], experts, axis=1)   # [L, ...] -> [L, E, ...]
  blocks["moe"] = {"router": router, "w_up": rep(ffn["up"]["kernel"]),
                   "b_up": rep(ffn["up"]["bias"]), "w_down": rep(ffn["down"]["kernel"]),
                   "b_down": rep(ffn["down"]["bias"])}
  return dict(params, blocks=blocks)
