"""MM-Rec in Flax linen: blocks with a gated linear recurrence and an HDS memory.

    from mmrec_jax import models
    model = models.build(config.model)          # model.kind = "mmrec"
    params = models.init_params(model, jax.random.key(0))
    logits_BTV, state, aux = model.apply({'params': params}, tokens_BT)
    logits_BTV, state, aux = model.apply({'params': params}, next_BT, state=state)

`state` is the decoding state, a `LayerState` stacked over layers: the
recurrent state `h` and the long-term memory (slots, and the unfinished chunk);
its size never depends on how many tokens were seen. `reset_BT` marks document
starts: the state is dropped there.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmrec_jax.models import layers
from mmrec_jax.models.layers import rms_norm
from mmrec_jax.models.moe import moe_experts_run
from mmrec_jax.models.mmrec import memory as mem_lib
from mmrec_jax.models.mmrec.block import Block
from mmrec_jax.models.mmrec.config import MMRecConfig
from mmrec_jax.models.mmrec.hds import LayerState


class MMRec(layers.LanguageModel, nn.Module):
  """The MM-Rec language model: embedding, L blocks, final RMSNorm, tied head.

  `unstacked` is the decoding form (`unstack`): per-layer parameters read in
  place; training, checkpoints and exports always use the stacked layout.
  """
  STATE_TYPE = LayerState
  cfg: MMRecConfig
  unstacked: bool = False

  def init_state(self, batch: int) -> LayerState:
    """The decoding state at a document start: fixed size, stacked over layers."""
    c = self.cfg
    L, D = c.n_layers, c.d_model
    memory = None   # no long-term memory (mem_levels=0)
    if c.mem_levels:
      one = mem_lib.empty_memory(c.mem_levels, c.mem_slots, 2 * D)  # key and value per slot
      memory = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (L, batch) + v.shape), one)
    zeros_LBD = lambda: jnp.zeros((L, batch, D), jnp.float32)
    shifted = bool(c.mem_levels) and c.mem_key == "previous"
    return LayerState(h=zeros_LBD(), memory=memory, pos=jnp.zeros((L, batch), jnp.int32),
                      chunk_sum=zeros_LBD(), chunk_weight=jnp.zeros((L, batch), jnp.float32),
                      key_sum=zeros_LBD() if shifted else None,
                      prev_x=zeros_LBD() if shifted else None)

  def aux_weights(self) -> dict[str, float]:
    """Weights of the auxiliary losses `apply` returns: total = ce + sum(w * aux)."""
    w = {}
    if self.cfg.use_moe:
      w["moe"] = self.cfg.moe_loss_weight
    if self.cfg.use_uboo:
      w["uboo"] = self.cfg.uboo_weight
    return w

  def lr_scales(self) -> dict[str, float]:
    """The model's own per-module learning-rate factors ({module name: factor})."""
    return {"memory": float(self.cfg.mem_lr_scale)} if self.cfg.mem_levels else {}

  def flops_per_token(self, seq_len: int | None = None) -> float:
    """Forward matmul FLOPs per token, memory attention included (training: x3)."""
    del seq_len  # the cost per token does not depend on the sequence length
    cfg = self.cfg
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    hid = D // cfg.mdi_hidden_div
    F = cfg.ffn_mult * D
    M = cfg.mem_readable_slots
    per_layer = 2 * D * cfg.n_slices * D                       # fused projection
    per_layer += (2 * 2 * D * cfg.rank) if cfg.use_dpg else (2 * 2 * D * hid)  # f_base
    per_layer += 2 * 2 * D * hid                               # f_ctx
    if cfg.mem_levels:
      per_layer += 2 * D                                       # pooling weight
      summaries = 2 if cfg.mem_key == "previous" else 1
      per_layer += (2 + summaries) * 2 * D * D / cfg.chunk_size  # summaries, key, value per chunk
      per_layer += 2 * 2 * D * M                               # memory attention
      per_layer += 2 * D * D                                   # memory out
    per_layer += 2 * D * D                                     # mixer out
    per_layer += 10 * D                                        # scans and gates (elementwise)
    if cfg.use_moe:  # router, and the expert FFNs the implementation computes per token
      per_layer += 2 * D * cfg.moe_experts + moe_experts_run(cfg) * (2 * 2 * D * F)
    else:
      per_layer += 2 * 2 * D * F
    if cfg.use_uboo:
      per_layer += 2 * 2 * D * hid
    return float(L * per_layer + 2 * D * V)

  def with_memory_geometry(self, slots, levels):
    """This model with `levels` levels of `slots` slots (its parameters fit any
    geometry): what the trained memory does with more or less room."""
    if not self.cfg.mem_levels:
      return None
    cfg = self.cfg.replace(mem_slots=slots, mem_levels=levels)
    return type(self)(cfg, unstacked=self.unstacked, parent=None)

  def without_memory_read(self, variables):
    """The variables with the memory's read-out (`memory/out`) zeroed: the memory is
    written and read as before, but what it reads no longer reaches the block."""
    if not self.cfg.mem_levels:
      return None

    def zero(path, x):
      keys = [getattr(k, "key", None) for k in path]
      return jnp.zeros_like(x) if "memory" in keys and "out" in keys else x
    return jax.tree_util.tree_map_with_path(zero, variables)

  @nn.compact
  def __call__(self, tokens_BT, state=None, reset=None, deterministic=True, last_only=False,
               head=True):
    cfg = self.cfg
    B, T = tokens_BT.shape
    if state is None:  # document starts; the memory left out: HDSMemory makes it empty
      state = self.init_state(B)
      if cfg.mem_levels:
        state = state.replace(memory=None)
    reset_BT = jnp.zeros((B, T), bool) if reset is None else reset.astype(bool)
    embed_VD = layers.embedding(self, cfg)
    x_BTD = layers.embed_tokens(embed_VD, tokens_BT, cfg)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    x_BTD, new_state, aux = layers.run_layers(Block, cfg, x_BTD, state, reset_BT,
                                              unstacked=self.unstacked,
                                              deterministic=deterministic)
    aux = {k: (jnp.mean(v) if k == "moe" else jnp.sum(v)) for k, v in aux.items()}
    if last_only:  # logits of the last position only (a prefill needs no others)
      x_BTD = x_BTD[:, -1:]
    x_BTD = rms_norm(cfg, "final_norm")(x_BTD)
    if not head:  # the final hidden states; the caller applies the head (`logits`, as a chunked loss applies it)
      return x_BTD, new_state, aux
    logits_BTV = layers.constrain(layers.tied_head(x_BTD, embed_VD, cfg), "activation_batch",
                                  "activation_length", "activation_vocab")
    return logits_BTV, new_state, aux
