"""The model registry: `model.kind` picks a model; each model declares what it can do.

    from mmrec_jax import models
    model = models.build(config.model)        # a schema, a dict or a ConfigDict
    params = models.init_params(model, jax.random.key(0))
    logits_BTV, state, aux = model.apply({"params": params}, tokens_BT)

A model is a schema (a frozen dataclass, `BaseConfig`'s subclass, holding its
defaults and validation) and a Flax module, registered here by its `kind`.
Nothing outside `models/` asks for a kind by name: it asks the model.

The schema declares (class attributes and methods, `base.BaseConfig`):
- `CARRIES_STATE`: a fixed-size decoding state, so `train.carry_state` works;
- `GROWTH`: its growth rules (`models.base.GrowthRules`), or None;
- `for_context(n)`: the config whose decoding state holds n tokens of context.

The module has the same surface for every model:
- `__call__(tokens, state=None, reset=None, deterministic=True, last_only=False,
  head=True) -> (logits float32, state, aux)`: `state` is its decoding state
  (`STATE_TYPE`, stacked over layers), `reset` marks document starts, `aux` its
  auxiliary losses; `last_only`: the last position's logits only; `head=False`:
  the final hidden states instead of logits (for `logits(params, x)` applied in
  pieces, as a chunked loss does);
- `init_state(batch)`, `flops_per_token(seq_len)`, `aux_weights()`, `lr_scales()`;
- `logits(params, x_BTD)`: the head on final hidden states;
- `without_memory_read(variables)`: the variables with the long-term memory's
  read-out zeroed (None for a model without one);
- `with_memory_geometry(slots, levels)`: the model with another memory geometry
  (the same parameters; None for a model without a memory);
- `unstack(params) -> (model, params)`: the form decoding runs (may be itself).
Its parameters carry logical axis names, with layers stacked on a leading
`layers` axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmrec_jax.errors import ConfigError
from mmrec_jax.models import mmrec
from mmrec_jax.models import transformer
from mmrec_jax.models.base import BaseConfig, GrowthRules

# kind -> (schema, module)
REGISTRY: dict[str, tuple[type, type]] = {}
DEFAULT_KIND = "mmrec"


def register(schema_cls, module):
  """Adds a model: its schema (with a `kind` default) and its Flax module."""
  REGISTRY[schema_cls.kind] = (schema_cls, module)


register(mmrec.MMRecConfig, mmrec.MMRec)
register(transformer.TransformerConfig, transformer.Transformer)


def schema(kind):
  """The config dataclass of a model kind."""
  if kind not in REGISTRY:
    raise ConfigError(f"model.kind={kind!r} is unknown; use one of {', '.join(sorted(REGISTRY))}")
  return REGISTRY[kind][0]


def make_config(model_cfg, saved=False) -> BaseConfig:
  """The validated schema instance of a model section (ConfigDict, dict or schema).
  `saved`: a section read from a run directory, whose fields it predates take the
  value the run had in effect (`BEFORE_FIELDS`)."""
  if isinstance(model_cfg, BaseConfig):
    return model_cfg
  d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  d.setdefault("kind", DEFAULT_KIND)   # configs saved before model.kind existed
  return schema(d["kind"]).from_dict(d, saved=saved)


def build(model_cfg) -> nn.Module:
  """The Flax module of a model section."""
  cfg = make_config(model_cfg)
  return REGISTRY[cfg.kind][1](cfg)


def init_params(model, rng):
  """Parameters, boxed with their logical axis names (jitted; nothing else runs)."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  return jax.jit(lambda r: model.init({"params": r}, tokens)["params"])(rng)


def param_shapes(model):
  """Unboxed parameter shapes, nothing allocated (jax.eval_shape)."""
  return jax.eval_shape(lambda r: nn.unbox(init_params(model, r)), jax.random.key(0))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree))))


def state_bytes(state) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state)))


__all__ = ["REGISTRY", "DEFAULT_KIND", "BaseConfig", "GrowthRules", "register", "schema",
           "make_config", "build", "init_params", "param_shapes", "count_params", "state_bytes"]
