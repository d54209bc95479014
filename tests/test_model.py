"""The architecture's invariants (design note, 'Invariants'), on small shapes."""
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import models
from mmrec_jax.models import mmrec as M

V = 64
ALL_ON = M.MMRecConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                       mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True, moe_experts=4,
                       use_uboo=True, dropout=0.1, mem_qk_norm=True,
                       mem_pool="exp", mem_read_logn=True, mem_sink=True,
                       mem_out_init=1.0)


@pytest.fixture(scope="module")
def all_on():
  model = M.MMRec(ALL_ON)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  apply = jax.jit(lambda p, t, s, r: model.apply({"params": p}, t, state=s, reset=r))
  return model, params, apply


def _tokens(B, T, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_causality_with_every_option_on(all_on):
  model, params, apply = all_on
  T, t = 48, 21
  toks = _tokens(2, T)
  s0 = model.init_state(2)
  r = jnp.zeros((2, T), bool).at[1, 9].set(True)
  lo, _, _ = apply(params, toks, s0, r)
  lo2, _, _ = apply(params, toks.at[:, t:].set((toks[:, t:] + 7) % V), s0, r)
  diff_T = jnp.abs(lo2 - lo).max(axis=(0, 2))
  assert float(diff_T[:t].max()) == 0.0
  assert float(diff_T[t]) > 1e-4  # the changed token itself changes its prediction


def test_streaming_pieces_and_token_by_token_equal_full_pass(all_on):
  model, params, apply = all_on
  T = 30
  toks = _tokens(2, T, seed=2)
  r = jnp.zeros((2, T), bool).at[0, 11].set(True).at[1, 17].set(True)
  full, s_full, _ = apply(params, toks, model.init_state(2), r)
  pieces, s = [], model.init_state(2)
  for a, b in [(0, 5), (5, 18), (18, 30)]:
    lo, s, _ = apply(params, toks[:, a:b], s, r[:, a:b])
    pieces.append(lo)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)
  steps, s = [], model.init_state(2)
  for t in range(T):
    lo, s, _ = apply(params, toks[:, t:t + 1], s, r[:, t:t + 1])
    steps.append(lo)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s), jax.tree.leaves(s_full)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_the_decoding_form_equals_full_pass(all_on):
  """The decoding form (`unstack`: layers unrolled, the memory's one-token path)
  gives the full pass's logits token by token, across a document start right
  after a chunk end, and with a parallel piece between one-token steps."""
  model, params, apply = all_on
  dmodel, dparams = model.unstack(params)
  dapply = jax.jit(lambda p, t, s, r: dmodel.apply({"params": p}, t, state=s, reset=r))
  T = 30
  toks = _tokens(2, T, seed=5)
  # row 0: a document starts at 12, just after token 11 ended a chunk (chunk_size 4)
  r = jnp.zeros((2, T), bool).at[0, 12].set(True).at[1, 21].set(True)
  full, _, _ = apply(params, toks, model.init_state(2), r)
  out, s = [], model.init_state(2)
  spans = [(t, t + 1) for t in range(16)] + [(16, 24)] + [(t, t + 1) for t in range(24, T)]
  for a, b in spans:   # token 15 ends a chunk in both rows, just before the piece 16..24
    lo, s, _ = dapply(dparams, toks[:, a:b], s, r[:, a:b])
    out.append(lo)
  np.testing.assert_allclose(np.concatenate(out, 1), full, atol=2e-5, rtol=1e-5)


def test_document_start_drops_all_state(all_on):
  model, params, apply = all_on
  toks = _tokens(1, 40, seed=3)
  r = jnp.zeros((1, 40), bool).at[0, 13].set(True)
  packed, _, _ = apply(params, toks, model.init_state(1), r)
  alone, _, _ = apply(params, toks[:, 13:], model.init_state(1), r[:, 13:])
  np.testing.assert_allclose(packed[:, 13:], alone, atol=2e-5, rtol=1e-5)


def test_memory_is_read_block_causally(all_on):
  model, params, apply = all_on
  toks = _tokens(1, 24, seed=4)
  base, _, _ = apply(params, toks, model.init_state(1), None)
  p2 = jax.tree_util.tree_map(lambda x: x, params)
  for blk in ("key", "value"):
    k = p2["blocks"]["memory"][blk]["kernel"]
    p2["blocks"]["memory"][blk]["kernel"] = k * 3.0
  other, _, _ = apply(p2, toks, model.init_state(1), None)
  d_T = jnp.abs(other - base).max(axis=(0, 2))
  C = ALL_ON.chunk_size
  assert float(d_T[:C].max()) == 0.0      # first chunk: empty memory
  assert float(d_T[C:].min()) > 0.0       # later chunks read the memory


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_nan_or_inf_over_32k_tokens(dtype):
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, chunk_size=32, mem_slots=4,
                      mem_levels=4, dtype=dtype)
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks = _tokens(1, 32768, seed=5)
  lo, st, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, toks)
  assert bool(jnp.isfinite(lo).all())
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(st)
             if jnp.issubdtype(x.dtype, jnp.floating))
  assert bool(st.memory.valid.any())  # memory filled


def test_every_parameter_gets_a_gradient(all_on):
  model, params, _ = all_on
  toks = _tokens(2, 32, seed=6)
  w = model.aux_weights()

  def loss(p):
    lo, _, aux = model.apply({"params": p}, toks[:, :-1], deterministic=False,
                             rngs={"dropout": jax.random.key(1)})
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1))
    return ce + sum(w[k] * aux[k] for k in aux)

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(p) for p, g in flat if not bool(jnp.any(g != 0))]
  assert not dead, f"parameters without gradient: {dead}"
  # Every layer and every expert is alive, not only the stacked arrays.
  for p, g in flat:
    g = np.asarray(g)
    assert (np.abs(g).reshape(g.shape[0], -1).max(1) > 0).all(), jax.tree_util.keystr(p)
  moe = np.asarray(grads["blocks"]["moe"]["w_up"])
  assert (np.abs(moe).reshape(moe.shape[0] * moe.shape[1], -1).max(1) > 0).all()


def test_a_zero_read_out_starts_the_memory_as_a_no_op_that_training_opens():
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=4,
                      mem_slots=2, mem_levels=2, mem_out_init=0.0)
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks = _tokens(2, 24, seed=3)

  def loss(p):
    lo, _, _ = model.apply({"params": p}, toks[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1))

  grads = jax.jit(jax.grad(loss))(params)["blocks"]["memory"]
  flat = {jax.tree_util.keystr(p): np.asarray(g)
          for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  # only the read-out learns at step 0; what is written and how it is read follow
  assert np.abs(flat["['out']['kernel']"]).max() > 0
  assert all(not g.any() for k, g in flat.items() if not k.startswith("['out']")), flat.keys()
  with pytest.raises(Exception, match="mem_out_init"):
    models.build(dict(cfg.__dict__, mem_out_init=-1.0))


def test_a_write_without_gradient_keeps_the_function_and_the_memorys_own_gradients():
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=4,
                      mem_slots=2, mem_levels=2, mem_out_init=1.0)
  toks = _tokens(2, 24, seed=4)
  base = M.MMRec(cfg)
  params = nn.unbox(models.init_params(base, jax.random.key(0)))

  def grads_and_logits(c):
    model = M.MMRec(c)

    def loss(p):
      lo, _, _ = model.apply({"params": p}, toks[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1)), lo
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  g_on, lo_on = grads_and_logits(cfg)
  g_off, lo_off = grads_and_logits(M.MMRecConfig(**dict(cfg.__dict__, mem_write_grad=False)))
  np.testing.assert_array_equal(np.asarray(lo_on), np.asarray(lo_off))
  # what the memory's own weights learn is unchanged (they see the same values) ...
  for (p, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(g_on["blocks"]["memory"])[0],
                            jax.tree_util.tree_flatten_with_path(g_off["blocks"]["memory"])[0]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(p))
  # ... but the recurrence below the write gets less gradient: only through its own output
  k_on = np.asarray(g_on["blocks"]["fused"]["kernel"])
  k_off = np.asarray(g_off["blocks"]["fused"]["kernel"])
  assert np.abs(k_on - k_off).max() > 1e-3 * np.abs(k_on).max()


def test_options_off_create_no_parameters():
  off = M.MMRec(ALL_ON.replace(use_dpg=False, use_moe=False, use_uboo=False))
  names = {jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(models.param_shapes(off))[0]}
  assert not any("moe" in n or "uboo" in n or "rank" in n for n in names)
  assert any("ffn" in n for n in names)
  on = {jax.tree_util.keystr(p) for p, _ in
        jax.tree_util.tree_flatten_with_path(models.param_shapes(M.MMRec(ALL_ON)))[0]}
  assert any("moe" in n for n in on) and any("uboo" in n for n in on)
  assert not any("'ffn'" in n for n in on)


def test_aux_losses_are_returned_and_non_degenerate(all_on):
  model, params, apply = all_on
  _, _, aux = apply(params, _tokens(2, 16), model.init_state(2), None)
  assert set(aux) == {"moe", "uboo"}
  # A zero predictor does not minimise UBOO: the target has unit RMS.
  zero = jax.tree_util.tree_map(lambda x: x, params)
  zero["blocks"]["uboo"] = jax.tree_util.tree_map(jnp.zeros_like, zero["blocks"]["uboo"])
  _, _, aux0 = apply(zero, _tokens(2, 16), model.init_state(2), None)
  assert float(aux0["uboo"]) == pytest.approx(ALL_ON.n_layers * 1.0, rel=1e-3)
  assert 0.0 < float(aux["moe"]) < ALL_ON.moe_experts


def test_decoding_state_size_independent_of_tokens_seen(all_on):
  model, params, apply = all_on
  s = model.init_state(1)
  size0 = models.state_bytes(s)
  shapes0 = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s)
  for T in (3, 50, 400):
    _, s, _ = apply(params, _tokens(1, T), s, None)
    assert models.state_bytes(s) == size0
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s) == shapes0
  assert int(s.pos[0, 0]) == 453


def test_remat_and_unscanned_layers_give_the_same_function():
  cfg = ALL_ON.replace(dropout=0.0)
  base = M.MMRec(cfg)
  params = nn.unbox(models.init_params(base, jax.random.key(0)))
  toks = _tokens(1, 12)
  run = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, toks)[0])(p)
  ref = run(base, params)
  lo = run(M.MMRec(cfg.replace(remat="full")), params)
  np.testing.assert_allclose(lo, ref, atol=1e-5)
  # One parameter layout: the unrolled loop reads the same stacked parameters.
  lo = run(M.MMRec(cfg.replace(scan_layers=False)), params)
  np.testing.assert_allclose(lo, ref, atol=1e-5)
  decoder, unstacked = base.unstack(params)
  assert "block_1" in unstacked and "blocks" not in unstacked
  lo = run(decoder, unstacked)
  np.testing.assert_allclose(lo, ref, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
  cfg = ALL_ON.replace(dropout=0.0, use_moe=False)
  params = nn.unbox(models.init_params(M.MMRec(cfg), jax.random.key(0)))
  toks = _tokens(1, 24)
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, toks)[0])(params)
  ref = run(M.MMRec(cfg))
  lo = run(M.MMRec(cfg.replace(dtype="bfloat16")))
  assert lo.dtype == jnp.float32
  assert float(jnp.abs(lo - ref).max()) < 0.1 * float(jnp.abs(ref).max())


@pytest.mark.parametrize("kind", ["mmrec", "transformer"])
def test_bfloat16_matmuls_track_float32_in_values_and_gradients(kind):
  """`matmul_dtype="bfloat16"` on a float32 model: every dense layer's and the head's
  matmul, forward and gradient, runs on bfloat16 operands with float32 results
  (what makes it fast on AMX CPUs); logits and gradients stay close to float32's."""
  cfg = (ALL_ON.replace(dropout=0.0, use_moe=False) if kind == "mmrec"
         else models.make_config({"kind": "transformer", "vocab_size": V, "d_model": 32,
                                  "n_layers": 2, "n_heads": 4}))
  model = models.build(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks = _tokens(2, 24)

  def loss(p, m):
    logits = m.apply({"params": p}, toks)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  fn = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(p, m), has_aux=True))
  (_, ref), g_ref = fn(model)(params)
  mixed = models.build(cfg.replace(matmul_dtype="bfloat16"))
  (_, lo), g_lo = fn(mixed)(params)
  assert lo.dtype == jnp.float32
  assert 0 < float(jnp.abs(lo - ref).max()) < 0.05 * float(jnp.abs(ref).max())
  for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_lo)):
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(a)) + 1e-6
  # Every dense kernel's matmuls (2-D: forward and the gradient's) take bfloat16
  # operands; only the memory's batched products (its read over slots, chunk
  # sums) stay in the compute dtype.
  hlo = fn(mixed).lower(params).as_text()
  dots = [l.split(":")[-1] for l in hlo.splitlines() if "dot_general" in l]
  plain = [d for d in dots if d.split(">")[0].count("x") == 2]
  kernels = [k for k in jax.tree_util.tree_flatten_with_path(params["blocks"])[0]
             if "kernel" in jax.tree_util.keystr(k[0])]
  assert all("bf16" in d for d in plain) and len(plain) >= 2 * len(kernels) > 0, plain


def test_the_head_and_loss_in_chunks_equal_one_piece():
  """train.loss_chunk: the loss from the hidden states, a few tokens at a time
  (the last chunk padded), equals the loss of the whole logits, gradients too."""
  from mmrec_jax import loss as loss_lib
  cfg = ALL_ON.replace(dropout=0.0, use_moe=False)
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  toks, tgts = _tokens(2, 24), _tokens(2, 24, seed=2)
  mask = (jnp.arange(24) < 20)[None].repeat(2, 0)

  def whole(p):
    logits = model.apply({"params": p}, toks)[0]
    return loss_lib.cross_entropy(logits, tgts, mask)[0]

  def chunked(p):
    x = model.apply({"params": p}, toks, head=False)[0]
    return loss_lib.head_cross_entropy(x, p["embed"], tgts, mask, cfg, chunk=7)

  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (whole, chunked))
  np.testing.assert_allclose(b, a, rtol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


def test_matmul_dtype_is_validated():
  with pytest.raises(Exception, match="model.matmul_dtype='int8' is unknown"):
    ALL_ON.replace(matmul_dtype="int8").validate()


def _total(name):
  from mmrec_jax import config as config_lib
  from mmrec_jax.params import count_by_module
  c = config_lib.load_config_file(f"configs/{name}.py")
  return count_by_module(c.model)[1]


def test_parameter_counts_per_config():
  tiny = _total("tiny")
  assert abs(tiny - 1_960_832) / 1_960_832 < 0.05
  assert 6.5e9 <= _total("7b") <= 7.5e9
  sizes = [_total(n) for n in ("tiny", "mini", "small", "base", "medium", "large", "7b")]
  assert sizes == sorted(sizes)
  # Counting from shapes equals counting a real init.
  small = M.MMRec(ALL_ON)
  assert models.count_params(models.param_shapes(small)) == models.count_params(
      models.init_params(small, jax.random.key(0)))


@pytest.mark.slow
def test_params_command_prints_total_last():
  out = subprocess.run([sys.executable, "-m", "mmrec_jax.params", "--config=configs/tiny.py"],
                       capture_output=True, text=True, check=True).stdout.strip().splitlines()
  assert out[-1] == f"total_params: {_total('tiny')}"
  assert any(line.strip().startswith("embed") for line in out)


def test_flops_per_token_counts_the_head_and_memory():
  f = M.MMRec(ALL_ON).flops_per_token(64)
  assert f > 2 * ALL_ON.d_model * ALL_ON.vocab_size
  assert M.MMRec(ALL_ON.replace(mem_levels=6)).flops_per_token(64) > f


def test_decay_strictly_between_zero_and_one():
  x = jnp.array([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4])
  lam = jnp.zeros((7,))
  for base in (x, -x):
    for ctx in (x, -x, jnp.zeros(7)):
      a = jnp.exp(M.log_decay(lam, base[None, None], ctx[None, None]))
      assert bool(((a > 0) & (a < 1)).all())
      assert bool(jnp.isfinite(-jnp.expm1(M.log_decay(lam, base, ctx))).all())


def test_last_only_gives_the_last_positions_logits(all_on):
  # The prefill's form: the head on the last position only, the same state.
  model, params, _ = all_on
  toks = _tokens(2, 12, seed=6)
  full, s_full, _ = model.apply({"params": params}, toks)
  last, s_last, _ = model.apply({"params": params}, toks, last_only=True)
  assert last.shape == (2, 1, V)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_last), jax.tree.leaves(s_full)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change,same", [
    # exp pooling: another summary as soon as one is written (after the first chunk)
    (dict(mem_pool="exp"), 4),
    # log(n) read: log(1) = 0 leaves a read of one slot as it was; from two slots on it differs
    (dict(mem_read_logn=True), 8),
])
def test_read_options_change_only_what_reads_the_memory(change, same):
  """The same weights with and without the option: identical logits up to
  position `same`, different from there on (chunks of 4 tokens)."""
  base = dict(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=4, mem_slots=2,
              mem_levels=2, mem_out_init=1.0)
  ref, alt = M.MMRec(M.MMRecConfig(**base)), M.MMRec(M.MMRecConfig(**base, **change))
  params = nn.unbox(models.init_params(ref, jax.random.key(0)))
  toks = _tokens(1, 16, seed=5)
  a = ref.apply({"params": params}, toks)[0]
  b = alt.apply({"params": params}, toks)[0]
  d_T = jnp.abs(a - b).max(axis=(0, 2))
  assert float(d_T[:same].max()) == 0.0
  assert float(d_T[same:].min()) > 1e-6


def test_the_sink_lets_the_read_abstain_and_an_empty_memory_reads_its_value():
  """`mem_sink`: with its logit very negative the read is exactly the read without
  a sink, except where the memory is empty (before the first chunk ends: chunks
  of 4), which reads the null value; with its logit high every token reads (almost)
  only the null value; at init (zeros) the read differs from the first slot
  written on, and not before."""
  base = dict(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=4, mem_slots=2,
              mem_levels=2, mem_out_init=1.0)
  ref, alt = M.MMRec(M.MMRecConfig(**base)), M.MMRec(M.MMRecConfig(**base, mem_sink=True))
  params = nn.unbox(models.init_params(ref, jax.random.key(0)))
  flat = flax.traverse_util.flatten_dict(nn.unbox(models.init_params(alt, jax.random.key(0))),
                                         sep="/")
  sinks = [k for k in flat if k.endswith(("memory/read_sink", "memory/read_null"))]
  assert len(sinks) == 2 and all(not flat[k].any() for k in sinks)   # zeros at init

  def with_sink(logit, null):
    f = dict(flat)
    for k in sinks:
      f[k] = jnp.full_like(f[k], logit if k.endswith("read_sink") else null)
    return flax.traverse_util.unflatten_dict(f, sep="/")

  def read_out_zeroed(p):
    f = flax.traverse_util.flatten_dict(p, sep="/")
    return flax.traverse_util.unflatten_dict(
        {k: (jnp.zeros_like(v) if "memory/out" in k else v) for k, v in f.items()}, sep="/")

  toks = _tokens(1, 16, seed=5)
  a = ref.apply({"params": params}, toks)[0]
  np.testing.assert_array_equal(alt.apply({"params": with_sink(-1e4, 0.0)}, toks)[0], a)
  d_T = jnp.abs(alt.apply({"params": with_sink(0.0, 0.0)}, toks)[0] - a).max(axis=(0, 2))
  assert float(d_T[:4].max()) == 0.0 and float(d_T[4:].min()) > 1e-6
  # an empty memory reads the null value; a written one, with the sink closed, does not
  d_T = jnp.abs(alt.apply({"params": with_sink(-1e4, 0.5)}, toks)[0] - a).max(axis=(0, 2))
  assert float(d_T[:4].min()) > 1e-6 and float(d_T[4:].max()) == 0.0
  # an open sink: every token reads the null value (zero: nothing)
  np.testing.assert_allclose(alt.apply({"params": with_sink(40.0, 0.0)}, toks)[0],
                             ref.apply({"params": read_out_zeroed(params)}, toks)[0], atol=1e-5)
