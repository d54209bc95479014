"""The Transformer baseline and MM-Rec without memory: the invariants MM-Rec has."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax import sampling

V = 64
TINY_T = {"kind": "transformer", "vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 2,
          "cache_len": 24}
NOMEM = {"vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 2, "mem_levels": 0}


@pytest.fixture(scope="module", params=["transformer", "mmrec_nomem"])
def arm(request):
  model = models.build(TINY_T if request.param == "transformer" else NOMEM)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  params = jax.tree.map(lambda x: x * 2.0, params)  # less uniform logits
  apply = jax.jit(lambda p, t, s, r: model.apply({"params": p}, t, state=s, reset=r))
  return model, params, apply


def _tokens(B, T, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_causal(arm):
  model, params, apply = arm
  toks = _tokens(2, 20)
  lo, _, _ = apply(params, toks, None, None)
  lo2, _, _ = apply(params, toks.at[:, 11:].set((toks[:, 11:] + 5) % V), None, None)
  d_T = jnp.abs(lo2 - lo).max(axis=(0, 2))
  assert float(d_T[:11].max()) == 0.0 and float(d_T[11]) > 1e-4


def test_reset_isolation(arm):
  model, params, apply = arm
  toks = _tokens(1, 20, seed=2)
  r = jnp.zeros((1, 20), bool).at[0, 9].set(True)
  packed, _, _ = apply(params, toks, None, r)
  alone, _, _ = apply(params, toks[:, 9:], None, r[:, 9:])
  np.testing.assert_allclose(packed[:, 9:], alone, atol=2e-5)


def test_cached_decoding_equals_full_pass(arm):
  model, params, apply = arm
  T = 18
  toks = _tokens(2, T, seed=3)
  r = jnp.zeros((2, T), bool).at[1, 6].set(True)
  full, _, _ = apply(params, toks, None, r)
  pieces, s = [], model.init_state(2)
  for a, b in [(0, 4), (4, 11), (11, T)]:
    lo, s, _ = apply(params, toks[:, a:b], s, r[:, a:b])
    pieces.append(lo)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=2e-5)
  steps, s = [], model.init_state(2)
  for t in range(T):
    lo, s, _ = apply(params, toks[:, t:t + 1], s, r[:, t:t + 1])
    steps.append(lo)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5)
  # The decoder (prefill, then one token at a time) gives the greedy tokens of full passes.
  dec = sampling.Decoder(model)
  prompt = [int(x) for x in toks[0, :5]]
  new = dec.generate({"params": params}, [prompt], 6, temperature=0)[0]
  seq, want = [0] + prompt, []
  for _ in range(6):    # greedy by full passes, stopping at <|eod|> (id 0) as the decoder does
    reset = jnp.array([[True] + [False] * (len(seq) - 1)])
    nxt = int(jnp.argmax(apply(params, jnp.array([seq]), None, reset)[0][0, -1]))
    if nxt == 0:
      break
    want.append(nxt)
    seq.append(nxt)
  assert new == want


def test_transformer_runs_past_its_cache_as_a_sliding_window():
  model = models.build(TINY_T)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  s = model.init_state(1)
  size = models.state_bytes(s)
  for i in range(4):   # 4 x 16 tokens through a 24-token cache
    lo, s, _ = model.apply({"params": params}, _tokens(1, 16, seed=i), state=s)
    assert bool(jnp.isfinite(lo).all()) and models.state_bytes(s) == size
  assert int(s.pos[0, 0]) == 64


def test_memory_off_has_no_memory_parameters_or_state():
  on = models.param_shapes(models.build(dict(NOMEM, mem_levels=2)))
  off = models.param_shapes(models.build(NOMEM))
  assert "memory" in on["blocks"] and "memory" not in off["blocks"]
  assert off["blocks"]["fused"]["kernel"].shape[2] == 4   # no memory query slice
  assert models.build(NOMEM).init_state(1).memory is None
  assert models.build(NOMEM).flops_per_token(64) < models.build(dict(
      NOMEM, mem_levels=2)).flops_per_token(64)


def test_baseline_configs_match_mmrec_sizes_within_5_percent():
  count = lambda path: models.count_params(models.param_shapes(models.build(
      config_lib.load_config_file(path).model)))
  for size in ("tiny", "mini"):
    mm, tf = count(f"configs/{size}.py"), count(f"configs/baselines/transformer_{size}.py")
    assert abs(tf - mm) / mm < 0.05, (size, mm, tf)


def test_decoder_greedy_equals_argmax_of_full_pass(arm):
  # The decoding form (layers unrolled, per-layer state, last-position prefill).
  from mmrec_jax import sampling  # pylint: disable=g-import-not-at-top
  model, params, apply = arm
  dec = sampling.Decoder(model, eod_id=V - 1, pad_id=1)
  prompt = [5, 9, 3, 7, 11]
  new = dec.generate({"params": params}, [prompt], 6, temperature=0, pad_multiple=1)[0]
  assert new
  full, _, _ = apply(params, jnp.array([[V - 1] + prompt + new]), None, None)
  want = np.asarray(jnp.argmax(full[0], -1))[len(prompt):len(prompt) + len(new)]
  np.testing.assert_array_equal(want, new)
