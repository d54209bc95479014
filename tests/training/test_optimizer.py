"""The optimizer (`training/optimizer.py`): per-module learning-rate factors, the
weight-decay mask and the schedule's second warmup."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax.config.sections import TrainConfig
from mmrec_jax.errors import ConfigError
from mmrec_jax.training import optimizer as opt_lib
from tests import support


def test_lr_scales_scale_a_modules_steps_and_keep_the_optimizer_state():
  t = TrainConfig(lr=1e-2, warmup_steps=0, steps=10, min_lr_ratio=1.0, b1=0.9, b2=0.95,
                  weight_decay=0.1, grad_clip=1.0)
  params = {"embed": np.ones((4, 3), np.float32),
            "blocks": {"memory": {"out": {"kernel": np.full((3, 3), 2.0, np.float32)}},
                       "ffn": {"kernel": np.full((3, 3), -1.0, np.float32)}}}
  grads = jax.tree.map(lambda p: np.linspace(-1, 1, p.size, dtype=np.float32).reshape(p.shape),
                       params)
  mask = opt_lib.decay_mask(params)

  def step(spec):
    tx = opt_lib.make(t, mask, opt_lib.lr_scale_tree(params, spec))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    return updates, state

  plain, state_plain = step("")
  half, state_half = step("memory=0.5")
  frozen, _ = step("memory=0,embed=2")
  np.testing.assert_allclose(half["blocks"]["memory"]["out"]["kernel"],
                             0.5 * plain["blocks"]["memory"]["out"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(half["blocks"]["ffn"]["kernel"], plain["blocks"]["ffn"]["kernel"])
  assert not np.asarray(frozen["blocks"]["memory"]["out"]["kernel"]).any()
  np.testing.assert_allclose(frozen["embed"], 2 * plain["embed"], rtol=1e-6)
  # the optimizer state is the same structure and values: a run resumes with or without
  assert (jax.tree_util.tree_structure(state_half)
          == jax.tree_util.tree_structure(state_plain))
  for a, b in zip(jax.tree.leaves(state_half), jax.tree.leaves(state_plain)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="no parameter's path contains"):
    opt_lib.lr_scale_tree(params, "memroy=0.1")
  # the model's own factors (MM-Rec: `model.mem_lr_scale`, tests/models/mmrec) apply
  # unless train.lr_scales names the same module; all factors 1 is no scaling at all
  tree = opt_lib.lr_scale_tree(params, "", {"memory": 0.5})
  assert tree["blocks"]["memory"]["out"]["kernel"] == 0.5 and tree["embed"] == 1.0
  assert opt_lib.lr_scale_tree(params, "memory=0.25", {"memory": 0.5})[
      "blocks"]["memory"]["out"]["kernel"] == 0.25
  assert opt_lib.lr_scale_tree(params, "memory=1", {"memory": 0.5}) is None
  assert opt_lib.lr_scale_tree(params, "", {"memory": 1.0}) is None
  for bad in ("memory", "memory=x", "memory=-1", "=0.5"):
    with pytest.raises(ConfigError, match="NAME=FACTOR"):
      opt_lib.parse_lr_scales(bad)


def test_decay_mask():
  tree = support.boxed_param_tree()
  mask = opt_lib.decay_mask(tree)
  assert mask["embed"] and mask["blocks"]["mlp"]["kernel"]
  assert not mask["blocks"]["norm"]["scale"] and not mask["blocks"]["mlp"]["bias"]
  assert not mask["blocks"]["gate_decay"]["w"] and not mask["blocks"]["lam"]


def test_a_second_warmup_ramps_the_schedule_from_its_step():
  """train.rewarm_steps: from rewarm_at the rate ramps from 0 back to the schedule's
  (a grown run continuing its ladder's schedule); before it, and without it, the
  schedule is unchanged."""
  t = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="wsd", decay_frac=0.2)
  base = opt_lib.lr_schedule(t)
  again = opt_lib.lr_schedule(dataclasses.replace(t, rewarm_at=40, rewarm_steps=4))
  for step in (0, 5, 39, 44, 60, 90, 99):
    assert float(again(step)) == pytest.approx(float(base(step)))
  for i in range(4):   # step 40 + i at (i + 1) / 4 of the schedule's rate
    assert float(again(40 + i)) == pytest.approx((i + 1) / 4 * float(base(40 + i)))
  assert float(base(40)) == pytest.approx(1e-3)
  with pytest.raises(ConfigError, match="rewarm_steps"):
    TrainConfig(rewarm_steps=-1).validate()


def test_the_trainer_steps_at_the_second_warmups_rate():
  """The optimizer `make` builds steps at the re-warmed rate: a step 1 of 4 into
  the second warmup moves the parameters a quarter as far as the schedule alone."""
  t = TrainConfig(steps=100, lr=1e-2, warmup_steps=0, schedule="wsd", weight_decay=0.0,
                  grad_clip=0.0)
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.full((3,), 0.5)}

  def moved(tcfg, count):
    tx = opt_lib.make(tcfg, None)
    state = tx.init(params)
    state = jax.tree.map(lambda x: jnp.asarray(count, x.dtype)
                         if getattr(x, "shape", None) == () else x, state)   # step counts
    upd, _ = tx.update(grads, state, params)
    return float(jnp.abs(upd["w"]).max())
  plain = moved(t, 40)
  again = moved(dataclasses.replace(t, rewarm_at=40, rewarm_steps=4), 40)
  assert plain > 0 and again == pytest.approx(plain / 4, rel=1e-5)
