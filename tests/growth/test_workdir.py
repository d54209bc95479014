"""A grown run as a workdir (`growth/workdir.py`): the extended tokenizer keeps old ids
and new vocabulary rows are the mean of their pieces."""
import numpy as np
import pytest

from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.growth import expander
from mmrec_jax.growth import workdir as grow_workdir_lib
from mmrec_jax import growth


def test_extended_tokenizer_keeps_old_ids_and_new_rows_mean_their_pieces():
  texts = ["the quick brown fox jumps over the lazy dog and then some more words"] * 40
  old = tokenizer_lib.train_tokenizer(texts, 280)
  new = tokenizer_lib.extend_tokenizer(old, texts, 300)
  grow_workdir_lib.check_extends(old, new, "new")
  pieces = grow_workdir_lib.new_token_pieces(old, new)
  assert len(pieces) == 20 and all(len(q) >= 2 for q in pieces)
  for i, q in zip(range(280, 300), pieces):
    assert "".join(old.id_to_token(j) for j in q) == new.id_to_token(i)
  A = expander._vocab_matrix(280, 300, pieces)  # pylint: disable=protected-access
  E = np.random.default_rng(0).normal(size=(280, 8))
  np.testing.assert_allclose(A @ E, [E[q].mean(0) for q in pieces], atol=1e-6)
  np.testing.assert_allclose(expander._vocab_matrix(280, 281, None) @ E, E.mean(0, keepdims=True),
                             atol=1e-6)
  with pytest.raises(Exception, match="does not extend"):
    grow_workdir_lib.check_extends(new, old, "x")


def test_the_growth_package_exports_its_public_names():
  assert growth.grow_workdir is grow_workdir_lib.grow_workdir
  assert growth.check_extends is grow_workdir_lib.check_extends
  assert growth.grow_params is expander.grow_params and growth.logit_diff is expander.logit_diff
