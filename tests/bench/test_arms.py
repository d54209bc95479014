"""The benchmark arms (`bench/arms.py`): every arm is a shipped config with
`SECTION.FIELD` overrides; pinned defaults reproduce the figures measured before."""
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax.bench import arms
from mmrec_jax.errors import UsageError


def test_every_arm_loads_as_a_validated_config():
  for arm, (name, overrides, what) in arms.ARMS.items():
    c = arms.load_arm(arm)
    assert isinstance(c, config_lib.Config) and what, arm
    assert c == config_lib.load(name, overrides)
    for path, value in overrides.items():
      section, field = path.split(".")
      assert getattr(getattr(c, section), field) == value, (arm, path)


def test_pinned_arms_keep_the_old_defaults_and_overrides_come_last():
  v0 = arms.load_arm("mmrec_v0")
  assert (v0.model.mem_out_init, v0.model.mem_lr_scale) == (1.0, 1.0)
  today = arms.load_arm("mmrec")
  assert (today.model.mem_out_init, today.model.mem_lr_scale) == (0.0, 0.1)
  c = arms.load_arm("mmrec_c16", overrides={"model.chunk_size": 32, "train.seed": 3})
  assert (c.model.chunk_size, c.model.mem_levels, c.train.seed) == (32, 5, 3)
  table = {"x": ("tiny", {"model.d_model": 64}, "a private arm")}
  assert arms.load_arm("x", arms=table).model.d_model == 64
  with pytest.raises(UsageError, match="unknown arm 'nope'; use one of mmrec, ") as e:
    arms.load_arm("nope")
  assert "\n" not in str(e.value)


def test_recall_set_applies_to_every_arm_but_memory_off_stays_off():
  """`bench.recall --set` reaches every arm's config, except what makes an arm what
  it is: `--set=model.mem_levels=2` must not switch on `mmrec_nomem`'s memory."""
  from mmrec_jax.bench.recall import runs  # pylint: disable=import-outside-toplevel
  recipe = runs.Recipe(steps=10, batch=4, seq_len=64, lr=1e-3, warmup=1, task=runs.TRAIN_TASK)
  over = {"model.mem_levels": 2, "model.mem_slots": 16, "train.weight_decay": 0.0}
  nomem = runs.run_config("mmrec_nomem", recipe, over)
  assert (nomem.model.mem_levels, nomem.train.weight_decay) == (0, 0.0)
  mem = runs.run_config("mmrec", recipe, over)
  assert (mem.model.mem_levels, mem.model.mem_slots) == (2, 16)
  assert runs.run_config("mmrec", recipe).model.mem_slots == runs.MEMORY["model.mem_slots"]
