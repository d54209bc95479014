"""The recall benchmark's data and scoring (no training: that is the benchmark's job)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import tokenizer as tok_lib
from mmrec_jax.bench import recall


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  tok, _ = recall.make_tokenizer(str(tmp_path_factory.mktemp("recall")))
  return tok


class _Oracle:
  """A stand-in model whose logits put all mass on the true next token (`shift=0`)
  or on a wrong one, streamed in pieces with its offset as the state: checks the
  scoring, the padding and the piece loop."""

  def __init__(self, ids_NT, shift=0, vocab=600):
    pad = np.zeros((len(ids_NT), 1), np.int32)
    self.full = jnp.asarray(np.concatenate([ids_NT, pad], 1))
    self.shift, self.vocab = shift, vocab

  def init_state(self, batch):
    del batch
    return jnp.zeros((), jnp.int32)

  def apply(self, variables, x_BT, state, reset):
    del variables, reset
    B, T = x_BT.shape
    nxt_BT = jax.lax.dynamic_slice(self.full, (0, state + 1), (B, T))
    return jax.nn.one_hot((nxt_BT + self.shift) % self.vocab, self.vocab), state + T, {}


def _score(task, ids, ans, eod, shift=0):
  return recall.accuracy(_Oracle(ids, shift), {}, task, ids, ans, eod, seq_len=64,
                         batch=len(ids))


@pytest.mark.parametrize("task,x", [("passkey", 100), ("mqar", 12)])
def test_answers_are_where_the_scoring_looks(tok, task, x):
  ids, ans = recall.eval_set(task, x, tok, np.random.default_rng(0), examples=4, seq_len=64,
                             key_digits=5)
  assert ids.shape[1] % 64 == 0
  eod = tok.token_to_id(tok_lib.EOD)
  for row, a in zip(ids, ans):
    words = tok.decode(row[a].tolist()).split()
    text = tok.decode([t for t in row.tolist() if t > 1])
    if task == "passkey":
      key = text.split("the pass key is ")[1].split(" .")[0].split()
      assert words == key and len(key) == 5 and all(w.isdigit() for w in key)
      assert text.count(" the grass") + text.count(" sky") >= 1   # filler in between
    else:
      pairs = dict(zip(*[iter(text.split(" . ")[0].split()[1:])] * 2))
      queries = text.split(" . ")[1].rstrip(" .").split()
      assert len(pairs) == x and words == [pairs[k] for k in queries[0::2]]
  # a model that predicts the next token right scores 1; one that never does, 0
  assert _score(task, ids, ans, eod) == 1.0
  assert _score(task, ids, ans, eod, shift=1) == 0.0


def test_every_task_word_is_one_token(tok):
  keys, values = recall.word_lists()
  assert len(set(keys) | set(values)) == 2 * recall.N_WORDS
  doc = recall.passkey_doc(np.random.default_rng(1), 30, 5)
  assert len(tok.encode(doc).ids) == len(doc.split())
  doc = recall.mqar_doc(np.random.default_rng(1), 20, keys, values)
  assert len(tok.encode(doc).ids) == len(doc.split())


def test_training_documents_fit_the_training_length(tok):
  rng = np.random.default_rng(2)
  for task in recall.TASKS:
    docs = recall.train_docs(task, rng, 20_000, 128, key_digits=5, train_pairs=24)
    lengths = [len(tok.encode(d).ids) + 1 for d in docs]   # + the <|eod|> before each
    assert max(lengths) <= 128 and sum(lengths) >= 20_000
