"""Faults that must speak in one line and lose nothing: a full disk, a flipped bit in a
checkpoint's data, a truncated checkpoint."""
import glob
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax.errors import LoadError
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.io import checksum
from mmrec_jax.training import loop
from tests import support


def test_a_single_flipped_bit_anywhere_changes_the_checksum():
  rng = np.random.default_rng(0)
  tree = {"w": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(9,)), jnp.bfloat16),
          "n": jnp.arange(4, dtype=jnp.int32)}
  base = checksum.checksum(tree)
  assert checksum.checksum(jax.tree.map(jnp.copy, tree)) == base
  for name, bits in (("w", 32), ("b", 16), ("n", 32)):
    x = np.asarray(tree[name]).copy()
    raw = x.view({32: np.uint32, 16: np.uint16}[bits]).reshape(-1)
    for i in rng.choice(raw.size, 3, replace=False):
      for bit in (0, bits // 2, bits - 1):
        flipped = raw.copy()
        flipped[i] ^= flipped.dtype.type(1 << bit)
        changed = dict(tree, **{name: jnp.asarray(flipped.view(x.dtype).reshape(x.shape))})
        assert checksum.checksum(changed) != base, (name, i, bit)


def _flip_a_bit(step_dir):
  """Flips one bit in the middle of the largest stored data file of the params item."""
  files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"),
                                recursive=True) if os.path.isfile(f)]
  f = max(files, key=os.path.getsize)
  data = bytearray(open(f, "rb").read())
  data[len(data) // 2] ^= 0x10
  with open(f, "wb") as out:
    out.write(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_is_caught_and_resume_falls_back(corpus, tmp_path):
  wd = str(tmp_path / "run")
  c = support.make_config(corpus, **{"train.steps": 4, "checkpoint.every": 2,
                                     "train.eval_every": 4})
  loop.run(c, wd, devices=jax.devices()[:1], quiet=True)
  _flip_a_bit(os.path.join(ckpt_lib.checkpoint_dir(wd), "4"))
  with pytest.raises(LoadError, match=r"step 4 .* unreadable .*readable steps: 2"):
    ckpt_lib.restore_params(wd, "latest")
  r = loop.run(c.override({"train.steps": 6}), wd, devices=jax.devices()[:1], quiet=True)
  assert r.step == 6
  kept = os.listdir(ckpt_lib.checkpoint_dir(wd))
  assert "4.unreadable" in kept
  _, step = ckpt_lib.restore_params(wd, "latest")
  assert step == 6


def _mount_tmpfs(path, size):
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                     capture_output=True)
  return r.returncode == 0


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_same_command_resumes_after(corpus, tmp_path):
  mnt = str(tmp_path / "small_disk")
  if not _mount_tmpfs(mnt, "1m"):
    pytest.skip("needs root to mount a small tmpfs")
  try:
    wd = os.path.join(mnt, "run")
    args = support.cli_args(corpus, wd, **{"train.steps": 8, "checkpoint.every": 2,
                                           "train.eval_every": 8})
    proc = support.launch(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:]
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0], out[-2000:]
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
    subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
    proc = support.launch(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    _, step = ckpt_lib.restore_params(wd, "latest")
    assert step == 8
  finally:
    subprocess.run(["umount", "-l", mnt], capture_output=True)
