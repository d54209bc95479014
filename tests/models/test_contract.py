"""The contract every registered model keeps (`models.REGISTRY`), on small shapes.

Each kind runs with a small config; MM-Rec with its long-term memory on (every
option on, the read gating the mixer), with MoE at its default settings and the
read on its own residual branch, and with the memory off. A model is asked only
what it declares (`CARRIES_STATE`, `GROWTH`, `for_context`, `logits`,
`without_memory_read`, `unstack`, `STATE_TYPE`), never its kind:

- causality: a later token never changes an earlier logit;
- resets: a packed document (and a left-padded batch row) gives the logits it
  gives alone, and what follows it continues alike;
- streaming in pieces, and token by token, equals one pass (the state too);
- the decoding form (`unstack`), token by token, equals one pass; the decoder's
  greedy tokens are the argmax of full passes;
- scanned layers equal unrolled ones, on one parameter tree;
- the decoding state's size never depends on the tokens seen;
- `last_only`, `head=False` + `logits` give the full pass's logits;
- growth is exact where the model declares `GROWTH` (2x width, one more layer).
Model-specific invariants are in the model's own test files.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mmrec_jax import models
from mmrec_jax.errors import ConfigError
from mmrec_jax.growth import expander
from mmrec_jax.inference import sampling
from tests.support import close_trees, random_tokens

V = 64
# Every option on; the memory read gates the mixer (dropout is off in eval mode).
MMREC = dict(kind="mmrec", vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
             mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True, moe_experts=4,
             use_uboo=True, dropout=0.1, mem_qk_norm=True, mem_pool="exp", mem_read_logn=True,
             mem_sink=True, mem_key="previous", mem_out_init=1.0)
# MoE at its default settings (moe_capacity_factor left at 1.25; `dense`: the routing
# both implementations share, compared in test_moe.py), the read on its own residual branch.
MMREC_MOE = dict(kind="mmrec", vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                 mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True,
                 moe_experts=4, use_uboo=True, mem_residual=True, mem_out_init=1.0,
                 moe_impl="dense")
MMREC_NOMEM = dict(kind="mmrec", vocab_size=V, d_model=16, n_layers=2, n_heads=2, mem_levels=0)
# A cache shorter than the tests' context: `for_context` must lengthen it.
TRANSFORMER = dict(kind="transformer", vocab_size=V, d_model=16, n_layers=2, n_heads=2,
                   cache_len=24)
# name -> (model section, the parameters' scale in the decoder's test: 2 gives less uniform
# logits, varied greedy tokens with clear margins; elsewhere the init as it is, whose
# logits keep float32's differences between two exact computations small)
CASES = {"mmrec": (MMREC, 1.0), "mmrec_nomem": (MMREC_NOMEM, 2.0),
         "transformer": (TRANSFORMER, 2.0), "mmrec_moe_residual": (MMREC_MOE, 1.0)}
KINDS = ("mmrec", "mmrec_nomem", "transformer")   # every kind; MM-Rec with and without memory
# ... and the MoE variant, for the invariants of how tokens, documents and rows are kept apart
STREAMING = KINDS + ("mmrec_moe_residual",)
CONTEXT = 64   # tokens of context the tests' decoding states must hold
T = 40         # the tests' window: most calls share its shapes (one compile each per case)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  cfg: models.BaseConfig   # the config as given
  model: nn.Module         # its module, with a state that holds CONTEXT tokens
  params: dict
  apply: object            # jitted (params, tokens, state, reset) -> (logits, state, aux)

  @property
  def carries_state(self):
    return type(self.cfg).CARRIES_STATE

  def run(self, tokens, state=None, reset=None, params=None):
    """(logits, state) of one call; always with a state and a reset array (one compile
    per shape): a fresh state when none is given."""
    B, n = tokens.shape
    state = self.model.init_state(B) if state is None else state
    reset = jnp.zeros((B, n), bool) if reset is None else reset
    logits, state, _ = self.apply(self.params if params is None else params, tokens, state, reset)
    return logits, state


@functools.lru_cache(maxsize=None)
def _case(name):
  section, _ = CASES[name]
  cfg = models.make_config(section)
  model = models.build(cfg).for_context(CONTEXT)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  apply = jax.jit(lambda p, t, s, r: model.apply({"params": p}, t, state=s, reset=r))
  return Case(name, cfg, model, params, apply)


@pytest.fixture(scope="module", params=KINDS)
def case(request):
  return _case(request.param)


@pytest.fixture(scope="module", params=STREAMING)
def any_case(request):
  return _case(request.param)


def _tokens(B, n, seed=1):
  return random_tokens(B, n, seed, V)


def _resets(B, n, *at):
  r = jnp.zeros((B, n), bool)
  for b, t in at:
    r = r.at[b, t].set(True)
  return r


def test_every_registered_model_has_a_case():
  assert {CASES[k][0]["kind"] for k in KINDS} == set(models.REGISTRY)


def test_for_context_holds_the_context(case):
  """`for_context(n)`: a state that holds n tokens (a bounded state: the same model)."""
  assert case.model.cfg == case.cfg.for_context(CONTEXT)
  if case.carries_state:
    assert case.cfg.for_context(10 ** 6) == case.cfg


# ----------------------------------------------------------------------------- causality


def test_a_later_token_never_changes_an_earlier_logit(case):
  t = 21
  toks = _tokens(2, T)
  r = _resets(2, T, (1, 9))
  lo, _ = case.run(toks, reset=r)
  lo2, _ = case.run(toks.at[:, t:].set((toks[:, t:] + 7) % V), reset=r)
  diff_T = jnp.abs(lo2 - lo).max(axis=(0, 2))
  assert float(diff_T[:t].max()) == 0.0
  assert float(diff_T[t]) > 1e-4  # the changed token itself changes its prediction


# ----------------------------------------------------------------------------- resets


def test_a_packed_document_gives_what_it_gives_alone(any_case):
  """A document start drops everything before it: a document's logits are those it
  gives alone, after a short document (row 0: 5 tokens, itself after another) and
  after a long one (row 1: 29 tokens); what follows continues alike (a model with a
  fixed-size state: that state is the one it has alone)."""
  case, start = any_case, 29
  toks = _tokens(2, T, seed=3)
  r = _resets(2, T, (0, start - 5), (0, start), (1, start))
  packed, s_packed = case.run(toks, reset=r)
  alone, s_alone = case.run(toks[:, start:], reset=r[:, start:])
  np.testing.assert_allclose(packed[:, start:], alone, atol=2e-5, rtol=1e-5)
  _same_state(case, s_packed, s_alone, _tokens(2, 8, seed=4))


def _same_state(case, s1, s2, more):
  """Two decoding states continue the same on `more` tokens (and are equal)."""
  x, _ = case.run(more, s1)
  y, _ = case.run(more, s2)
  np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-5)
  if case.carries_state:
    close_trees(s1, s2)


def test_a_left_padded_batch_row_gives_what_it_gives_alone(any_case):
  """Prompts packed into one batch (left padding, then a document start) give what
  each gives alone, whatever shares its row's batch; so does what follows."""
  case = any_case
  prompts = [np.asarray(random_tokens(1, n, 10 + n, V, low=2)[0]).tolist() for n in (3, 17, 30)]
  toks_BP, reset_BP = sampling.pack_prompts(prompts, eod_id=0, pad_id=1, multiple=16)
  batch, s_batch = case.run(jnp.asarray(toks_BP), reset=jnp.asarray(reset_BP))
  more = _tokens(1, 5, seed=7)
  for b, p in enumerate(prompts):
    t1, r1 = sampling.pack_prompts([p], eod_id=0, pad_id=1)
    alone, s_alone = case.run(jnp.asarray(t1), reset=jnp.asarray(r1))
    n = len(p) + 1
    np.testing.assert_allclose(batch[b:b + 1, -n:], alone, atol=2e-5, rtol=1e-5)
    _same_state(case, jax.tree.map(lambda x: x[:, b:b + 1], s_batch), s_alone, more)


# ----------------------------------------------------------------------------- streaming


def test_streaming_in_pieces_and_token_by_token_equal_one_pass(any_case):
  case = any_case
  toks = _tokens(2, T, seed=2)
  r = _resets(2, T, (0, 11), (1, 23))
  full, s_full = case.run(toks, reset=r)
  pieces, s = [], case.model.init_state(2)
  for a, b in [(0, 3), (3, 16), (16, 19), (19, T)]:
    lo, s = case.run(toks[:, a:b], s, r[:, a:b])
    pieces.append(lo)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)
  close_trees(s, s_full)
  steps, s = [], case.model.init_state(2)
  for t in range(T):
    lo, s = case.run(toks[:, t:t + 1], s, r[:, t:t + 1])
    steps.append(lo)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5, rtol=1e-5)
  close_trees(s, s_full)


def test_the_decoding_form_equals_one_pass(case):
  """The decoding form (`unstack`: layers unrolled, weights read in place; MM-Rec's
  memory on its one-token path) gives the full pass's logits token by token, across
  a document start right after a chunk end (MM-Rec's chunks: 4 tokens), and with a
  parallel piece between one-token steps."""
  dmodel, dparams = case.model.unstack(case.params)
  assert "block_1" in dparams and "blocks" not in dparams
  dapply = jax.jit(lambda p, t, s, r: dmodel.apply({"params": p}, t, state=s, reset=r))
  toks = _tokens(2, T, seed=5)
  # row 0: a document starts at 12, just after token 11 ended a chunk
  r = _resets(2, T, (0, 12), (1, 21))
  full, _ = case.run(toks, reset=r)
  out, s = [], case.model.init_state(2)
  spans = [(t, t + 1) for t in range(16)] + [(16, 24)] + [(t, t + 1) for t in range(24, T)]
  for a, b in spans:   # token 15 ends a chunk in both rows, just before the piece 16..24
    lo, s, _ = dapply(dparams, toks[:, a:b], s, r[:, a:b])
    out.append(lo)
  np.testing.assert_allclose(np.concatenate(out, 1), full, atol=2e-5, rtol=1e-5)


def test_the_decoders_greedy_tokens_are_the_argmax_of_full_passes(case):
  """The decoder (prefill of the last position, then one token at a time in the
  decoding form): its greedy tokens are the argmax of full passes, with a prompt
  alone (`pad_multiple=1`) and left-padded, stopping at <|eod|> as the decoder does.
  The full passes run on a fixed length (causality: later tokens change nothing)."""
  eod, n_new, L = V - 1, 6, 24
  params = jax.tree.map(lambda x: x * CASES[case.name][1], case.params)
  full = jax.jit(lambda p, t, r: case.model.apply({"params": p}, t, reset=r)[0])
  reset = jnp.zeros((1, L), bool).at[0, 0].set(True)

  def argmax_after(seq):   # the argmax after every position of seq (from <|eod|>), one pass
    t = jnp.array([seq + [1] * (L - len(seq))])
    return np.asarray(jnp.argmax(full(params, t, reset)[0], -1))[:len(seq)]

  dec = sampling.Decoder(case.model, eod_id=eod, pad_id=1)
  # a prompt alone, unpadded (15 tokens and <|eod|>: the prefill's one shape, 16)
  prompt = [int(x) for x in random_tokens(1, 15, 2, V - 1, low=2)[0]]
  new = dec.generate({"params": params}, [prompt], n_new, temperature=0, pad_multiple=1)[0]
  assert new
  want = argmax_after([eod] + prompt + new)[len(prompt):len(prompt) + len(new)]
  np.testing.assert_array_equal(want, new)
  # a short prompt left-padded to 16 tokens; greedy by full passes, stopping at <|eod|>
  prompt = [int(x) for x in random_tokens(1, 5, 3, V - 1, low=2)[0]]   # no <|eod|>
  new = dec.generate({"params": params}, [prompt], n_new, temperature=0)[0]
  seq, want = [eod] + prompt, []
  for _ in range(n_new):
    nxt = int(argmax_after(seq)[-1])
    if nxt == eod:
      break
    want.append(nxt)
    seq.append(nxt)
  assert new == want


# ----------------------------------------------------------------------------- layers


def test_scanned_layers_equal_unrolled_on_one_parameter_tree(case):
  """`scan_layers` chooses how the layer loop runs, never the function or the
  parameter layout: a checkpoint loads either way."""
  toks = _tokens(2, T)
  ref, _ = case.run(toks)
  shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), models.param_shapes(m))
  assert case.cfg.scan_layers   # the model as built: a rolled layer loop
  for change in (dict(scan_layers=False),):   # remat: test_layers compares gradients
    other = models.build(case.model.cfg.replace(**change))
    assert shapes(other) == shapes(case.model), change
    lo = jax.jit(lambda p, m=other: m.apply({"params": p}, toks, state=m.init_state(2))[0])(
        case.params)
    np.testing.assert_allclose(lo, ref, atol=1e-5, err_msg=str(change))


# ----------------------------------------------------------------------------- the surface


def test_the_decoding_state_size_does_not_depend_on_tokens_seen(case):
  s = case.model.init_state(2)
  assert isinstance(s, case.model.STATE_TYPE)
  size0 = models.state_bytes(s)
  shapes0 = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s)
  for n in [1, 13] + [T] * 10:   # 414 tokens: past the memory's levels, past a KV cache
    lo, s = case.run(_tokens(2, n, seed=n), s)
    assert bool(jnp.isfinite(lo).all())
    assert isinstance(s, case.model.STATE_TYPE)
    assert models.state_bytes(s) == size0
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s) == shapes0
  if case.name != "mmrec_nomem":   # (MM-Rec without a memory keeps no position: none reads it)
    assert int(s.pos[0, 0]) == 1 + 13 + 10 * T


def test_last_only_and_the_head_on_hidden_states_give_the_full_logits(case):
  """The prefill's form (`last_only`: the head on the last position, the same state),
  and `head=False` + `logits(params, x)` (how a chunked loss applies the head)."""
  toks = _tokens(2, T, seed=6)
  full, s_full = case.run(toks)
  s0 = case.model.init_state(2)
  last, s_last, _ = jax.jit(lambda p: case.model.apply({"params": p}, toks, state=s0,
                                                       last_only=True))(case.params)
  assert last.shape == (2, 1, V)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_last), jax.tree.leaves(s_full)):
    np.testing.assert_array_equal(a, b)
  x = jax.jit(lambda p: case.model.apply({"params": p}, toks, state=s0, head=False)[0])(
      case.params)
  assert x.shape == (2, T, case.cfg.d_model)
  np.testing.assert_allclose(case.model.logits(case.params, x), full, atol=1e-5, rtol=1e-5)


def test_without_memory_read_cuts_the_memory_off(case):
  """None for a model without a long-term memory; else the variables with the read-out
  zeroed, after which the memory's other weights change nothing."""
  variables = {"params": case.params}
  cut = case.model.without_memory_read(variables)
  flat = traverse_util.flatten_dict(case.params, sep="/")
  if not any("/memory/" in k for k in flat):
    assert cut is None
    return
  assert jax.tree.structure(cut) == jax.tree.structure(variables)
  toks = _tokens(2, T, seed=4)

  def scaled(params):   # the memory's keys and values, three times larger
    f = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {k: (x * 3.0 if "/memory/key/" in k or "/memory/value/" in k else x)
         for k, x in f.items()}, sep="/")
  before, _ = case.run(toks)
  after, _ = case.run(toks, params=scaled(case.params))
  assert float(jnp.abs(after - before).max()) > 0   # the memory is read
  a, _ = case.run(toks, params=cut["params"])
  b, _ = case.run(toks, params=scaled(cut["params"]))
  np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- growth


def test_growth_to_twice_the_width_and_one_more_layer_is_exact(case):
  """Where the model declares `GROWTH`: the grown parameters give the same logits
  (over the old vocabulary) from a fresh state and, with the state grown too, from
  a carried one. A model without growth rules is refused."""
  small = case.cfg
  big = small.replace(d_model=2 * small.d_model, n_layers=small.n_layers + 1)
  if type(small).GROWTH is None:
    assert any("declares no growth rules" in r for r in expander.inexact_reasons(small, big))
    with pytest.raises(ConfigError, match="--allow_inexact"):
      expander.check_growable(small, big)
    return
  grown = expander.grow_params(case.params, small, big, jax.random.key(3), noise=0.1)
  t = np.array(_tokens(2, 34, seed=1))
  t[1, 7] = 0   # a document start inside row 1
  t = jnp.asarray(t)
  first, second = t[:, :13], t[:, 13:]
  a1, sa = case.run(first, reset=first == 0)
  a2, _ = case.run(second, sa, second == 0)
  fb, mb = expander.logits_fn(big)
  b1, sb = fb(grown, first, mb.init_state(2), first == 0)
  b2, _ = fb(grown, second, sb, second == 0)
  np.testing.assert_allclose(b1[..., :V], a1, atol=1e-4, rtol=0)
  np.testing.assert_allclose(b2[..., :V], a2, atol=1e-4, rtol=0)
  c2, _ = fb(grown, second, expander.grow_state(sa, small, big), second == 0)
  np.testing.assert_allclose(c2[..., :V], a2, atol=1e-4, rtol=0)
