"""The Transformer baseline's own behaviour: past its KV cache it runs as sliding-window
attention, its state fixed in size. (What every model keeps: test_contract.py.)"""
import jax
import jax.numpy as jnp
from flax import linen as nn

from mmrec_jax import models
from tests.support import random_tokens

V = 64
TINY_T = {"kind": "transformer", "vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 2,
          "cache_len": 24}


def test_transformer_runs_past_its_cache_as_a_sliding_window():
  model = models.build(TINY_T)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  s = model.init_state(1)
  size = models.state_bytes(s)
  for i in range(4):   # 4 x 16 tokens through a 24-token cache
    lo, s, _ = model.apply({"params": params}, random_tokens(1, 16, i, V), state=s)
    assert bool(jnp.isfinite(lo).all()) and models.state_bytes(s) == size
  assert int(s.pos[0, 0]) == 64


def test_for_context_lengthens_the_cache_only():
  cfg = models.make_config(TINY_T)
  assert cfg.for_context(10) is cfg
  assert cfg.for_context(100) == cfg.replace(cache_len=100)
  assert models.build(cfg).for_context(100).init_state(1).k.shape[2] == 100
  assert not type(cfg).CARRIES_STATE and type(cfg).GROWTH is None
