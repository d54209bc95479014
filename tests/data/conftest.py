"""The data tests' fixtures: a token cache of their own per test, one tokenizer."""
import pytest

from mmrec_jax.data import tokenizer as tokenizer_lib
from tests.data.helpers import VOCAB, docs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(docs(80, seed=1), VOCAB)
