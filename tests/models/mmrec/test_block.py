"""An MM-Rec block's decay: its range at init (MDI) and its bounds and gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax.models.mmrec import block as block_lib
from mmrec_jax.models.mmrec import MMRec, MMRecConfig

V = 64


def _decays_at_init(cfg, T=64):
  """Per-channel decay at init, averaged over random inputs, via the block's own
  parameters, sub-module outputs and `log_decay` (one compile)."""
  block = block_lib.Block(cfg)
  state = jax.tree.map(lambda s: s[0], MMRec(cfg).init_state(2))
  x = jax.random.normal(jax.random.key(1), (2, T, cfg.d_model))
  reset = jnp.zeros((2, T), bool)

  @jax.jit
  def decays(x, state, reset):
    params = nn.unbox(block.init(jax.random.key(0), x, state, reset)["params"])
    _, inter = block.apply({"params": params}, x, state, reset, capture_intermediates=True,
                           mutable=["intermediates"])
    inter = inter["intermediates"]
    log_a = block_lib.log_decay(params["lam"], inter["mdi_base"]["__call__"][0],
                                inter["mdi_ctx"]["__call__"][0])
    return jnp.exp(log_a).mean(axis=(0, 1))
  return np.asarray(decays(x, state, reset))


@pytest.mark.parametrize("lo,hi", [(0.9, 0.999), (0.5, 0.9999)])
def test_decays_at_init_span_the_configured_range(lo, hi):
  cfg = MMRecConfig(vocab_size=V, d_model=128, n_layers=1, n_heads=4, decay_min=lo,
                    decay_max=hi)
  a = _decays_at_init(cfg)
  assert abs(a.min() - lo) < 0.1 * (1 - lo), a.min()     # timescales within 10%
  assert abs(a.max() - hi) < 0.1 * (1 - hi), a.max()
  # Timescales 1 / (1 - a) spread geometrically: the median is their geometric mean.
  tau = 1 / (1 - a)
  want = np.sqrt(1 / ((1 - lo) * (1 - hi)))
  assert 0.8 * want < np.median(tau) < 1.25 * want


def test_decay_keeps_a_gradient_at_extreme_inputs_and_stays_in_open_interval():
  """Strictly between 0 and 1 (1 - a finite too) for any gate input, with a positive
  gradient everywhere (the gates' bounds are straight-through)."""
  x = jnp.array([-1e4, -50.0, -16.0, -1.0, 0.0, 1.0, 16.0, 50.0, 1e4])
  lam = jnp.zeros_like(x)
  for base in (x, -x, jnp.zeros_like(x)):
    for ctx in (x, -x, jnp.zeros_like(x)):
      la = block_lib.log_decay(lam, base[None, None], ctx[None, None])
      a = jnp.exp(la)
      assert bool(((a > 0) & (a < 1)).all())
      assert bool(jnp.isfinite(-jnp.expm1(la)).all())
      f = lambda l, b, c: jnp.sum(block_lib.log_decay(l, b[None, None], c[None, None]))
      g_lam, g_base, g_ctx = jax.grad(f, argnums=(0, 1, 2))(lam, base, ctx)
      for g in (g_lam, g_base, g_ctx):
        assert bool((g > 0).all()), (base, ctx, g)
