"""Sampling (`inference/sampling.py`): seeded and deterministic, greedy equal to the
argmax of a full pass, the loop equal to streamed steps, a prompt's tokens the same
alone or in a batch, top-k / top-p filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmrec_jax import generate as gen_lib
from mmrec_jax import models
from mmrec_jax.inference import sampling
from mmrec_jax.models import mmrec as M
from tests.support import random_tokens

# MM-Rec with every option on and one layer; MoE at its default settings, the memory
# read on its own residual branch.
MOE_1 = M.MMRecConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, chunk_size=4,
                      mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True,
                      moe_experts=4, use_uboo=True, mem_residual=True, mem_out_init=1.0)


def _tokens(B, T, seed=1):
  return random_tokens(B, T, seed, 64, low=2)


def test_generation_is_deterministic_for_a_seed(loaded):
  model, variables, tok, _, dec = loaded
  run = lambda seed: gen_lib.generate(model, variables, tok, ["def main(", "x = "], 24, 1.0,
                                      top_k=50, top_p=0.9, seed=seed, decoder=dec)
  a, b, c = run(0), run(0), run(1)
  assert a == b and a != c
  assert all(a)


def test_greedy_equals_argmax_of_full_pass(loaded):
  model, variables, tok, _, dec = loaded
  prompt = tok.encode("for value in list").ids
  new = dec.generate(variables, [prompt], 30, temperature=0)[0]
  streamed = []
  same = dec.generate(variables, [prompt], 30, temperature=0,
                      on_tokens=lambda t, d: streamed.append(int(t[0])))[0]
  assert same == new and streamed[:len(new)] == new
  assert len(new) >= 20 and len(set(new)) > 5   # crosses several memory chunks (size 8)
  seq = jnp.array([[0] + prompt + new])
  logits, _, _ = jax.jit(model.apply)(variables, seq)
  want = np.asarray(jnp.argmax(logits[0], -1))[len(prompt):len(prompt) + len(new)]
  np.testing.assert_array_equal(want, new)


def test_sampled_loop_equals_streamed_steps(loaded):
  # The loop draws its sampling noise a block of steps at a time, the streamed
  # path one step at a time: the same tokens, past the first block too.
  _, variables, tok, _, dec = loaded
  prompt = tok.encode("def main(").ids
  kw = dict(temperature=1.0, top_k=20, top_p=0.9, seed=5)
  loop = dec.generate(variables, [prompt], 40, **kw)[0]
  streamed = dec.generate(variables, [prompt], 40, on_tokens=lambda t, d: None, **kw)[0]
  assert loop == streamed
  assert len(loop) > dec.NOISE_BLOCK


@pytest.mark.slow
def test_batch_decode_equals_single_decode(loaded):
  _, variables, tok, _, dec = loaded
  texts = ["if", "def main(self, value", "import data " * 6]   # 1, ~7, ~24 tokens
  prompts = [tok.encode(t).ids for t in texts]
  batch = dec.generate(variables, prompts, 20, temperature=0)
  single = [dec.generate(variables, [p], 20, temperature=0, pad_multiple=1)[0] for p in prompts]
  assert batch == single
  # Sampling: row r draws with fold_in(key, r), so row 0 matches the prompt alone.
  b = dec.generate(variables, prompts, 20, temperature=1.0, top_k=20, seed=3)
  s = dec.generate(variables, prompts[:1], 20, temperature=1.0, top_k=20, seed=3, pad_multiple=1)
  assert b[0] == s[0]


def test_sample_logits_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  key = jax.random.key(0)
  top2 = np.asarray(sampling.sample_logits(key, logits, 1.0, 2, 1.0))
  assert set(top2.tolist()) == {0, 1} and abs(np.mean(top2 == 0) - 0.625) < 0.03
  nucleus = np.asarray(sampling.sample_logits(key, logits, 1.0, 0, 0.6))
  assert set(nucleus.tolist()) == {0, 1}
  assert set(np.asarray(sampling.sample_logits(key, logits, 1.0, 0, 1.0)).tolist()) == {0, 1, 2, 3}
  assert np.all(np.asarray(sampling.sample_logits(key, logits, 0.0, 0, 1.0)) == 0)


def test_sampled_batch_gives_each_prompt_what_it_gives_alone():
  model = M.MMRec(MOE_1)
  variables = {"params": nn.unbox(models.init_params(model, jax.random.key(0)))}
  dec = sampling.Decoder(model, eod_id=0, pad_id=1)
  prompts = [np.asarray(_tokens(1, n, seed=20 + n)[0]).tolist() for n in (2, 9, 21)]
  kw = dict(max_new_tokens=12, temperature=0.8, top_k=20)
  batch = dec.generate(variables, prompts, seed=7, **kw)
  alone = [dec.generate(variables, [p], seed=7, pad_multiple=1, **kw)[0] for p in prompts]
  assert batch == alone
  # Per-prompt seeds: a prompt's tokens depend on its own seed only.
  seeds = [3, 11, 5]
  batch = dec.generate(variables, prompts, seed=seeds, **kw)
  alone = [dec.generate(variables, [p], seed=s, pad_multiple=1, **kw)[0]
           for p, s in zip(prompts, seeds)]
  assert batch == alone
  moved = dec.generate(variables, prompts[::-1], seed=seeds[::-1], **kw)
  assert moved == batch[::-1]
  # Sampling is on: it is not greedy, and another seed gives other tokens.
  greedy = dec.generate(variables, prompts, max_new_tokens=12, temperature=0)
  assert batch != greedy
  assert dec.generate(variables, prompts, seed=8, **kw) != dec.generate(variables, prompts,
                                                                        seed=7, **kw)


def test_sample_logits_uses_each_rows_key():
  logits = jnp.zeros((3, 50))
  keys = jnp.stack([jax.random.key(s) for s in (4, 9, 4)])
  tok = np.asarray(sampling.sample_logits(keys, logits, 1.0, 0, 1.0))
  assert tok[0] == tok[2]
  one = [int(sampling.sample_logits(k[None], logits[:1], 1.0, 0, 1.0)[0]) for k in keys]
  assert tok.tolist() == one


def test_bad_seed_list_is_a_usage_error():
  from mmrec_jax.errors import UsageError
  with pytest.raises(UsageError, match="one per prompt"):
    sampling.row_keys([1, 2], 3)
