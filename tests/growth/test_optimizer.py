"""The optimizer state grown with the parameters (growth/optimizer.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from flax import linen as nn

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.growth import expander
from mmrec_jax.growth import optimizer as gopt
from mmrec_jax.training import optimizer as opt_lib

BASE = {"model.vocab_size": 64, "model.d_model": 16, "model.n_heads": 2, "model.chunk_size": 8,
        "model.mem_slots": 2, "model.mem_levels": 2, "model.mem_out_init": 1.0,
        "train.grad_clip": 0.0, "train.warmup_steps": 2, "train.steps": 100}


def _tx(c):
  boxed = models.init_params(models.build(c.model), jax.random.key(0))
  return opt_lib.make(c.train, opt_lib.decay_mask(boxed),
                      opt_lib.lr_scale_tree(boxed, "", models.build(c.model).lr_scales()))


def _loss(model):
  def f(p, x):
    logits = model.apply({"params": p}, x[:, :-1])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
  return f


def _trained_small(c, steps=3):
  model, tx = models.build(c.model), _tx(c)
  p = nn.unbox(models.init_params(model, jax.random.key(1)))
  o = tx.init(p)
  grad, update = jax.jit(jax.grad(_loss(model))), jax.jit(tx.update)
  for i in range(steps):
    g = grad(p, jax.random.randint(jax.random.key(10 + i), (2, 32), 0, 64))
    u, o = update(g, o, p)
    p = optax.apply_updates(p, u)
  return model, tx, p, o


def test_a_step_from_the_carried_state_moves_the_old_coordinates_as_the_small_model():
  sc = config_lib.load("tiny", dict(BASE, **{"model.n_layers": 2}))
  bc = config_lib.load("tiny", dict(BASE, **{"model.n_layers": 3}))
  sm, stx, sp, so = _trained_small(sc)
  bm, btx = models.build(bc.model), _tx(bc)
  bp = expander.grow_params(sp, sc.model, bc.model, jax.random.key(0))
  bo = gopt.grow_opt_state(so, sc.model, bc.model, btx.init(bp))
  x = jax.random.randint(jax.random.key(2), (2, 32), 0, 64)
  u, _ = jax.jit(stx.update)(jax.jit(jax.grad(_loss(sm)))(sp, x), so, sp)
  sp1 = optax.apply_updates(sp, u)
  u, _ = jax.jit(btx.update)(jax.jit(jax.grad(_loss(bm)))(bp, x), bo, bp)
  bp1 = optax.apply_updates(bp, u)
  old = [s for s, new in expander.depth_map(2, 3) if not new]
  assert old == [0, 1]
  for path, a in jax.tree_util.tree_leaves_with_path(sp1):
    b = bp1
    for k in path:
      b = b[k.key]
    if path[0].key == "blocks":
      b = b[np.array([0, 1])]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, err_msg=str(path))


def test_moments_follow_the_parameters_maps():
  sc = config_lib.load("tiny", dict(BASE, **{"model.n_layers": 2}))
  bc = config_lib.load("tiny", dict(BASE, **{"model.n_layers": 3, "model.d_model": 32,
                                             "model.n_heads": 4, "model.vocab_size": 70}))
  _, _, sp, so = _trained_small(sc)
  btx = _tx(bc)
  bp = expander.grow_params(sp, sc.model, bc.model, jax.random.key(0))
  bo = gopt.grow_opt_state(so, sc.model, bc.model, btx.init(bp))
  s_adam = [x for x in jax.tree.leaves(so, is_leaf=gopt._is_adam) if gopt._is_adam(x)][0]  # pylint: disable=protected-access
  b_adam = [x for x in jax.tree.leaves(bo, is_leaf=gopt._is_adam) if gopt._is_adam(x)][0]  # pylint: disable=protected-access
  assert int(b_adam.count) == int(s_adam.count)
  # the structure is the big optimizer's, every second moment >= 0
  assert jax.tree.structure(b_adam.nu) == jax.tree.structure(bp)
  assert all(bool((x >= 0).all()) for x in jax.tree.leaves(b_adam.nu))
  # the inserted block (layer 2 copies layer 1) starts at zero moments
  assert float(jnp.abs(b_adam.mu["blocks"]["ffn"]["up"]["kernel"][2]).max()) == 0.0
  # new vocabulary rows start at zero; old rows' embed moments are copies along the width
  emb = b_adam.mu["embed"]
  assert float(jnp.abs(emb[64:]).max()) == 0.0
  np.testing.assert_allclose(np.asarray(emb[:64, :8]), np.asarray(s_adam.mu["embed"][:, :8]),
                             atol=1e-7)
  # a split input axis: the first moment halves (two copies), the second quarters
  mu_s, nu_s = s_adam.mu["blocks"]["mix_out"]["kernel"], s_adam.nu["blocks"]["mix_out"]["kernel"]
  mu_b, nu_b = b_adam.mu["blocks"]["mix_out"]["kernel"], b_adam.nu["blocks"]["mix_out"]["kernel"]
  src = expander.width_map(16, 32, 2, 4)
  np.testing.assert_allclose(np.asarray(mu_b[0][:, :16]), np.asarray(mu_s[0][src][:, :16]) / 2,
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(nu_b[0][:, :16]), np.asarray(nu_s[0][src][:, :16]) / 4,
                             rtol=1e-5, atol=1e-12)
  # new_moments="neighbour": the inserted block's second moments are its neighbour's
  # (its first moments still zero); the old blocks' are unchanged
  nb = gopt.grow_opt_state(so, sc.model, bc.model, btx.init(bp), new_moments="neighbour")
  nb_adam = [x for x in jax.tree.leaves(nb, is_leaf=gopt._is_adam) if gopt._is_adam(x)][0]  # pylint: disable=protected-access
  for name in ("mix_out", "fused"):
    nu = nb_adam.nu["blocks"][name]["kernel"]
    np.testing.assert_array_equal(np.asarray(nu[2]), np.asarray(nu[1]))
    np.testing.assert_array_equal(np.asarray(nu[:2]),
                                  np.asarray(b_adam.nu["blocks"][name]["kernel"][:2]))
    assert float(jnp.abs(nb_adam.mu["blocks"][name]["kernel"][2]).max()) == 0.0
  with pytest.raises(ValueError, match="new_moments"):
    gopt.grow_opt_state(so, sc.model, bc.model, btx.init(bp), new_moments="other")


def test_stacking_repeats_the_trained_stack():
  sc = config_lib.load("tiny", dict(BASE, **{"model.n_layers": 2}))
  bc = config_lib.load("tiny", dict(BASE, **{"model.n_layers": 4}))
  _, _, sp, _ = _trained_small(sc, steps=1)
  bp = expander.grow_params(sp, sc.model, bc.model, jax.random.key(0), depth="stack")
  k_s, k_b = sp["blocks"]["mix_out"]["kernel"], bp["blocks"]["mix_out"]["kernel"]
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(k_b[i]), np.asarray(k_s[i % 2]))
