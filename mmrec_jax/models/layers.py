"""Layers every model shares: dense kernels with logical axis names, RMSNorm, MLP,
the layer stack (one parameter layout whether layers are scanned or unrolled).

Every parameter carries logical axis names (`embed`, `mlp`, `vocab`, ...), which
the sharding rules map onto the mesh and the growth code dispatches on.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a block's backward pass keeps (`model.remat`): everything (`none`), its input
# only (`full`), every matmul output (`dots`, `dots_no_batch`), or `projections`: the
# tensors a block names with `saved(...)` (SAVED: the fused input projection, the
# recurrence's output, the memory's read, the mixer's and the FFN's outputs; the
# Transformer's qkv and attention output), recomputing the gates, norms, the FFN's
# hidden layer and the memory's pooling from them.
SAVED = ("fused", "recurrence", "memory_read", "mix_out", "ffn_out")
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "projections": jax.checkpoint_policies.save_only_these_names(*SAVED),
}


def saved(x, name):
  """`x` tagged as one of SAVED: kept for the backward pass by `remat=projections`."""
  assert name in SAVED, name
  return checkpoint_name(x, name)


BTD = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_HIDDEN = ("activation_batch", "activation_length")


_MESH = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh):
  """Within: `constrain` constrains activations on `mesh` (by the logical axis rules in
  effect, `nn.logical_axis_rules`)."""
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


def constrain(x, *axes):
  """`x` with its sharding constrained by logical activation axis names (one per
  dimension, None: unsharded); a no-op outside `training.sharding.activation_sharding`."""
  mesh = _MESH.get()
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, axes, mesh=mesh)


def logical(init, *axes):
  return nn.with_logical_partitioning(init, axes)


def scaled(scale=1.0):
  """Truncated normal of variance scale / fan_in; zeros when `scale` is 0."""
  if scale == 0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x_MK, w_KN, dtype):
  """x @ w with both operands in `dtype`, accumulated in float32, returned in x's
  dtype; the gradient's two matmuls likewise (a custom VJP: autodiff would
  multiply the float32 cotangent by a widened operand, at float32 speed)."""
  return _mixed_fwd(x_MK, w_KN, dtype)[0]


def _mixed_fwd(x_MK, w_KN, dtype):
  xl, wl = x_MK.astype(dtype), w_KN.astype(dtype)
  return jnp.dot(xl, wl, preferred_element_type=jnp.float32).astype(x_MK.dtype), (xl, wl)


def _mixed_bwd(dtype, res, g_MN):
  xl, wl = res
  gl = g_MN.astype(dtype)
  dx = jnp.dot(gl, wl.T, preferred_element_type=jnp.float32).astype(g_MN.dtype)
  dw = jnp.dot(xl.T, gl, preferred_element_type=jnp.float32).astype(g_MN.dtype)
  return dx, dw


_mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)


def matmul(x, w, cfg):
  """x [..., K] @ w [K, ...] in `cfg.matmul_dtype` (see `BaseConfig.matmul_dtype`)."""
  K = x.shape[-1]
  if not cfg.matmul_dtype or DTYPES[cfg.matmul_dtype] == jnp.result_type(x, w):
    return jnp.tensordot(x, w, axes=1)
  y = _mixed_matmul(x.reshape(-1, K), w.reshape(K, -1), DTYPES[cfg.matmul_dtype])
  return y.reshape(x.shape[:-1] + w.shape[1:])


def mixed_dot(cfg):
  """A `dot_general` for flax's Dense / DenseGeneral computing the contraction in
  `cfg.matmul_dtype`; None (flax's own) when that is the compute dtype."""
  if not cfg.matmul_dtype or DTYPES[cfg.matmul_dtype] == cfg.compute_dtype:
    return None

  def dot_general(x, w, dimension_numbers, precision=None, **kwargs):
    (cx, cw), (bx, bw) = dimension_numbers
    if bx or bw or tuple(cx) != (x.ndim - 1,) or tuple(cw) != (0,):
      return jax.lax.dot_general(x, w, dimension_numbers, precision=precision, **kwargs)
    return matmul(x, w, cfg)
  return dot_general


def dense(features, axes, cfg, name, use_bias=False, init_scale=1.0,
          bias_init=nn.initializers.zeros):
  """An nn.Dense [in, out] with logical axis names (created in the caller's scope)."""
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype,
                  param_dtype=cfg.params_dtype, dot_general=cfg.dot_general,
                  kernel_init=logical(scaled(init_scale), *axes),
                  bias_init=logical(bias_init, axes[1]), name=name)


def rms_norm(cfg, name):
  return nn.RMSNorm(epsilon=1e-6, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    scale_init=logical(nn.initializers.ones, "embed"), name=name)


class MLP(nn.Module):
  """in -> hidden GELU -> out, with biases."""
  hidden: int
  out: int
  cfg: Any
  hidden_axis: str = "mlp"
  out_init_scale: float = 1.0
  out_bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    y = dense(self.hidden, ("embed", self.hidden_axis), self.cfg, "up", use_bias=True)(x)
    y = constrain(nn.gelu(y), *ACTIVATION_HIDDEN[:y.ndim - 1], "activation_mlp")
    return dense(self.out, (self.hidden_axis, "embed"), self.cfg, "down", use_bias=True,
                 init_scale=self.out_init_scale, bias_init=self.out_bias_init)(y)


def embedding(module, cfg):
  """The [vocab, embed] table (tied with the head), created in `module`'s scope."""
  return module.param("embed", logical(nn.initializers.normal(cfg.d_model ** -0.5),
                                       "vocab", "embed"),
                      (cfg.vocab_size, cfg.d_model), cfg.params_dtype)


def embed_tokens(embed_VD, tokens_BT, cfg):
  """The tokens' rows of the table [B, T, D] in the compute dtype, batch-sharded. The
  table is gathered whole along its width first (as FSDP gathers any weight before
  using it): a lookup into a width-sharded table cannot reach the batch sharding
  without an involuntary full rematerialisation."""
  table_VD = constrain(embed_VD, "activation_vocab", None)
  return constrain(jnp.take(table_VD, tokens_BT, axis=0).astype(cfg.compute_dtype), *BTD)


def tied_head(x_BTD, embed_VD, cfg):
  """Logits float32 [B, T, V] from the tied embedding."""
  if mixed_dot(cfg) is not None:
    return matmul(x_BTD.astype(jnp.float32), embed_VD.T.astype(jnp.float32), cfg)
  return jnp.einsum("btd,vd->btv", x_BTD, embed_VD.astype(cfg.compute_dtype),
                    preferred_element_type=jnp.float32)


class LanguageModel:
  """What every model here shares beyond its own `__call__` (a mixin of the Flax
  module): the tied head applied to final hidden states, the decoding form, a
  form whose state holds a longer context, and no long-term memory by default."""

  def logits(self, params, x_BTD):
    """Logits float32 [B, T, V] of final hidden states (`apply(..., head=False)`)."""
    return tied_head(x_BTD, params["embed"], self.cfg)

  def unstack(self, params=None):
    """(decoding model, its params): layers unrolled, weights read in place."""
    if self.unstacked:
      return self, params
    model = type(self)(self.cfg, unstacked=True, parent=None)
    return model, None if params is None else unstack_params(params, self.cfg.n_layers)

  def for_context(self, n_tokens):
    """This model with a decoding state that holds `n_tokens` tokens of context."""
    return type(self)(self.cfg.for_context(n_tokens), unstacked=self.unstacked, parent=None)

  def without_memory_read(self, variables):
    """The variables with the long-term memory's read-out zeroed (None: no memory)."""
    del variables
    return None

  def with_memory_geometry(self, slots, levels):
    """This model with another long-term memory geometry (the parameters do not
    depend on it), or None for a model without a memory."""
    del slots, levels
    return None


def run_layers(block_cls, cfg, x, state, *args, unstacked=False, deterministic=True):
  """Applies `cfg.n_layers` blocks `block_cls(cfg, deterministic)(x, state_l, *args)`.

  Parameters always live stacked under `blocks` (a leading `layers` axis), so a
  checkpoint loads whatever `scan_layers` is: `scan_layers` only chooses between
  a rolled loop (compile time independent of depth) and a fully unrolled one.
  `unstacked=True` is the decoding form: layers `block_<i>` with their own
  parameters (see `unstack_params`); it also takes the state as a list of
  per-layer states (`split_state`) and then returns one, so a decoding loop
  carries each layer's state in place instead of slicing and restacking it
  every token. Returns (x, new state, stacked aux).
  """
  block = block_cls
  if cfg.remat != "none":
    block = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=cfg.scan_layers)
  if unstacked:
    states, auxes = [], []
    for i in range(cfg.n_layers):
      x, (st_i, aux_i) = block(cfg, deterministic, name=f"block_{i}")(
          x, layer_state(state, i), *args)
      states.append(st_i)
      auxes.append(aux_i)
    stack = lambda *s: jnp.stack(s)
    if not isinstance(state, list):
      states = jax.tree_util.tree_map(stack, *states)
    return x, states, jax.tree_util.tree_map(stack, *auxes)
  scanned = nn.scan(block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(0,) + (nn.broadcast,) * len(args), length=cfg.n_layers,
                    unroll=1 if cfg.scan_layers else cfg.n_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  x, (new_state, aux) = scanned(cfg, deterministic, name="blocks")(
      x, state, *args)
  return x, new_state, aux


def unstack_params(params, n_layers):
  """Stacked `blocks` params -> per-layer `block_<i>` params (the decoding form)."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(n_layers):
    out[f"block_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["blocks"])
  return out


def split_state(state, n_layers):
  """A state stacked over layers -> a list of per-layer states (as-is if already one)."""
  if isinstance(state, list):
    return state
  return [jax.tree_util.tree_map(lambda s, i=i: s[i], state) for i in range(n_layers)]


def stack_state(state):
  """A list of per-layer states -> the stacked form (as-is if already stacked)."""
  if not isinstance(state, list):
    return state
  return jax.tree_util.tree_map(lambda *s: jnp.stack(s), *state)


def layer_state(state, i):
  """Layer i's state, from the stacked form or a list of per-layer states."""
  if isinstance(state, list):
    return state[i]
  return jax.tree_util.tree_map(lambda s: s[i], state)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def bound(x, r):
  """clip(x, -r, r) with derivative 1 everywhere (a straight-through bound)."""
  return jnp.clip(x, -r, r)


@bound.defjvp
def _bound_jvp(r, primals, tangents):
  (x,), (dx,) = primals, tangents
  return bound(x, r), dx


def positions(pos0, reset_T):
  """Position of every token in its document, given the carried position, and the
  index of the last document start at or before each token (-1: none in the window)."""
  t_T = jnp.arange(reset_T.shape[0])
  last_reset_T = jax.lax.cummax(jnp.where(reset_T, t_T, -1))
  pos_T = jnp.where(last_reset_T >= 0, t_T - last_reset_T, pos0 + t_T)
  return pos_T, last_reset_T
