"""Generated tasks as a data source (`data.task`): parsing, the trainer's batches, resume."""
import jax
import numpy as np
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax.data import synthetic
from mmrec_jax.errors import ConfigError
from tests import support

TASK = "mqar:mix=32x2+64x4|spread_mqar:pairs=2,chunk=8|passkey:key=3"


def task_config(**kw):
  return config_lib.load(support.TINY, {
      "data.task": TASK, "model.vocab_size": 135, "train.seq_len": 64, "train.batch_size": 6,
      "train.steps": 5, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, **kw})


@pytest.mark.parametrize("spec,match", [
    ("lstm", "unknown task 'lstm'"),
    ("mqar:mix=64", "bad value"),
    ("mqar:pairs", "not a setting"),
    ("passkey:key=0", "bad value"),
    ("mqar:keys=8|passkey:keys=16", "share keys"),
])
def test_a_bad_task_is_a_one_line_config_error(spec, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.load(support.TINY, {"data.task": spec})


def test_the_model_vocabulary_must_be_the_tasks():
  c = config_lib.load(support.TINY, {"data.task": "mqar", "train.seq_len": 64})
  with pytest.raises(ConfigError, match="model.vocab_size=135"):
    synthetic.build(c)


def test_rows_longer_than_the_training_length_are_refused():
  c = task_config(**{"data.task": "mqar:mix=128x4"})
  with pytest.raises(ConfigError, match="exceed train.seq_len=64"):
    synthetic.build(c)


def test_batches_carry_the_loss_mask_on_answers_only_and_resume_exactly():
  ds = synthetic.build(task_config())
  it = ds.train_iter()
  first = [next(it) for _ in range(3)]
  for b in first:
    assert b["inputs"].shape == b["mask"].shape == (6, 64)
    assert b["reset"][:, 0].all() and not b["reset"][:, 1:].any()
    ans = b["mask"] > 0
    # every answer is a value token; nothing else is trained on
    v = ds.spec[0].vocab
    assert ans.any(axis=1).all()
    assert (b["targets"][ans] >= v.first_value).all()
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  # fresh bindings: two batches differ
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  # the iterator's state resumes at the same batch
  it2 = ds.train_iter()
  it2.set_state(it.get_state())
  nxt = next(it)
  np.testing.assert_array_equal(next(it2)["inputs"], nxt["inputs"])
  # held-out batches are fixed and never a training batch
  v1, v2 = ds.val_batches(2), ds.val_batches(2)
  np.testing.assert_array_equal(v1[0]["inputs"], v2[0]["inputs"])
  assert not any(np.array_equal(v1[0]["inputs"], b["inputs"]) for b in first)


def test_rows_split_over_processes_are_the_global_batch():
  c = task_config()
  whole = next(synthetic.build(c).train_iter())
  parts = [next(synthetic.build(c, p, 2).train_iter()) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), whole["inputs"])


def test_the_task_tokenizer_names_every_token():
  specs = synthetic.parse(TASK)
  tok = synthetic.make_tokenizer(specs)
  assert tok.get_vocab_size() == specs[0].vocab.size == 135
  assert tok.token_to_id("<|eod|>") == 0 and tok.token_to_id("<|pad|>") == 1
  assert tok.encode("k3 v7 f0").ids == [specs[0].vocab.first_key + 3,
                                         specs[0].vocab.first_value + 7, 3]


def test_the_trainer_learns_from_answers_only(tmp_path):
  """A run on a task: the loss and token accuracy it logs are over answers."""
  from mmrec_jax.training import loop  # pylint: disable=import-outside-toplevel
  c = task_config(**{"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
                     "train.eval_every": 5, "train.eval_batches": 1, "train.samples": 0,
                     "checkpoint.every": 5})
  r = loop.run(c, str(tmp_path / "run"), devices=jax.devices()[:1], quiet=True)
  assert r.step == 5 and r.val_losses
  # at init every answer is a guess among 135 tokens: about log(135) nats
  assert abs(r.train_losses[0][1] - np.log(135)) < 1.0
