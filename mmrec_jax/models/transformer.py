"""The Transformer baseline (`model.kind = "transformer"`): a pre-norm decoder with
causal multi-head attention and rotary positions, the same FFN, RMSNorm, tied
embedding and head as MM-Rec, behind the same model surface.

A reset (a document start) is honoured exactly: a token attends only to earlier
tokens of its own document, and rotary positions count from the document start,
so a packed document gives the logits it gives alone.

Decoding state: a KV cache of the last `cache_len` tokens per layer (keys already
rotated, each entry tagged with its document), right-aligned: a call with T new
tokens attends to the cache plus themselves and keeps the newest `cache_len`.
Beyond `cache_len` tokens of one document the model runs as sliding-window
attention; beyond the trained length its rotary positions are extrapolated.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mmrec_jax.models import base
from mmrec_jax.models import layers
from mmrec_jax.models.layers import MLP, dense, logical, rms_norm


@dataclasses.dataclass(frozen=True)
class TransformerConfig(base.BaseConfig):
  """The Transformer baseline's model section (`model.kind = "transformer"`)."""
  kind: str = "transformer"
  rope_base: float = 10000.0
  cache_len: int = 4096          # decoding: tokens of context kept in the KV cache

  def validate(self):
    super().validate()
    base.check(self.kind == "transformer", f"TransformerConfig has kind {self.kind!r}")
    base.positive_ints(self, ("cache_len",))
    base.check((self.d_model // self.n_heads) % 2 == 0,
               f"model.d_model / model.n_heads = {self.d_model // self.n_heads} must be even "
               "(rotary positions rotate pairs of channels)")
    base.check(self.rope_base > 1, f"model.rope_base={self.rope_base} must be > 1")

  def for_context(self, n_tokens):
    """A KV cache of at least `n_tokens` tokens."""
    return self if n_tokens <= self.cache_len else self.replace(cache_len=int(n_tokens))


@struct.dataclass
class KVCache:
  """One layer's decoding state (a leading layers axis when stacked over the model)."""
  k: jax.Array        # [B, C, H, hd] rotated keys of the last C tokens (oldest first)
  v: jax.Array        # [B, C, H, hd]
  doc: jax.Array      # [B, C] int32: the document each entry belongs to (-1: empty)
  pos: jax.Array      # [B] int32: position in the current document of the next token
  cur_doc: jax.Array  # [B] int32: the current document's number


def rope(x_BTHd, pos_BT, base_freq):
  """Rotary positions: channel pairs (i, i + hd/2) rotated by pos * base^(-2i/hd)."""
  hd = x_BTHd.shape[-1]
  inv_F = base_freq ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) * 2.0 / hd)
  ang_BTF = pos_BT.astype(jnp.float32)[..., None] * inv_F
  cos, sin = jnp.cos(ang_BTF)[:, :, None], jnp.sin(ang_BTF)[:, :, None]
  x1, x2 = jnp.split(x_BTHd.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTHd.dtype)


class Block(nn.Module):
  """Pre-norm attention + FFN, both residual."""
  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, cache: KVCache, pos_BT, doc_BT):
    cfg = self.cfg
    B, T, D = x_BTD.shape
    H = cfg.n_heads
    hd = D // H
    dt = cfg.compute_dtype
    out_scale = 1.0 / (2 * cfg.n_layers)
    x_BTD = layers.constrain(x_BTD, *layers.BTD)
    xn_BTD = rms_norm(cfg, "norm_attn")(x_BTD)
    qkv_BT3D = nn.DenseGeneral(
        (3, D), use_bias=False, dtype=dt, param_dtype=cfg.params_dtype,
        kernel_init=logical(layers.scaled(), "embed", None, "fused"), dot_general=cfg.dot_general,
        name="qkv")(xn_BTD)
    qkv_BT3D = layers.saved(qkv_BT3D, "fused")
    q_BTHd, k_BTHd, v_BTHd = (layers.constrain(qkv_BT3D[..., j, :].reshape(B, T, H, hd), "activation_batch", "activation_length", "activation_heads", None)
                              for j in range(3))
    q_BTHd = rope(q_BTHd, pos_BT, cfg.rope_base)
    k_BTHd = rope(k_BTHd, pos_BT, cfg.rope_base)

    # Keys: the cache (empty in a pass without a state) then the new tokens; a query
    # sees a key of its own document at or before its position.
    t_T = jnp.arange(T)
    causal_TT = t_T[None, :] <= t_T[:, None]
    keys_BSHd = jnp.concatenate([cache.k.astype(dt), k_BTHd], axis=1)
    vals_BSHd = jnp.concatenate([cache.v.astype(dt), v_BTHd], axis=1)
    doc_BS = jnp.concatenate([cache.doc, doc_BT], axis=1)
    mask_BTS = doc_BT[:, :, None] == doc_BS[:, None, :]
    mask_BTS = mask_BTS & jnp.concatenate(
        [jnp.ones((T, cache.k.shape[1]), bool), causal_TT], axis=1)
    logits_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHd, keys_BSHd,
                             preferred_element_type=jnp.float32) * hd ** -0.5
    logits_BHTS = jnp.where(mask_BTS[:, None], logits_BHTS, -1e30)
    p_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(dt)
    y_BTHd = jnp.einsum("bhts,bshd->bthd", p_BHTS, vals_BSHd)
    y_BTD = dense(D, ("kv", "embed"), cfg, "attn_out", init_scale=out_scale)(
        y_BTHd.reshape(B, T, D))
    y_BTD = layers.saved(y_BTD, "mix_out")
    x_BTD = x_BTD + nn.Dropout(cfg.dropout)(y_BTD, deterministic=self.deterministic)

    f_BTD = layers.saved(MLP(cfg.ffn_mult * D, D, cfg, name="ffn", out_init_scale=out_scale)(
        rms_norm(cfg, "norm_ffn")(x_BTD)), "ffn_out")
    x_BTD = layers.constrain(x_BTD + nn.Dropout(cfg.dropout)(f_BTD, deterministic=self.deterministic),
                             *layers.BTD)

    # The newest C entries of (cache, new tokens), padded in front when there are fewer.
    C = cfg.cache_len
    pad = max(0, C - keys_BSHd.shape[1])
    if pad:
      keys_BSHd = jnp.pad(keys_BSHd, ((0, 0), (pad, 0), (0, 0), (0, 0)))
      vals_BSHd = jnp.pad(vals_BSHd, ((0, 0), (pad, 0), (0, 0), (0, 0)))
      doc_BS = jnp.pad(doc_BS, ((0, 0), (pad, 0)), constant_values=-1)
    new = KVCache(k=keys_BSHd[:, -C:], v=vals_BSHd[:, -C:], doc=doc_BS[:, -C:],
                  pos=pos_BT[:, -1] + 1, cur_doc=doc_BT[:, -1])
    return x_BTD, (new, {})


class Transformer(layers.LanguageModel, nn.Module):
  """The baseline language model: embedding, L blocks, final RMSNorm, tied head."""
  STATE_TYPE = KVCache
  cfg: TransformerConfig
  unstacked: bool = False

  def init_state(self, batch: int, cache_len: int | None = None) -> KVCache:
    """An empty KV cache of `cache_len` tokens, stacked over layers."""
    c = self.cfg
    L, H = c.n_layers, c.n_heads
    C = c.cache_len if cache_len is None else cache_len
    hd = c.d_model // H
    return KVCache(k=jnp.zeros((L, batch, C, H, hd), c.compute_dtype),
                   v=jnp.zeros((L, batch, C, H, hd), c.compute_dtype),
                   doc=jnp.full((L, batch, C), -1, jnp.int32),
                   pos=jnp.zeros((L, batch), jnp.int32),
                   cur_doc=jnp.zeros((L, batch), jnp.int32))

  def aux_weights(self) -> dict[str, float]:
    return {}

  def lr_scales(self) -> dict[str, float]:
    return {}

  def flops_per_token(self, seq_len: int | None = None) -> float:
    """Forward matmul FLOPs per token; attention at the average causal span seq_len / 2."""
    cfg = self.cfg
    D, V, L, F = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.ffn_mult * cfg.d_model
    span = (seq_len or cfg.max_seq_len) / 2
    per_layer = 2 * D * 3 * D + 2 * D * D + 2 * 2 * D * span + 2 * 2 * D * F
    return float(L * per_layer + 2 * D * V)

  @nn.compact
  def __call__(self, tokens_BT, state=None, reset=None, deterministic=True, last_only=False,
               head=True):
    cfg = self.cfg
    B, T = tokens_BT.shape
    if state is None:  # a fresh start: attend to the new tokens only
      state = self.init_state(B, cache_len=0)
    reset_BT = jnp.zeros((B, T), bool) if reset is None else reset.astype(bool)
    # Positions within the document and document numbers (the same for every layer).
    first = layers.layer_state(state, 0)
    pos_BT, _ = jax.vmap(layers.positions)(first.pos, reset_BT)
    doc_BT = first.cur_doc[:, None] + jnp.cumsum(reset_BT, axis=1).astype(jnp.int32)
    embed_VD = layers.embedding(self, cfg)
    x_BTD = layers.embed_tokens(embed_VD, tokens_BT, cfg)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    x_BTD, new_state, _ = layers.run_layers(Block, cfg, x_BTD, state, pos_BT, doc_BT,
                                            unstacked=self.unstacked,
                                            deterministic=deterministic)
    if last_only:  # logits of the last position only (a prefill needs no others)
      x_BTD = x_BTD[:, -1:]
    x_BTD = rms_norm(cfg, "final_norm")(x_BTD)
    if not head:  # the final hidden states; the caller applies the head (`logits`, as a chunked loss applies it)
      return x_BTD, new_state, {}
    logits_BTV = layers.constrain(layers.tied_head(x_BTD, embed_VD, cfg), "activation_batch",
                                  "activation_length", "activation_vocab")
    return logits_BTV, new_state, {}
