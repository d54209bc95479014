"""The train state (`training/state.py`): a run started from given parameters."""
import jax
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax import train
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.training import state as train_state
from tests.support import assert_trees_close, make_config


def test_init_from_starts_a_run_from_given_parameters(reference, corpus, tmp_path):
  workdir, config, result = reference
  params, _ = ckpt_lib.restore_params(workdir, "latest")
  s = train_state.setup(config, devices=jax.devices()[:1])
  state = train_state.create(s, init_from=params)
  assert int(state.step) == 0
  assert_trees_close(state.params, result.params, atol=0)
  cont = train.run(make_config(corpus, **{"train.steps": 2, "train.eval_every": 2}),
                   str(tmp_path / "grown"), devices=jax.devices()[:1], quiet=True,
                   init_from=params)
  # Starting from trained parameters, the first loss is far below a fresh init's.
  assert cont.train_losses[0][1] < result.train_losses[0][1] - 0.5
  with pytest.raises(config_lib.ConfigError, match="shape"):
    train_state.create(s, init_from=jax.tree.map(lambda x: x[..., :1], params))
