"""Checkpoints (`io/checkpoint.py`): a bad latest checkpoint (truncated, bit-flipped,
an item missing) is skipped on resume and named in one line on load, never deleted."""
import glob
import os
import shutil

import jax
import numpy as np
import pytest

from mmrec_jax import errors
from mmrec_jax.io import checkpoint as ckpt_lib


def _abstract():
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=sh),
            "b": jax.ShapeDtypeStruct((8,), np.float32, sharding=sh)}
  opt = {"count": jax.ShapeDtypeStruct((), np.int32, sharding=sh)}
  return params, opt, jax.ShapeDtypeStruct((2,), np.uint32, sharding=sh)


def _checkpoints(wd, steps=(1, 2, 3)):
  """Orbax checkpoints of small random params at `steps`; returns {step: params}."""
  mngr = ckpt_lib.make_manager(wd, keep=len(steps), async_save=False)
  rng = jax.random.key_data(jax.random.key(0))
  saved = {}
  for s in steps:
    r = np.random.default_rng(s)
    saved[s] = {"w": r.standard_normal((64, 64)).astype(np.float32),
                "b": np.arange(8, dtype=np.float32) + s}
    ckpt_lib.save(mngr, s, saved[s], {"count": np.asarray(s, np.int32)}, rng, {"pos": s})
  mngr.wait_until_finished()
  mngr.close()
  return saved


def _corrupt(wd, step, how):
  item = os.path.join(wd, "checkpoints", str(step), "params")
  if how == "missing":
    shutil.rmtree(item)
    return
  data = max((f for f in glob.glob(f"{item}/**/d/*", recursive=True) if os.path.isfile(f)),
             key=os.path.getsize)
  if how == "truncated":
    os.truncate(data, os.path.getsize(data) // 2)
  else:   # bit flips where zstd notices (its frame header; see the report on silent flips)
    b = bytearray(open(data, "rb").read())
    b[:8] = bytes(x ^ 0xFF for x in b[:8])
    open(data, "wb").write(bytes(b))


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_resume_falls_back_past_a_bad_latest_checkpoint(tmp_path, how):
  wd = str(tmp_path / "run")
  saved = _checkpoints(wd)
  _corrupt(wd, 3, how)
  mngr = ckpt_lib.make_manager(wd, keep=3, async_save=False)
  try:
    params, opt, _, data_state, meta, step, skipped = ckpt_lib.restore_newest_good(
        mngr, *_abstract())
  finally:
    mngr.close()
  assert step == 2 and meta["step"] == 2 and data_state == {"pos": 2}
  assert int(opt["count"]) == 2
  for k in saved[2]:
    np.testing.assert_array_equal(np.asarray(params[k]), saved[2][k])
  assert [s for s, _ in skipped] == [3] and "\n" not in skipped[0][1], skipped
  assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))    # left for inspection
  with pytest.raises(errors.LoadError) as e:                       # inference: one line
    ckpt_lib.restore_params(wd, "latest")
  msg = str(e.value)
  assert "\n" not in msg and "step 3" in msg and "unreadable" in msg, msg
  assert "readable steps: 1, 2" in msg and "--checkpoint=2" in msg, msg
  params, step = ckpt_lib.restore_params(wd, 2)
  assert step == 2
  np.testing.assert_array_equal(np.asarray(params["w"]), saved[2]["w"])


def test_resume_with_no_readable_checkpoint_names_what_was_tried(tmp_path):
  wd = str(tmp_path / "run")
  _checkpoints(wd, steps=(1, 2))
  _corrupt(wd, 1, "missing")
  _corrupt(wd, 2, "truncated")
  mngr = ckpt_lib.make_manager(wd, keep=2, async_save=False)
  try:
    with pytest.raises(errors.TrainError, match=r"tried step 2: .*step 1: ") as e:
      ckpt_lib.restore_newest_good(mngr, *_abstract())
  finally:
    mngr.close()
  assert "\n" not in str(e.value)
