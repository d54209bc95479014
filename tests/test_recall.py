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


def test_multikey_answers_are_the_keys_under_the_asked_labels(tok):
  ids, ans = recall.eval_set("multikey", 40, tok, np.random.default_rng(0), examples=4,
                             seq_len=64, key_digits=2, n_keys=3)
  eod = tok.token_to_id(tok_lib.EOD)
  for row, a in zip(ids, ans):
    text = tok.decode([t for t in row.tolist() if t > 1])
    stated = dict(s.split(" is ", 1) for s in text.split(" what ")[0].split("the pass key ")[1:])
    stated = {k: v.split(" .")[0].split() for k, v in stated.items()}
    asked = [q.split(" ?")[0] for q in text.split("what is the pass key ")[1:]]
    assert len(stated) == 3 and sorted(asked) == sorted(stated)
    words = tok.decode(row[a].tolist()).split()
    assert words == [d for label in asked for d in stated[label]]
  score = lambda shift: recall.accuracy(_Oracle(ids, shift), {}, "multikey", ids, ans, eod,
                                        seq_len=64, batch=len(ids), key_digits=2)
  assert score(0) == 1.0 and score(1) == 0.0
  # a key counts only when both its digits are right: a model that gets every first
  # digit right and every second one wrong scores 0, not 0.5
  wrong = ids.copy()
  rows = np.arange(len(ids))[:, None]
  wrong[rows, ans[:, 1::2]] = (wrong[rows, ans[:, 1::2]] + 1) % 600
  assert recall.accuracy(_Oracle(wrong, 0), {}, "multikey", ids, ans, eod, seq_len=64,
                         batch=len(ids), key_digits=2) == 0.0


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
    digits = 1 if task == "multikey" else 5
    docs = recall.train_docs(task, rng, 20_000, 128, key_digits=digits, train_pairs=24)
    lengths = [len(tok.encode(d).ids) + 1 for d in docs]   # + the <|eod|> before each
    assert max(lengths) <= 128 and sum(lengths) >= 20_000


def test_read_off_zeroes_only_the_memory_read_out():
  import flax.linen as nn
  from mmrec_jax import models
  cfg = models.make_config(dict(kind="mmrec", name="t", vocab_size=32, d_model=16, n_layers=2,
                                n_heads=2, max_seq_len=64, chunk_size=4, mem_slots=2,
                                mem_levels=2, mem_out_init=1.0))
  model = models.build(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  off = recall.read_off({"params": params})["params"]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_off = dict((jax.tree_util.keystr(p), x) for p, x in
                  jax.tree_util.tree_flatten_with_path(off)[0])
  for p, x in flat:
    k = jax.tree_util.keystr(p)
    if k == "['blocks']['memory']['out']['kernel']":
      assert not np.any(np.asarray(flat_off[k])) and np.any(np.asarray(x))
    else:
      np.testing.assert_array_equal(np.asarray(flat_off[k]), np.asarray(x))
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, 32, (1, 24)), jnp.int32)
  a = model.apply({"params": params}, tokens)[0]
  b = model.apply({"params": off}, tokens)[0]
  # identical until the first chunk ends (nothing to read yet), different after
  np.testing.assert_allclose(np.asarray(a[:, :4]), np.asarray(b[:, :4]), atol=1e-6)
  assert not np.allclose(np.asarray(a[:, 8:]), np.asarray(b[:, 8:]), atol=1e-4)


def test_every_benchmark_arm_is_a_valid_config():
  """A typo in an arm's overrides would surface only after the arms before it
  trained for minutes; every named arm must build a valid config."""
  from mmrec_jax import bench
  from mmrec_jax import config as config_lib
  for arm in recall.ARMS:
    c = config_lib.validate(bench.load_arm(arm, recall.ARMS))
    for field, value in recall.ARMS[arm][1].items():
      node = c
      for part in ("model." + field if "." not in field else field).split("."):
        node = node[part]
      assert node == value, (arm, field)
  assert set(bench.ARMS) <= set(recall.ARMS)   # quality's arms, all recall can run


def test_run_key_ignores_model_options_at_their_defaults():
  """A reused run is one with the same settings: an option added later (at its
  default) keeps old runs' keys; setting it, or any other field, changes the key."""
  from mmrec_jax import config as config_lib
  c = config_lib.load_config_file("configs/tiny.py")
  key = recall.run_key(c)
  assert "mem_read_logn" not in key["model"] and "chunk_size" not in key["model"]
  train = c.train.to_dict()
  assert train.pop("lr_scales") == "" and key["model"]["kind"] == "mmrec"
  assert key["train"] == train      # a training option added later, off: same key
  c.train.lr_scales = "memory=0.1"
  assert recall.run_key(c)["train"]["lr_scales"] == "memory=0.1"
  c.model.mem_read_logn, c.model.chunk_size = True, 16
  assert recall.run_key(c)["model"]["mem_read_logn"] is True
  assert recall.run_key(c)["model"]["chunk_size"] == 16
  # a default that changed: today's value is in the key, the old one keeps old keys
  from mmrec_jax import bench
  assert {"mem_out_init": 0.0, "mem_lr_scale": 0.1}.items() <= key["model"].items()
  v0 = recall.run_key(bench.load_arm("mmrec_v0"))
  assert "mem_out_init" not in v0["model"] and "mem_lr_scale" not in v0["model"]


@pytest.mark.parametrize("item", ["128", "128:0", "x:10", "128:10:2", "-5:10"])
def test_bad_curriculum_stage_is_a_usage_error(item):
  from mmrec_jax.errors import UsageError
  with pytest.raises(UsageError, match="not LEN:STEPS"):
    recall.parse_curriculum([item])
  assert recall.parse_curriculum(["128:2000", "256:10"]) == [(128, 2000), (256, 10)]
