"""Sampling (temperature / top-k / top-p) and the jitted decode loop.

    dec = Decoder(model, eod_id=0, pad_id=1)
    ids = dec.generate(variables, [prompt_ids], max_new_tokens=64, temperature=0.8)

Prompts are left-padded into one batch: `<|pad|>...<|pad|> <|eod|> prompt`,
with reset=True at the `<|eod|>`, so every row starts from a fresh state and
a batch decodes exactly as each prompt alone. The prompt is prefilled by one
parallel `apply`; decoding then feeds one token at a time through the
recurrent state, in a `lax.while_loop` (or, to stream, a jitted step called
from Python). Each prompt has its own seed (one int seed: the same for every
prompt); new token i of a prompt samples with `fold_in(key(seed), i)`, so a
prompt gives the same tokens alone or in any batch, in any position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax.errors import UsageError
from mmrec_jax.models import layers

MAX_NEW_TOKENS = 100_000


def check_settings(max_new_tokens, temperature, top_k, top_p):
  """UsageError on a bad sampling setting."""
  if not 0 < max_new_tokens <= MAX_NEW_TOKENS:
    raise UsageError(f"max_new_tokens={max_new_tokens} must be in 1..{MAX_NEW_TOKENS}")
  if not temperature >= 0:
    raise UsageError(f"temperature={temperature} must be >= 0 (0 is greedy)")
  if not 0 < top_p <= 1:
    raise UsageError(f"top_p={top_p} must be in (0, 1] (1 disables nucleus sampling)")
  if top_k < 0:
    raise UsageError(f"top_k={top_k} must be >= 0 (0 disables top-k)")


def _threshold(x_BV, enough, iters=32):
  """Per row, the largest t (to float precision) with enough(x_BV >= t) true, by bisection.

  `enough(keep_BV) -> bool [B]` must be monotone (true for t = min x). No sort:
  sorting the vocabulary is slow on CPU.
  """
  lo_B = jnp.min(jnp.where(jnp.isfinite(x_BV), x_BV, jnp.inf), axis=-1)
  hi_B = jnp.max(x_BV, axis=-1)

  def body(_, c):
    lo_B, hi_B = c
    mid_B = (lo_B + hi_B) / 2
    ok_B = enough(x_BV >= mid_B[:, None])
    return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B)

  lo_B, hi_B = jax.lax.fori_loop(0, iters, body, (lo_B, hi_B))
  return jnp.where(enough(x_BV >= hi_B[:, None]), hi_B, lo_B)


def noise_width(vocab, top_k):
  """How many Gumbel draws one sampled token takes: k with top-k, else the vocabulary."""
  return top_k if 0 < top_k < vocab else vocab


def gumbel_noise(keys_B, i_N, width):
  """Gumbel noise [N, B, width]: row r of step i draws with fold_in(keys_B[r], i).

  Identical to drawing each step on its own; `Decoder` draws a block of steps
  at once because the counter-based generator is a loop on CPU, whose fixed
  cost per call dominated a decoding step."""
  def one(i):
    return jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, i), (width,)))(keys_B)
  return jax.vmap(one)(i_N)


def sample_logits(key, logits_BV, temperature, top_k, top_p, gumbel_BK=None):
  """Next tokens int32 [B]; temperature 0 is greedy, top_k 0 / top_p 1 disable.

  The settings are Python numbers (static under jit). Top-k (`lax.top_k`) comes
  first, then top-p on the renormalised top-k distribution (the smallest prefix
  of the sorted candidates whose mass reaches top_p; without top-k, a bisection
  on the threshold, ties kept). Gumbel-max with `key`: a key array [B] gives
  row r the key key[r], so a row's token depends on its own key and logits
  only; one key gives row r fold_in(key, r) (depends on the row's index).
  `gumbel_BK` [B, noise_width(V, top_k)]: noise drawn beforehand (then `key`
  is unused).
  """
  B, V = logits_BV.shape
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  x_BK, idx_BK = logits_BV / temperature, None
  if 0 < top_k < V:
    x_BK, idx_BK = jax.lax.top_k(x_BK, top_k)  # sorted, descending
  if top_p < 1:
    p_BK = jax.nn.softmax(x_BK, axis=-1)
    if idx_BK is not None:
      keep_BK = jnp.cumsum(p_BK, axis=-1) - p_BK < top_p
    else:
      thr_B = _threshold(x_BK, lambda keep: jnp.sum(jnp.where(keep, p_BK, 0.0), -1) >= top_p)
      keep_BK = x_BK >= thr_B[:, None]
    x_BK = jnp.where(keep_BK, x_BK, -jnp.inf)
  if gumbel_BK is None:
    if key.ndim == 0:
      keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(B))
    else:
      keys = key
    gumbel_BK = jax.vmap(lambda k: jax.random.gumbel(k, x_BK.shape[1:]))(keys)
  j_B = jnp.argmax(x_BK + gumbel_BK, axis=-1)
  if idx_BK is not None:
    j_B = jnp.take_along_axis(idx_BK, j_B[:, None], axis=-1)[:, 0]
  return j_B.astype(jnp.int32)


def pack_prompts(prompts, eod_id, pad_id, multiple=1):
  """Left-padded tokens int32 [B, P] and reset bool [B, P]; P rounded up to `multiple`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UsageError("empty prompt; give at least one token of text")
  n = max(len(p) for p in prompts) + 1
  n = -(-n // multiple) * multiple
  tokens_BP = np.full((len(prompts), n), pad_id, np.int32)
  reset_BP = np.zeros((len(prompts), n), bool)
  for b, p in enumerate(prompts):
    tokens_BP[b, n - len(p) - 1] = eod_id
    reset_BP[b, n - len(p) - 1] = True
    tokens_BP[b, n - len(p):] = p
  return tokens_BP, reset_BP


def row_keys(seed, n):
  """Random keys [n], one per prompt, from an int seed (shared) or n int seeds."""
  seeds = [seed] * n if isinstance(seed, (int, np.integer)) else list(seed)
  if len(seeds) != n or not all(isinstance(s, (int, np.integer)) for s in seeds):
    raise UsageError(f"seed={seed!r} must be an int or a list of {n} ints, one per prompt")
  return jnp.stack([jax.random.key(int(s)) for s in seeds])


class Decoder:
  """Jitted prefill, step and decode loop of one model (compiled once per shape)."""

  def __init__(self, model, eod_id=0, pad_id=1):
    # Decoding runs the model's decoding form (for MM-Rec: layers unrolled, each
    # layer's weights read in place); `prepare` converts the parameters.
    self._given = model
    self.model, _ = model.unstack()
    self.eod_id, self.pad_id = eod_id, pad_id
    self.prefill = jax.jit(self._prefill)
    self.step = jax.jit(self._step, static_argnames=("settings",))
    self.loop = jax.jit(self._loop, static_argnames=("settings", "n_new"))

  def prepare(self, variables):
    """Variables of the model as given -> variables of its decoding form."""
    return {"params": self._given.unstack(variables["params"])[1]}

  def _prefill(self, variables, tokens_BT, reset_BT, state=None):
    logits_B1V, state, _ = self.model.apply(variables, tokens_BT, state=state, reset=reset_BT,
                                            last_only=True)
    return logits_B1V[:, -1], state

  NOISE_BLOCK = 32  # decoding steps whose sampling noise is drawn at once

  def _step(self, variables, keys_B, i, logits_BV, state, done_B, settings, gumbel_BK=None):
    """Samples token i from logits_BV, feeds it; returns (tok_B, logits_BV, state, done_B)
    (the state as a list of per-layer states, see `layers.split_state`).

    Row r draws with fold_in(keys_B[r], i): its own key and the step only."""
    state = layers.split_state(state, self.model.cfg.n_layers)
    if gumbel_BK is None and settings[0] != 0:
      width = noise_width(logits_BV.shape[-1], settings[1])
      gumbel_BK = gumbel_noise(keys_B, i[None], width)[0]
    tok_B = sample_logits(None, logits_BV, *settings, gumbel_BK=gumbel_BK)
    tok_B = jnp.where(done_B, self.pad_id, tok_B)
    done_B = done_B | (tok_B == self.eod_id)
    logits_B1V, state, _ = self.model.apply(variables, tok_B[:, None], state=state)
    return tok_B, logits_B1V[:, 0], state, done_B

  def _loop(self, variables, keys_B, logits_BV, state, settings, n_new):
    B, V = logits_BV.shape
    S = self.NOISE_BLOCK
    width = noise_width(V, settings[1]) if settings[0] != 0 else 0

    def cond(c):
      return (c[0] < n_new) & ~jnp.all(c[3])

    def body(c):
      i, logits_BV, state, done_B, out_BN, noise_SBK = c
      if width:  # the next S steps' noise, drawn when step i starts a block
        noise_SBK = jax.lax.cond(i % S == 0,
                                 lambda: gumbel_noise(keys_B, i + jnp.arange(S), width),
                                 lambda: noise_SBK)
      tok_B, logits_BV, state, done_B = self._step(
          variables, keys_B, i, logits_BV, state, done_B, settings,
          gumbel_BK=noise_SBK[i % S] if width else None)
      return i + 1, logits_BV, state, done_B, out_BN.at[:, i].set(tok_B), noise_SBK

    state = layers.split_state(state, self.model.cfg.n_layers)  # carried per layer, in place
    out_BN = jnp.full((B, n_new), self.pad_id, jnp.int32)
    noise_SBK = jnp.zeros((S, B, width), jnp.float32)
    c = (jnp.int32(0), logits_BV, state, jnp.zeros((B,), bool), out_BN, noise_SBK)
    return jax.lax.while_loop(cond, body, c)[4]

  def generate(self, variables, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
               seed=0, on_tokens=None, pad_multiple=16):
    """New token ids per prompt (without the final `<|eod|>`).

    Args:
      variables: {'params': ...}.
      prompts: lists of token ids (without `<|eod|>`).
      max_new_tokens: at most this many new tokens per prompt.
      temperature, top_k, top_p: see `sample_logits`.
      seed: int, or one int per prompt: prompt r samples with its own seed
        (an int: the same seed for every prompt), so a prompt gives the same
        tokens alone or in a batch.
      on_tokens: optional callback(tok_B np.int32, done_B np.bool_) after each
        step; given, a jitted step runs in a Python loop (for streaming).
      pad_multiple: prompt batches are padded to a multiple of this (fewer compiles).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    tokens_BP, reset_BP = pack_prompts(prompts, self.eod_id, self.pad_id, pad_multiple)
    settings = (float(temperature), int(top_k), float(top_p))
    keys_B = row_keys(seed, len(prompts))
    variables = self.prepare(variables)
    logits_BV, state = self.prefill(variables, tokens_BP, reset_BP)
    if on_tokens is None:
      out_BN = np.asarray(self.loop(variables, keys_B, logits_BV, state, settings=settings,
                                    n_new=int(max_new_tokens)))
    else:
      done_B = jnp.zeros((len(prompts),), bool)
      cols = []
      for i in range(max_new_tokens):
        tok_B, logits_BV, state, done_B = self.step(variables, keys_B, jnp.int32(i), logits_BV,
                                                    state, done_B, settings=settings)
        tok_B, done_np = np.asarray(tok_B), np.asarray(done_B)
        cols.append(tok_B)
        on_tokens(tok_B, done_np)
        if done_np.all():
          break
      out_BN = np.stack(cols, axis=1)
    res = []
    for row in out_BN.tolist():
      n = row.index(self.eod_id) if self.eod_id in row else len(row)
      res.append(row[:n])
    return res
