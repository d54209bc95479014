"""Progressive growth: function preservation (fresh and streaming), symmetry breaking,
structure, exactness errors, sharded growth, the grow CLI and the ladder."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mmrec_jax import grow
from mmrec_jax import models
from mmrec_jax import sharding as shard_lib
from mmrec_jax import tokenizer as tokenizer_lib
from mmrec_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
BASE = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, chunk_size=4, mem_slots=2,
            mem_levels=2, scan_layers=False, mem_out_init=1.0)
OPTS = dict(use_moe=True, moe_experts=2, use_uboo=True, use_dpg=True,  # every option on
            mem_qk_norm=True, mem_pool="exp", mem_read_logn=True, mem_sink=True)
SMALL = dict(BASE, **OPTS)
BIG = dict(SMALL, d_model=32, n_heads=4, n_layers=3, vocab_size=96)


def cfg(**kw):
  return models.make_config(kw)


@functools.lru_cache(maxsize=None)
def logits_fn(c):
  return grow.logits_fn(c)


@functools.lru_cache(maxsize=None)
def params_of(c):
  """Fresh parameters; the memory's sink logits and null value (zeros at init) set
  to distinct values, so that growth must carry them to the right heads and dims."""
  p = traverse_util.flatten_dict(nn.unbox(models.init_params(models.build(c),
                                                             jax.random.key(0))), sep="/")
  for k, v in p.items():
    if k.endswith(("memory/read_sink", "memory/read_null")):
      p[k] = jnp.linspace(-1.0, 1.0, v.size, dtype=v.dtype).reshape(v.shape)
  return traverse_util.unflatten_dict(p, sep="/")


def tokens(V=64):
  t = np.array(jax.random.randint(jax.random.key(1), (2, 24), 2, V))
  t[1, 7] = 0   # a document start inside row 1
  return jnp.asarray(t)


def run(c, p, t, state=None):
  fn, model = logits_fn(c)
  state = model.init_state(t.shape[0]) if state is None else state
  return fn(p, t, state, t == 0)


def assert_preserved(small, p, big, g, t=None):
  """From a fresh state (first half), then streaming with the carried state (second
  half); and the small model's state grown with `grow_state` continues exactly too."""
  t = tokens() if t is None else t
  V = small.vocab_size
  a1, sa = run(small, p, t[:, :12])
  a2, _ = run(small, p, t[:, 12:], sa)
  b1, sb = run(big, g, t[:, :12])
  b2, _ = run(big, g, t[:, 12:], sb)
  np.testing.assert_allclose(b1[..., :V], a1, atol=TOL, rtol=0)
  np.testing.assert_allclose(b2[..., :V], a2, atol=TOL, rtol=0)
  c2, _ = run(big, g, t[:, 12:], grow.grow_state(sa, small, big))
  np.testing.assert_allclose(c2[..., :V], a2, atol=TOL, rtol=0)
  return a1


def test_width_heads_depth_vocab_two_stages_with_every_option_and_noise():
  a, b = cfg(**SMALL), cfg(**BIG)
  c = cfg(**dict(BIG, d_model=64, n_heads=8, n_layers=4, vocab_size=128))
  pa = params_of(a)
  pb = grow.grow_params(pa, a, b, jax.random.key(3), noise=0.1)
  la = assert_preserved(a, pa, b, pb)
  pc = grow.grow_params(pb, b, c, jax.random.key(4), noise=0.1)
  lc, _ = run(c, pc, tokens()[:, :12])
  np.testing.assert_allclose(lc[..., :64], la, atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind,change", [
    ("width", dict(d_model=32)),
    ("heads", dict(d_model=32, n_heads=4)),
    ("depth", dict(n_layers=4)),
    ("vocab", dict(vocab_size=96)),
])
def test_each_growth_alone(kind, change):
  del kind
  small, big = cfg(**SMALL), cfg(**dict(SMALL, **change))
  p = params_of(small)
  g = grow.grow_params(p, small, big, jax.random.key(3))
  assert_preserved(small, p, big, g)


@pytest.mark.slow
def test_ffn_to_moe_upcycling_uboo_switch_and_a_residual_read_are_exact():
  """Also with `mem_residual`: the memory's read-out then writes into the residual
  stream, so an inserted block must zero it too and width growth must split it."""
  small = cfg(**dict(BASE, mem_residual=True))
  big = cfg(**dict(BASE, mem_residual=True, d_model=32, n_layers=3, use_moe=True,
                   moe_experts=2, use_uboo=True))
  p = params_of(small)
  g = grow.grow_params(p, small, big, jax.random.key(3), noise=0.1)
  assert_preserved(small, p, big, g)


def test_structure_shapes_dtypes_equal_a_fresh_init():
  small = cfg(**SMALL)
  big = cfg(**dict(BIG, param_dtype="bfloat16"))
  g = jax.eval_shape(lambda p: grow.grow_params(p, small, big, jax.random.key(0), noise=0.1),
                     params_of(small))
  ref = models.param_shapes(models.build(big))
  assert jax.tree.structure(g) == jax.tree.structure(ref)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)


def test_deterministic_per_key_and_noise_zero_sum():
  small, big = cfg(**SMALL), cfg(**BIG)
  p = params_of(small)
  g1 = grow.grow_params(p, small, big, jax.random.key(7), noise=0.1)
  g2 = grow.grow_params(p, small, big, jax.random.key(7), noise=0.1)
  g3 = grow.grow_params(p, small, big, jax.random.key(8), noise=0.1)
  g0 = grow.grow_params(p, small, big, jax.random.key(8), noise=0.0)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(x, y)
  k1 = g1["blocks"]["fused"]["kernel"]
  assert not np.allclose(k1, g3["blocks"]["fused"]["kernel"])
  # zero-sum over the copies of each input unit: summed over copies, noise vanishes
  src = grow.width_map(16, 32, 2, 4)
  seg = lambda k: jax.ops.segment_sum(jnp.moveaxis(k, 1, 0), src, num_segments=16)
  np.testing.assert_allclose(seg(g3["blocks"]["fused"]["kernel"]),
                             seg(g0["blocks"]["fused"]["kernel"]), atol=1e-6)


def test_noise_breaks_symmetry_of_copies():
  small, big = cfg(**SMALL), cfg(**BIG)
  p = params_of(small)
  fn, model = logits_fn(big)
  t = tokens()[:, :12]
  w = jax.random.normal(jax.random.key(9), (2, 12, 96))

  @jax.jit
  def grads(g):
    def loss(g):
      logits, _ = fn(g, t, model.init_state(2), t == 0)
      return jnp.sum(jax.nn.log_softmax(logits) * w)
    return jax.grad(loss)(g)

  F = 4 * 16   # old FFN hidden width: expert hidden unit j and j + F are copies
  for noise, same in ((0.0, True), (0.1, False)):
    gr = grads(grow.grow_params(p, small, big, jax.random.key(3), noise=noise))
    w_up = np.asarray(gr["blocks"]["moe"]["w_up"])[:2]   # [L, E, D, 2F], the old layers
    a, b = w_up[..., :F], w_up[..., F:]
    rel = np.max(np.abs(a - b)) / np.max(np.abs(a))
    assert (rel < 1e-5) if same else (rel > 1e-3), (noise, rel)


def test_mesh_of_8_devices_gives_the_same_params():
  assert len(jax.devices()) == 8
  small, big = cfg(**SMALL), cfg(**BIG)
  p = params_of(small)
  mesh = shard_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  g1 = grow.grow_params(p, small, big, jax.random.key(3), noise=0.1)
  g8 = grow.grow_params(p, small, big, jax.random.key(3), noise=0.1, mesh=mesh)
  sh = g8["blocks"]["fused"]["kernel"].sharding
  assert isinstance(sh, jax.sharding.NamedSharding) and len(sh.device_set) == 8
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change,match", [
    (dict(d_model=8), "d_model shrinks"),
    (dict(d_model=24, n_heads=2), "not an integer multiple"),
    (dict(n_heads=4), "heads 2x8 -> 4x4"),
    (dict(use_dpg=False), "use_dpg switched off"),
    (dict(use_moe=False), "use_moe switched off"),
    (dict(mem_qk_norm=False), "mem_qk_norm switched off"),
    (dict(mem_pool="sigmoid"), "mem_pool changes"),
    (dict(mem_read_logn=False), "mem_read_logn switched off"),
    (dict(mem_sink=False), "mem_sink switched off"),
    (dict(mem_residual=True), "mem_residual switched on"),
    (dict(chunk_size=8), "memory geometry model.chunk_size"),
    (dict(mem_levels=3), "memory geometry model.mem_levels"),
])
def test_inexact_growth_is_a_one_line_error(change, match):
  small, big = cfg(**SMALL), cfg(**dict(SMALL, **change))
  with pytest.raises(ConfigError, match=match) as e:
    grow.check_growable(small, big)
  assert "\n" not in str(e.value) and "--allow_inexact" in str(e.value)
  assert grow.check_growable(small, big, allow_inexact=True)


@pytest.mark.slow
def test_allow_inexact_grows_anyway():
  small, big = cfg(**SMALL), cfg(**dict(SMALL, d_model=24, n_heads=2))
  g = grow.grow_params(params_of(small), small, big, jax.random.key(0), allow_inexact=True)
  assert g["embed"].shape == (64, 24)


def test_extended_tokenizer_keeps_old_ids_and_new_rows_mean_their_pieces():
  texts = ["the quick brown fox jumps over the lazy dog and then some more words"] * 40
  old = tokenizer_lib.train_tokenizer(texts, 280)
  new = tokenizer_lib.extend_tokenizer(old, texts, 300)
  grow.check_extends(old, new, "new")
  pieces = grow.new_token_pieces(old, new)
  assert len(pieces) == 20 and all(len(q) >= 2 for q in pieces)
  for i, q in zip(range(280, 300), pieces):
    assert "".join(old.id_to_token(j) for j in q) == new.id_to_token(i)
  A = grow._vocab_matrix(280, 300, pieces)  # pylint: disable=protected-access
  E = np.random.default_rng(0).normal(size=(280, 8))
  np.testing.assert_allclose(A @ E, [E[q].mean(0) for q in pieces], atol=1e-6)
  np.testing.assert_allclose(grow._vocab_matrix(280, 281, None) @ E, E.mean(0, keepdims=True),
                             atol=1e-6)
  with pytest.raises(Exception, match="does not extend"):
    grow.check_extends(new, old, "x")


def test_cli_refuses_a_non_empty_workdir(tmp_path):
  (tmp_path / "mini").mkdir()
  (tmp_path / "mini" / "x").write_text("x")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "mmrec_jax.grow", f"--from_workdir={tmp_path}/tiny",
                      "--config=configs/mini.py", f"--workdir={tmp_path}/mini"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().count("\n") == 0 and "is not empty" in r.stderr


def test_shipped_ladder_is_exactly_growable():
  from mmrec_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  names = ("tiny", "mini", "small")
  cfgs = [models.make_config(config_lib.load_config_file(f"{REPO}/configs/{n}.py").model)
          for n in names]
  for a, b in zip(cfgs, cfgs[1:]):
    assert grow.inexact_reasons(a, b) == []


# ----------------------------------------------------------------------------- end to end

WORDS = ("the quick brown fox jumps over a lazy dog while birds sing in tall trees and "
         "every cat sat on the mat then ran away from the rain at night").split()
RUN = {
    "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2, "model.chunk_size": 8,
    "model.mem_slots": 2, "model.mem_levels": 2, "model.scan_layers": False,
    "train.seq_len": 16, "train.batch_size": 2, "train.steps": 2, "train.warmup_steps": 1,
    "train.eval_every": 2, "train.eval_batches": 1, "train.log_every": 1, "train.samples": 0,
    "checkpoint.every": 2, "data.val_fraction": 0.1, "mesh.data": 1,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  import random  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("corpus")
  rnd = random.Random(0)
  for i in range(16):
    lines = (" ".join(rnd.choice(WORDS) for _ in range(12)) + "." for _ in range(30))
    (d / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
  return str(d)


def run_config(corpus, vocab, **kw):
  from mmrec_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(f"{REPO}/configs/tiny.py")
  for k, v in {**RUN, "model.vocab_size": vocab, "data.path": corpus, **kw}.items():
    sec, name = k.split(".")
    c[sec][name] = v
  return config_lib.validate(c)


@pytest.mark.slow
def test_grow_then_train_and_the_ladder_resumes(corpus, tmp_path):
  from mmrec_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mmrec_jax import loop  # pylint: disable=g-import-not-at-top
  from mmrec_jax import progressive  # pylint: disable=g-import-not-at-top
  devices = jax.devices()[:1]
  small = run_config(corpus, 270)
  loop.run(small, str(tmp_path / "tiny"), devices=devices, quiet=True)
  big = run_config(corpus, 290, **{"model.d_model": 32, "model.n_layers": 3})
  diff = grow.grow_workdir(str(tmp_path / "tiny"), big, str(tmp_path / "mini"), noise=0.05,
                           log=lambda *a: None, devices=devices)
  assert diff < TOL
  tok = tokenizer_lib.load_tokenizer(str(tmp_path / "mini" / "tokenizer.json"))
  old = tokenizer_lib.load_tokenizer(str(tmp_path / "tiny" / "tokenizer.json"))
  grow.check_extends(old, tok, "grown")
  with pytest.raises(Exception, match="is not empty"):
    grow.grow_workdir(str(tmp_path / "tiny"), big, str(tmp_path / "mini"))
  # the ladder: a finished stage is skipped, a grown-but-untrained stage is trained
  # (the grown stage is trained once, here: one compile of the bigger model)
  stages = [small, big]
  dirs = [str(tmp_path / "tiny"), str(tmp_path / "mini")]
  out = progressive.run_ladder(stages, dirs, noise=0.05, log=lambda *a: None, devices=devices,
                               quiet=True)
  assert [o["skipped"] for o in out] == [True, False]
  assert out[1]["step"] == 2 and out[1]["reason"] == "done"
  with open(tmp_path / "mini" / "metrics.jsonl") as f:
    losses = [r["loss"] for r in map(json.loads, f) if r.get("split") == "train" and "loss" in r]
  assert losses and all(np.isfinite(losses))
  assert ckpt_lib.restore_params(dirs[1], "latest")[1] == 2
  out = progressive.run_ladder(stages, dirs, noise=0.05, log=lambda *a: None, devices=devices,
                               quiet=True)
  assert [o["skipped"] for o in out] == [True, True]
