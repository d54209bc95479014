"""The growth expander (`growth/expander.py`): function preservation (fresh and
streaming) with every option on, each growth alone, symmetry breaking, structure,
exactness errors, sharded growth, the shipped ladder exactly growable."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.errors import ConfigError
from mmrec_jax.growth import expander as grow
from mmrec_jax.training import sharding as shard_lib
TOL = 1e-4
BASE = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, chunk_size=4, mem_slots=2,
            mem_levels=2, scan_layers=False, mem_out_init=1.0)
OPTS = dict(use_moe=True, moe_experts=2, use_uboo=True, use_dpg=True,  # every option on
            mem_qk_norm=True, mem_pool="exp", mem_read_logn=True, mem_sink=True,
            mem_key="previous")
SMALL = dict(BASE, **OPTS)
BIG = dict(SMALL, d_model=32, n_heads=4, n_layers=3, vocab_size=96)


def cfg(**kw):
  return models.make_config(kw)


@functools.lru_cache(maxsize=None)
def logits_fn(c):
  return grow.logits_fn(c)


@functools.lru_cache(maxsize=None)
def params_of(c):
  """Fresh parameters; the memory's sink logits and null value (zeros at init) set
  to distinct values, so that growth must carry them to the right heads and dims."""
  p = traverse_util.flatten_dict(nn.unbox(models.init_params(models.build(c),
                                                             jax.random.key(0))), sep="/")
  for k, v in p.items():
    if k.endswith(("memory/read_sink", "memory/read_null")):
      p[k] = jnp.linspace(-1.0, 1.0, v.size, dtype=v.dtype).reshape(v.shape)
  return traverse_util.unflatten_dict(p, sep="/")


def tokens(V=64):
  t = np.array(jax.random.randint(jax.random.key(1), (2, 24), 2, V))
  t[1, 7] = 0   # a document start inside row 1
  return jnp.asarray(t)


def run(c, p, t, state=None):
  fn, model = logits_fn(c)
  state = model.init_state(t.shape[0]) if state is None else state
  return fn(p, t, state, t == 0)


def assert_preserved(small, p, big, g, t=None):
  """From a fresh state (first half), then streaming with the carried state (second
  half); and the small model's state grown with `grow_state` continues exactly too."""
  t = tokens() if t is None else t
  V = small.vocab_size
  a1, sa = run(small, p, t[:, :12])
  a2, _ = run(small, p, t[:, 12:], sa)
  b1, sb = run(big, g, t[:, :12])
  b2, _ = run(big, g, t[:, 12:], sb)
  np.testing.assert_allclose(b1[..., :V], a1, atol=TOL, rtol=0)
  np.testing.assert_allclose(b2[..., :V], a2, atol=TOL, rtol=0)
  c2, _ = run(big, g, t[:, 12:], grow.grow_state(sa, small, big))
  np.testing.assert_allclose(c2[..., :V], a2, atol=TOL, rtol=0)
  return a1


def test_width_heads_depth_vocab_two_stages_with_every_option_and_noise():
  a, b = cfg(**SMALL), cfg(**BIG)
  c = cfg(**dict(BIG, d_model=64, n_heads=8, n_layers=4, vocab_size=128))
  pa = params_of(a)
  pb = grow.grow_params(pa, a, b, jax.random.key(3), noise=0.1)
  la = assert_preserved(a, pa, b, pb)
  pc = grow.grow_params(pb, b, c, jax.random.key(4), noise=0.1)
  lc, _ = run(c, pc, tokens()[:, :12])
  np.testing.assert_allclose(lc[..., :64], la, atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind,change", [
    ("width", dict(d_model=32)),
    ("heads", dict(d_model=32, n_heads=4)),
    ("depth", dict(n_layers=4)),
    ("vocab", dict(vocab_size=96)),
])
def test_each_growth_alone(kind, change):
  del kind
  small, big = cfg(**SMALL), cfg(**dict(SMALL, **change))
  p = params_of(small)
  g = grow.grow_params(p, small, big, jax.random.key(3))
  assert_preserved(small, p, big, g)


@pytest.mark.slow
def test_ffn_to_moe_upcycling_uboo_switch_and_a_residual_read_are_exact():
  """Also with `mem_residual`: the memory's read-out then writes into the residual
  stream, so an inserted block must zero it too and width growth must split it."""
  small = cfg(**dict(BASE, mem_residual=True))
  big = cfg(**dict(BASE, mem_residual=True, d_model=32, n_layers=3, use_moe=True,
                   moe_experts=2, use_uboo=True))
  p = params_of(small)
  g = grow.grow_params(p, small, big, jax.random.key(3), noise=0.1)
  assert_preserved(small, p, big, g)


def test_structure_shapes_dtypes_equal_a_fresh_init():
  small = cfg(**SMALL)
  big = cfg(**dict(BIG, param_dtype="bfloat16"))
  g = jax.eval_shape(lambda p: grow.grow_params(p, small, big, jax.random.key(0), noise=0.1),
                     params_of(small))
  ref = models.param_shapes(models.build(big))
  assert jax.tree.structure(g) == jax.tree.structure(ref)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)


def test_deterministic_per_key_and_noise_zero_sum():
  small, big = cfg(**SMALL), cfg(**BIG)
  p = params_of(small)
  g1 = grow.grow_params(p, small, big, jax.random.key(7), noise=0.1)
  g2 = grow.grow_params(p, small, big, jax.random.key(7), noise=0.1)
  g3 = grow.grow_params(p, small, big, jax.random.key(8), noise=0.1)
  g0 = grow.grow_params(p, small, big, jax.random.key(8), noise=0.0)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(x, y)
  k1 = g1["blocks"]["fused"]["kernel"]
  assert not np.allclose(k1, g3["blocks"]["fused"]["kernel"])
  # zero-sum over the copies of each input unit: summed over copies, noise vanishes
  src = grow.width_map(16, 32, 2, 4)
  seg = lambda k: jax.ops.segment_sum(jnp.moveaxis(k, 1, 0), src, num_segments=16)
  np.testing.assert_allclose(seg(g3["blocks"]["fused"]["kernel"]),
                             seg(g0["blocks"]["fused"]["kernel"]), atol=1e-6)


def test_noise_breaks_symmetry_of_copies():
  small, big = cfg(**SMALL), cfg(**BIG)
  p = params_of(small)
  fn, model = logits_fn(big)
  t = tokens()[:, :12]
  w = jax.random.normal(jax.random.key(9), (2, 12, 96))

  @jax.jit
  def grads(g):
    def loss(g):
      logits, _ = fn(g, t, model.init_state(2), t == 0)
      return jnp.sum(jax.nn.log_softmax(logits) * w)
    return jax.grad(loss)(g)

  F = 4 * 16   # old FFN hidden width: expert hidden unit j and j + F are copies
  for noise, same in ((0.0, True), (0.1, False)):
    gr = grads(grow.grow_params(p, small, big, jax.random.key(3), noise=noise))
    w_up = np.asarray(gr["blocks"]["moe"]["w_up"])[:2]   # [L, E, D, 2F], the old layers
    a, b = w_up[..., :F], w_up[..., F:]
    rel = np.max(np.abs(a - b)) / np.max(np.abs(a))
    assert (rel < 1e-5) if same else (rel > 1e-3), (noise, rel)


def test_mesh_of_8_devices_gives_the_same_params():
  assert len(jax.devices()) == 8
  small, big = cfg(**SMALL), cfg(**BIG)
  p = params_of(small)
  mesh = shard_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  g1 = grow.grow_params(p, small, big, jax.random.key(3), noise=0.1)
  g8 = grow.grow_params(p, small, big, jax.random.key(3), noise=0.1, mesh=mesh)
  sh = g8["blocks"]["fused"]["kernel"].sharding
  assert isinstance(sh, jax.sharding.NamedSharding) and len(sh.device_set) == 8
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change,match", [
    (dict(d_model=8), "d_model shrinks"),
    (dict(d_model=24, n_heads=2), "not an integer multiple"),
    (dict(n_heads=4), "heads 2x8 -> 4x4"),
    (dict(use_dpg=False), "use_dpg switched off"),
    (dict(use_moe=False), "use_moe switched off"),
    (dict(mem_qk_norm=False), "mem_qk_norm switched off"),
    (dict(mem_pool="sigmoid"), "mem_pool changes"),
    (dict(mem_key="state"), "mem_key changes"),
    (dict(mem_read_logn=False), "mem_read_logn switched off"),
    (dict(mem_sink=False), "mem_sink switched off"),
    (dict(mem_residual=True), "mem_residual switched on"),
    (dict(chunk_size=8), "memory geometry model.chunk_size"),
    (dict(mem_levels=3), "memory geometry model.mem_levels"),
])
def test_inexact_growth_is_a_one_line_error(change, match):
  small, big = cfg(**SMALL), cfg(**dict(SMALL, **change))
  with pytest.raises(ConfigError, match=match) as e:
    grow.check_growable(small, big)
  assert "\n" not in str(e.value) and "--allow_inexact" in str(e.value)
  assert grow.check_growable(small, big, allow_inexact=True)


@pytest.mark.slow
def test_allow_inexact_grows_anyway():
  small, big = cfg(**SMALL), cfg(**dict(SMALL, d_model=24, n_heads=2))
  g = grow.grow_params(params_of(small), small, big, jax.random.key(0), allow_inexact=True)
  assert g["embed"].shape == (64, 24)


def test_shipped_ladder_is_exactly_growable():
  names = ("tiny", "mini", "small")
  cfgs = [config_lib.load(n).model for n in names]
  for a, b in zip(cfgs, cfgs[1:]):
    assert grow.inexact_reasons(a, b) == []
