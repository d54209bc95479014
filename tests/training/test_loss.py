"""The loss (`training/loss.py`): the head and the loss in chunks equal one piece."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmrec_jax import models
from mmrec_jax.models import mmrec as M
from mmrec_jax.training import loss as loss_lib
from tests.support import random_tokens

V = 64
ALL_ON = M.MMRecConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                       mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_uboo=True,
                       mem_qk_norm=True, mem_pool="exp", mem_read_logn=True, mem_sink=True,
                       mem_out_init=1.0)


def _tokens(B, T, seed=1):
  return random_tokens(B, T, seed, V)


def test_the_head_and_loss_in_chunks_equal_one_piece():
  """train.loss_chunk: the loss from the hidden states, a few tokens at a time
  (the last chunk padded), equals the loss of the whole logits, gradients too."""
  cfg = ALL_ON
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks, tgts = _tokens(2, 24), _tokens(2, 24, seed=2)
  mask = (jnp.arange(24) < 20)[None].repeat(2, 0)

  def whole(p):
    logits = model.apply({"params": p}, toks)[0]
    return loss_lib.cross_entropy(logits, tgts, mask)[0]

  def chunked(p):
    x = model.apply({"params": p}, toks, head=False)[0]
    return loss_lib.head_cross_entropy(x, functools.partial(model.logits, p), tgts, mask,
                                       chunk=7)

  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (whole, chunked))
  np.testing.assert_allclose(b, a, rtol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
