"""The HDS memory layer's read options: each changes only what reads the memory."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import models
from mmrec_jax.models import mmrec as M
from tests.support import random_tokens

V = 64
BASE = dict(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=4, mem_slots=2,
            mem_levels=2, mem_out_init=1.0)


@pytest.mark.parametrize("change,same", [
    # exp pooling: another summary as soon as one is written (after the first chunk)
    (dict(mem_pool="exp"), 4),
    # log(n) read: log(1) = 0 leaves a read of one slot as it was; from two slots on it differs
    (dict(mem_read_logn=True), 8),
])
def test_read_options_change_only_what_reads_the_memory(change, same):
  """The same weights with and without the option: identical logits up to
  position `same`, different from there on (chunks of 4 tokens)."""
  ref, alt = M.MMRec(M.MMRecConfig(**BASE)), M.MMRec(M.MMRecConfig(**BASE, **change))
  params = nn.unbox(models.init_params(ref, jax.random.key(0)))
  toks = random_tokens(1, 16, 5, V)
  a = jax.jit(lambda p: ref.apply({"params": p}, toks)[0])(params)
  b = jax.jit(lambda p: alt.apply({"params": p}, toks)[0])(params)
  d_T = jnp.abs(a - b).max(axis=(0, 2))
  assert float(d_T[:same].max()) == 0.0
  assert float(d_T[same:].min()) > 1e-6


def test_the_sink_lets_the_read_abstain_and_an_empty_memory_reads_its_value():
  """`mem_sink`: with its logit very negative the read is exactly the read without
  a sink, except where the memory is empty (before the first chunk ends: chunks
  of 4), which reads the null value; with its logit high every token reads (almost)
  only the null value; at init (zeros) the read differs from the first slot
  written on, and not before."""
  ref, alt = M.MMRec(M.MMRecConfig(**BASE)), M.MMRec(M.MMRecConfig(**BASE, mem_sink=True))
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

  toks = random_tokens(1, 16, 5, V)
  run_ref = jax.jit(lambda p: ref.apply({"params": p}, toks)[0])
  run_alt = jax.jit(lambda p: alt.apply({"params": p}, toks)[0])   # one compile, any values
  a = run_ref(params)
  np.testing.assert_array_equal(run_alt(with_sink(-1e4, 0.0)), a)
  d_T = jnp.abs(run_alt(with_sink(0.0, 0.0)) - a).max(axis=(0, 2))
  assert float(d_T[:4].max()) == 0.0 and float(d_T[4:].min()) > 1e-6
  # an empty memory reads the null value; a written one, with the sink closed, does not
  d_T = jnp.abs(run_alt(with_sink(-1e4, 0.5)) - a).max(axis=(0, 2))
  assert float(d_T[:4].min()) > 1e-6 and float(d_T[4:].max()) == 0.0
  # an open sink: every token reads the null value (zero: nothing), as a model whose
  # read-out is cut off (`without_memory_read`) does
  cut = ref.without_memory_read({"params": params})
  np.testing.assert_allclose(run_alt(with_sink(40.0, 0.0)), run_ref(cut["params"]), atol=1e-5)
