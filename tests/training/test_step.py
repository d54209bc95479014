"""The train step (`training/step.py`): a step continues from the carried state, and
the loss in chunks gives the update of one piece."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmrec_jax import bench
from mmrec_jax import config as config_lib
from mmrec_jax.training import loss as loss_lib
from mmrec_jax.training import sharding as shard_lib
from mmrec_jax.training import state as ts_lib
from mmrec_jax.training import step as step_lib
from tests.support import TINY, assert_trees_close, carry_config


def test_a_step_continues_from_the_carried_state():
  """Two steps over consecutive windows give the second window the losses of the
  second half of one pass over both (with the parameters held fixed)."""
  c = carry_config("unused")
  s = ts_lib.setup(c, jax.devices()[:1])
  step = jax.jit(step_lib.make_train_step(s.model, optax.sgd(0.0), lambda _: 0.0, 1, s.mesh))
  state = ts_lib.create(s)
  T, B = c.train.seq_len, c.train.batch_size
  toks = jax.random.randint(jax.random.key(1), (B, 2 * T + 1), 3, c.model.vocab_size)
  reset = jnp.zeros((B, 2 * T), bool)
  ces = []
  for k in range(2):
    w = toks[:, k * T:(k + 1) * T + 1]
    batch = {"inputs": w[:, :-1], "targets": w[:, 1:], "reset": reset[:, :T],
             "mask": jnp.ones((B, T), jnp.float32)}
    state, m = step(state, batch)
    ces.append(float(m["ce"]))
  logits, _, _ = s.model.apply({"params": state.params}, toks[:, :-1], reset=reset)
  nll, _ = loss_lib.token_nll(logits, toks[:, 1:])
  np.testing.assert_allclose(ces[1], float(jnp.mean(nll[:, T:])), rtol=2e-5)
  assert abs(ces[1] - float(jnp.mean(nll[:, :T]))) > 1e-3   # the halves differ: not vacuous


def test_a_step_with_the_loss_in_chunks_equals_one_piece():
  """train.loss_chunk reaches the train step: the same loss and update as in one piece."""
  out = []
  for chunk in (0, 56):
    c = config_lib.load(TINY, {"model.vocab_size": 64, "model.d_model": 32, "model.n_layers": 1,
                               "train.batch_size": 8, "train.seq_len": 40,
                               "train.loss_chunk": chunk})
    s = ts_lib.setup(c)
    state = ts_lib.create(s)
    batch = shard_lib.put_batch(bench.random_batch(np.random.default_rng(0), 8, 40, 64), s.mesh)
    out.append(s.train_step(state, batch))
  (a, ma), (b, mb) = out
  np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
  np.testing.assert_allclose(mb["grad_norm"], ma["grad_norm"], rtol=1e-4)
  assert_trees_close(a.params, b.params, atol=1e-5)
