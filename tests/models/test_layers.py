"""Layers every model shares (`models/layers.py`): mixed-precision matmuls, the
straight-through bound, document positions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmrec_jax import models
from mmrec_jax.models import layers
from mmrec_jax.models import mmrec as M
from tests.support import random_tokens

V = 64
ALL_ON = M.MMRecConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                       mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True,
                       moe_experts=4, use_uboo=True, dropout=0.1, mem_qk_norm=True,
                       mem_pool="exp", mem_read_logn=True, mem_sink=True, mem_out_init=1.0)


@pytest.mark.parametrize("kind", ["mmrec", "transformer"])
def test_bfloat16_matmuls_track_float32_in_values_and_gradients(kind):
  """`matmul_dtype="bfloat16"` on a float32 model: every dense layer's and the head's
  matmul, forward and gradient, runs on bfloat16 operands with float32 results
  (what makes it fast on AMX CPUs); logits and gradients stay close to float32's."""
  cfg = (ALL_ON.replace(dropout=0.0, use_moe=False) if kind == "mmrec"
         else models.make_config({"kind": "transformer", "vocab_size": V, "d_model": 32,
                                  "n_layers": 2, "n_heads": 4}))
  model = models.build(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks = random_tokens(2, 24, 1, V)

  def loss(p, m):
    logits = m.apply({"params": p}, toks)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  fn = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(p, m), has_aux=True))
  (_, ref), g_ref = fn(model)(params)
  mixed = models.build(cfg.replace(matmul_dtype="bfloat16"))
  (_, lo), g_lo = fn(mixed)(params)
  assert lo.dtype == jnp.float32
  assert 0 < float(jnp.abs(lo - ref).max()) < 0.05 * float(jnp.abs(ref).max())
  for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_lo)):
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(a)) + 1e-6
  # Every dense kernel's matmuls (2-D: forward and the gradient's) take bfloat16
  # operands; only the memory's batched products (its read over slots, chunk
  # sums) stay in the compute dtype.
  hlo = fn(mixed).lower(params).as_text()
  dots = [l.split(":")[-1] for l in hlo.splitlines() if "dot_general" in l]
  plain = [d for d in dots if d.split(">")[0].count("x") == 2]
  kernels = [k for k in jax.tree_util.tree_flatten_with_path(params["blocks"])[0]
             if "kernel" in jax.tree_util.keystr(k[0])]
  assert all("bf16" in d for d in plain) and len(plain) >= 2 * len(kernels) > 0, plain


def test_bound_clips_with_a_straight_through_gradient():
  x = jnp.array([-5.0, -1.0, 0.5, 3.0])
  np.testing.assert_array_equal(layers.bound(x, 2.0), [-2.0, -1.0, 0.5, 2.0])
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(layers.bound(v, 2.0)))(x), 1.0)


def test_positions_count_from_the_last_document_start():
  pos, last = layers.positions(jnp.int32(7), jnp.array([False, False, True, False, True]))
  assert pos.tolist() == [7, 8, 0, 1, 0] and last.tolist() == [-1, -1, 2, 2, 4]


def test_remat_policies_give_the_same_gradients():
  """`model.remat` decides what the backward pass stores or recomputes, never the
  gradient (a forward comparison could not tell)."""
  base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, chunk_size=4, mem_slots=2,
              mem_levels=2, mem_out_init=1.0)
  toks = jax.random.randint(jax.random.key(1), (2, 16), 1, 32)
  params = models.init_params(models.build(base), jax.random.key(0))

  def grads(remat):
    m = models.build(dict(base, remat=remat))
    f = lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, toks)[0]))
    return jax.jit(jax.grad(f))(params)

  ref = grads("none")
  for remat in ("projections", "full"):
    for a, b in zip(jax.tree.leaves(grads(remat)), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
