"""`train.carry_state`: training with each batch row's recurrent state carried from
one step to the next (streams of consecutive windows, exact resume, clear errors)."""
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import config as config_lib
from mmrec_jax import data as data_lib
from mmrec_jax import loss as loss_lib
from mmrec_jax import train
from mmrec_jax import train_state as ts_lib
from mmrec_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
OVERRIDES = {
    "model.vocab_size": 280, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
    "model.chunk_size": 8, "model.mem_slots": 2, "model.mem_levels": 2,
    "train.seq_len": 16, "train.batch_size": 2, "train.steps": 6, "train.warmup_steps": 1,
    "train.eval_every": 6, "train.eval_batches": 1, "train.log_every": 1, "train.samples": 0,
    "checkpoint.every": 3, "data.val_fraction": 0.1, "train.carry_state": True,
    "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
}


def make_config(corpus=None, **kw):
  c = config_lib.load_config_file(TINY)
  for k, v in {**OVERRIDES, "data.path": corpus, **kw}.items():
    sec, name = k.split(".")
    c[sec][name] = v
  return config_lib.validate(c)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  os.environ["MMREC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "carry_token_cache")
  d = tmp_path_factory.mktemp("carry_corpus")
  words = "the quick brown fox jumps over a lazy dog while birds sing in tall trees".split()
  rnd = random.Random(0)
  for i in range(20):
    (d / f"doc{i}.txt").write_text(" ".join(rnd.choice(words) for _ in range(300)) + "\n")
  return str(d)


def test_streams_give_each_row_consecutive_windows_and_resume_exactly():
  T, B = 4, 2
  ds = data_lib.Datasets(train_tokens=np.arange(1, 4 * 10 + 2), val_tokens=None, seq_len=T,
                         batch_size=B, seed=0, eod_id=-1, pad_id=0,
                         bytes_per_token=np.ones(64, np.int32), carry_state=True)
  n = ds.num_train_windows // B   # 10 windows: 2 streams of 5
  it = ds.train_iter()
  batches = [next(it) for _ in range(2 * n + 1)]
  for g, b in enumerate(batches):
    for j in range(B):
      w = j * n + g % n
      np.testing.assert_array_equal(b["inputs"][j], np.arange(w * T + 1, w * T + T + 1))
      np.testing.assert_array_equal(b["targets"][j], b["inputs"][j] + 1)
      # a stream's first window (also after it wraps round) starts from a fresh state
      assert b["reset"][j, 0] == (g % n == 0)
      assert not b["reset"][j, 1:].any()
  it = ds.train_iter()
  for _ in range(3):
    next(it)
  state = it.get_state()
  it2 = ds.train_iter()
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["inputs"], batches[3]["inputs"])


def test_a_step_continues_from_the_carried_state():
  """Two steps over consecutive windows give the second window the losses of the
  second half of one pass over both (with the parameters held fixed)."""
  c = make_config("unused")
  s = ts_lib.setup(c, jax.devices()[:1])
  step = jax.jit(ts_lib.make_train_step(s.model, optax.sgd(0.0), lambda _: 0.0, 1, s.mesh))
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


@pytest.mark.slow
def test_resume_with_a_carried_state_equals_uninterrupted(corpus, tmp_path):
  const = {"train.min_lr_ratio": 1.0}   # the schedule does not depend on train.steps
  one = train.run(make_config(corpus, **const), str(tmp_path / "a"), jax.devices()[:1],
                  quiet=True)
  b = str(tmp_path / "b")
  train.run(make_config(corpus, **const, **{"train.steps": 3}), b, jax.devices()[:1], quiet=True)
  two = train.run(make_config(corpus, **const), b, jax.devices()[:1], quiet=True)
  assert two.step == 6 and [l for s, l in two.train_losses] == [l for s, l in one.train_losses
                                                               if s > 3]
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # the carried state was saved with the step, and a run without it is refused
  mngr = ckpt_lib.make_manager(b, read_only=True)
  assert "carry" in mngr.item_metadata(6)["train"]
  with pytest.raises(ConfigError, match="train.carry_state=True"):
    train.run(make_config(corpus, **const, **{"train.carry_state": False, "train.steps": 9}), b,
              jax.devices()[:1], quiet=True)


def test_carry_state_config_errors_are_one_line():
  with pytest.raises(ConfigError, match="train.grad_accum=1") as e:
    make_config("unused", **{"train.grad_accum": 2})
  assert "\n" not in str(e.value)
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "baselines",
                                               "transformer_tiny.py"))
  c.train.carry_state = True
  with pytest.raises(ConfigError, match="fixed-size recurrent state") as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)
