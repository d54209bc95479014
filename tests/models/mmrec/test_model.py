"""MM-Rec's own invariants (design note, 'Invariants'), on small shapes: its long-term
memory, gradients, auxiliary losses, options, precision and cost. What every model
keeps (causality, resets, streaming, decoding, scanned layers, growth) is in
tests/models/test_contract.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import models
from mmrec_jax.errors import ConfigError
from mmrec_jax.models import mmrec as M
from tests.support import random_tokens

V = 64
ALL_ON = M.MMRecConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                       mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True, moe_experts=4,
                       use_uboo=True, dropout=0.1, mem_qk_norm=True,
                       mem_pool="exp", mem_read_logn=True, mem_sink=True,
                       mem_key="previous", mem_out_init=1.0)
NOMEM = {"vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 2, "mem_levels": 0}


@pytest.fixture(scope="module")
def all_on():
  model = M.MMRec(ALL_ON)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  apply = jax.jit(lambda p, t, s, r: model.apply({"params": p}, t, state=s, reset=r))
  return model, params, apply


def _tokens(B, T, seed=1):
  return random_tokens(B, T, seed, V)


def test_memory_is_read_block_causally(all_on):
  model, params, apply = all_on
  toks = _tokens(1, 24, seed=4)
  base, _, _ = apply(params, toks, model.init_state(1), None)
  p2 = jax.tree_util.tree_map(lambda x: x, params)
  for blk in ("key", "value"):
    k = p2["blocks"]["memory"][blk]["kernel"]
    p2["blocks"]["memory"][blk]["kernel"] = k * 3.0
  other, _, _ = apply(p2, toks, model.init_state(1), None)
  d_T = jnp.abs(other - base).max(axis=(0, 2))
  C = ALL_ON.chunk_size
  assert float(d_T[:C].max()) == 0.0      # first chunk: empty memory
  assert float(d_T[C:].min()) > 0.0       # later chunks read the memory


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_nan_or_inf_over_32k_tokens(dtype):
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, chunk_size=32, mem_slots=4,
                      mem_levels=4, dtype=dtype)
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks = _tokens(1, 32768, seed=5)
  lo, st, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, toks)
  assert bool(jnp.isfinite(lo).all())
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(st)
             if jnp.issubdtype(x.dtype, jnp.floating))
  assert bool(st.memory.valid.any())  # memory filled


def test_every_parameter_gets_a_gradient(all_on):
  model, params, _ = all_on
  toks = _tokens(2, 32, seed=6)
  w = model.aux_weights()

  def loss(p):
    lo, _, aux = model.apply({"params": p}, toks[:, :-1], deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1))
    return ce + sum(w[k] * aux[k] for k in aux)

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(p) for p, g in flat if not bool(jnp.any(g != 0))]
  assert not dead, f"parameters without gradient: {dead}"
  # Every layer and every expert is alive, not only the stacked arrays.
  for p, g in flat:
    g = np.asarray(g)
    assert (np.abs(g).reshape(g.shape[0], -1).max(1) > 0).all(), jax.tree_util.keystr(p)
  moe = np.asarray(grads["blocks"]["moe"]["w_up"])
  assert (np.abs(moe).reshape(moe.shape[0] * moe.shape[1], -1).max(1) > 0).all()


def test_a_zero_read_out_starts_the_memory_as_a_no_op_that_training_opens():
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=4,
                      mem_slots=2, mem_levels=2, mem_out_init=0.0)
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks = _tokens(2, 24, seed=3)

  def loss(p):
    lo, _, _ = model.apply({"params": p}, toks[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1))

  grads = jax.jit(jax.grad(loss))(params)["blocks"]["memory"]
  flat = {jax.tree_util.keystr(p): np.asarray(g)
          for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  # only the read-out learns at step 0; what is written and how it is read follow
  assert np.abs(flat["['out']['kernel']"]).max() > 0
  assert all(not g.any() for k, g in flat.items() if not k.startswith("['out']")), flat.keys()
  with pytest.raises(Exception, match="mem_out_init"):
    models.build(dict(cfg.__dict__, mem_out_init=-1.0))


def test_a_write_without_gradient_keeps_the_function_and_the_memorys_own_gradients():
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=4,
                      mem_slots=2, mem_levels=2, mem_out_init=1.0)
  toks = _tokens(2, 24, seed=4)
  base = M.MMRec(cfg)
  params = nn.unbox(models.init_params(base, jax.random.key(0)))

  def grads_and_logits(c):
    model = M.MMRec(c)

    def loss(p):
      lo, _, _ = model.apply({"params": p}, toks[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1)), lo
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  g_on, lo_on = grads_and_logits(cfg)
  g_off, lo_off = grads_and_logits(cfg.replace(mem_write_grad=False))
  np.testing.assert_array_equal(np.asarray(lo_on), np.asarray(lo_off))
  # what the memory's own weights learn is unchanged (they see the same values) ...
  for (p, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(g_on["blocks"]["memory"])[0],
                            jax.tree_util.tree_flatten_with_path(g_off["blocks"]["memory"])[0]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(p))
  # ... but the recurrence below the write gets less gradient: only through its own output
  k_on = np.asarray(g_on["blocks"]["fused"]["kernel"])
  k_off = np.asarray(g_off["blocks"]["fused"]["kernel"])
  assert np.abs(k_on - k_off).max() > 1e-3 * np.abs(k_on).max()


def test_options_off_create_no_parameters():
  off = M.MMRec(ALL_ON.replace(use_dpg=False, use_moe=False, use_uboo=False))
  names = {jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(models.param_shapes(off))[0]}
  assert not any("moe" in n or "uboo" in n or "rank" in n for n in names)
  assert any("ffn" in n for n in names)
  on = {jax.tree_util.keystr(p) for p, _ in
        jax.tree_util.tree_flatten_with_path(models.param_shapes(M.MMRec(ALL_ON)))[0]}
  assert any("moe" in n for n in on) and any("uboo" in n for n in on)
  assert not any("'ffn'" in n for n in on)


def test_memory_off_has_no_memory_parameters_or_state():
  on = models.param_shapes(models.build(dict(NOMEM, mem_levels=2)))
  off = models.param_shapes(models.build(NOMEM))
  assert "memory" in on["blocks"] and "memory" not in off["blocks"]
  assert off["blocks"]["fused"]["kernel"].shape[2] == 4   # no memory query slice
  assert models.build(NOMEM).init_state(1).memory is None
  assert models.build(NOMEM).flops_per_token(64) < models.build(dict(
      NOMEM, mem_levels=2)).flops_per_token(64)


def test_aux_losses_are_returned_and_non_degenerate(all_on):
  model, params, apply = all_on
  _, _, aux = apply(params, _tokens(2, 16), model.init_state(2), None)
  assert set(aux) == {"moe", "uboo"}
  # A zero predictor does not minimise UBOO: the target has unit RMS.
  zero = jax.tree_util.tree_map(lambda x: x, params)
  zero["blocks"]["uboo"] = jax.tree_util.tree_map(jnp.zeros_like, zero["blocks"]["uboo"])
  _, _, aux0 = apply(zero, _tokens(2, 16), model.init_state(2), None)
  assert float(aux0["uboo"]) == pytest.approx(ALL_ON.n_layers * 1.0, rel=1e-3)
  assert 0.0 < float(aux["moe"]) < ALL_ON.moe_experts


def test_bfloat16_compute_tracks_float32():
  cfg = ALL_ON.replace(dropout=0.0, use_moe=False)
  params = nn.unbox(models.init_params(M.MMRec(cfg), jax.random.key(0)))
  toks = _tokens(1, 24)
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, toks)[0])(params)
  ref = run(M.MMRec(cfg))
  lo = run(M.MMRec(cfg.replace(dtype="bfloat16")))
  assert lo.dtype == jnp.float32
  assert float(jnp.abs(lo - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_flops_per_token_counts_the_head_and_memory():
  f = M.MMRec(ALL_ON).flops_per_token(64)
  assert f > 2 * ALL_ON.d_model * ALL_ON.vocab_size
  assert M.MMRec(ALL_ON.replace(mem_levels=6)).flops_per_token(64) > f


def test_lr_scales_of_the_memory():
  """The model's own learning-rate factors: `model.mem_lr_scale` for `memory`, none
  without a memory."""
  cfg = dict(kind="mmrec", vocab_size=16, d_model=8, n_layers=1, n_heads=2)
  assert models.build(dict(cfg, mem_lr_scale=0.5)).lr_scales() == {"memory": 0.5}
  assert models.build(dict(cfg, mem_lr_scale=0.5, mem_levels=0)).lr_scales() == {}
  with pytest.raises(ConfigError, match="mem_lr_scale"):
    models.build(dict(cfg, mem_lr_scale=-1))


def test_another_memory_geometry_runs_the_same_parameters(all_on):
  """`with_memory_geometry`: the trained parameters with more room. While every chunk
  fits level 0, the geometry does not change the function; the shipped 2 slots x 3
  levels pool chunks, and change it."""
  model, params, apply = all_on
  toks = _tokens(2, 24, seed=9)           # 6 chunks of 4
  base, _, _ = apply(params, toks, model.init_state(2), None)
  outs = []
  for slots, levels in ((8, 1), (16, 2)):
    m = model.with_memory_geometry(slots, levels)
    assert (m.cfg.mem_slots, m.cfg.mem_levels) == (slots, levels)
    outs.append(m.apply({"params": params}, toks, state=m.init_state(2))[0])
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  assert float(jnp.abs(outs[0] - base).max()) > 1e-4
  assert models.build(NOMEM).with_memory_geometry(8, 1) is None
