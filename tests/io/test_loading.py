"""Loading a model (`io/loading.py`): the checkpoint chosen, the typed config with its
step, one parameter layout whether layers are scanned or not."""
import jax
import numpy as np
import pytest

from mmrec_jax import models
from mmrec_jax.io import loading as load_lib


def test_load_selects_checkpoint(run_dir, loaded):
  _, variables, tok, config, _ = loaded
  assert config.loaded_step == 1 and config.model.d_model == 32
  assert tok.token_to_id("<|eod|>") == 0
  _, v2, _, c2 = load_lib.load(run_dir, "latest")
  assert c2.loaded_step == 2
  assert not np.array_equal(v2["params"]["embed"], variables["params"]["embed"])
  assert load_lib.load(run_dir, 2)[3].loaded_step == 2
  assert isinstance(c2, load_lib.LoadedConfig) and c2.train.seq_len == 32
  with pytest.raises(load_lib.LoadError, match="not in saved steps"):
    load_lib.load(run_dir, 7)


def test_checkpoint_loads_with_scan_layers_either_way(reference):
  """One parameter layout: a run trained unrolled evaluates scanned, identically
  (resuming it with the other setting: tests/training/test_resume.py)."""
  from mmrec_jax import load  # pylint: disable=import-outside-toplevel (the lazy name)
  workdir, config, _ = reference
  assert not config.model.scan_layers   # tiny trains with the layers unrolled
  model, variables, _, _ = load(workdir, "latest")
  toks = jax.random.randint(jax.random.key(0), (2, 40), 0, config.model.vocab_size)
  ref = model.apply(variables, toks)[0]
  scanned = models.build(dict(config.model.to_dict(), scan_layers=True))
  np.testing.assert_array_equal(np.asarray(scanned.apply(variables, toks)[0]), np.asarray(ref))
