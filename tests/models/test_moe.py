"""The dropless top-2 mixture of experts (`models/moe.py`) in MM-Rec: the capacity
factor changes nothing, `dense` and `ragged` agree, cost is linear in length and
counted right. (Its routing keeps documents, pieces and batch rows apart: the
contract, tests/models/test_contract.py, runs MoE at its default settings.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import models
from mmrec_jax.models import mmrec as M
from tests.support import random_tokens

V = 64
# Every option on, MoE at its default settings (moe_capacity_factor left at 1.25); the
# memory read on its own residual branch.
MOE = M.MMRecConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4, mem_slots=2,
                    mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True, moe_experts=4,
                    use_uboo=True, mem_residual=True, mem_out_init=1.0)
IMPLS = ("dense", "ragged")


def _tokens(B, T, seed=1):
  return random_tokens(B, T, seed, V, low=2)


def test_moe_capacity_factor_is_ignored():
  model = M.MMRec(MOE.replace(moe_impl="dense"))
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks = _tokens(2, 24, seed=5)
  ref, _, _ = jax.jit(lambda p, t: model.apply({"params": p}, t, state=model.init_state(2)))(
      params, toks)
  tiny = M.MMRec(model.cfg.replace(moe_capacity_factor=0.05))
  lo, _, _ = jax.jit(lambda p, t: tiny.apply({"params": p}, t, state=tiny.init_state(2)))(
      params, toks)
  np.testing.assert_allclose(lo, ref, atol=1e-6, rtol=1e-6)


def test_moe_dense_and_ragged_agree_in_values_and_gradients():
  toks = _tokens(2, 24, seed=4)
  out = {}
  for impl in IMPLS:
    model = M.MMRec(MOE.replace(moe_impl=impl))
    params = nn.unbox(models.init_params(model, jax.random.key(0)))

    def loss(p, model=model):
      lo, _, aux = model.apply({"params": p}, toks[:, :-1])
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1))
      return ce + 0.01 * aux["moe"], aux["moe"]

    out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (ld, auxd), gd = out["dense"]
  (lr, auxr), gr = out["ragged"]
  np.testing.assert_allclose(ld, lr, rtol=1e-5)
  np.testing.assert_allclose(auxd, auxr, rtol=1e-5)
  assert float(auxd) > 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gd), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(gd["blocks"]["moe"]["router"]["kernel"]).max()) > 0


def _step_flops_per_token(cfg, T, B=1):
  model = M.MMRec(cfg)
  params = jax.eval_shape(lambda r: nn.unbox(models.init_params(model, r)), jax.random.key(0))
  toks = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)

  def loss(p, t):
    lo, _, aux = model.apply({"params": p}, t[:, :-1])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), t[:, 1:, None], -1))
    return ce + sum(w * aux[k] for k, w in model.aux_weights().items())

  cost = jax.jit(jax.grad(loss)).lower(params, toks).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / (B * T)


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_train_step_flops_per_token_do_not_grow_with_length(impl):
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=64,
                      mem_slots=2, mem_levels=2, use_moe=True, moe_experts=4, ffn_mult=4,
                      moe_impl=impl)
  short, long = _step_flops_per_token(cfg, 512), _step_flops_per_token(cfg, 4096)
  assert long < 1.3 * short, (short, long)


def test_moe_flops_per_token_count_the_experts_that_run():
  cfg = MOE.replace(use_dpg=False, use_uboo=False)
  D, F, E = cfg.d_model, cfg.ffn_mult * cfg.d_model, cfg.moe_experts
  dense = M.MMRec(cfg.replace(use_moe=False)).flops_per_token()
  moe = M.MMRec(cfg.replace(moe_impl="dense")).flops_per_token()
  per_expert = cfg.n_layers * 2 * 2 * D * F
  np.testing.assert_allclose(moe - dense, (E - 1) * per_expert + cfg.n_layers * 2 * D * E)

