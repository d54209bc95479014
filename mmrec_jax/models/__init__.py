"""The model registry: `model.kind` in a config picks a model; every model has one
schema (a frozen dataclass holding its defaults) and the same surface.

    from mmrec_jax import models
    model = models.build(config.model)        # a ConfigDict, a dict or a schema
    params = models.init_params(model, jax.random.key(0))
    logits_BTV, state, aux = model.apply({"params": params}, tokens_BT)

Every model is a Flax module with
- `__call__(tokens, state=None, reset=None, deterministic=True, last_only=False)
  -> (logits float32, state, aux)`: `state` is its decoding state, `reset` marks
  document starts, `aux` its auxiliary losses; `last_only` returns the last
  position's logits only ([B, 1, V], for a prefill);
- `init_state(batch)`, `flops_per_token(seq_len)`, `aux_weights()`, `lr_scales()`
  (its own per-module learning-rate factors; `train.lr_scales` overrides them);
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
from mmrec_jax.models.base import BaseConfig

# kind -> (schema, module)
REGISTRY: dict[str, tuple[type, type]] = {}


def register(kind, schema, module):
  REGISTRY[kind] = (schema, module)


register("mmrec", mmrec.MMRecConfig, mmrec.MMRec)
register("transformer", transformer.TransformerConfig, transformer.Transformer)

DEFAULT_KIND = "mmrec"


def schema(kind):
  """The config dataclass of a model kind."""
  if kind not in REGISTRY:
    raise ConfigError(f"model.kind={kind!r} is unknown; use one of {', '.join(sorted(REGISTRY))}")
  return REGISTRY[kind][0]


def make_config(model_cfg) -> BaseConfig:
  """The validated schema instance of a model section (ConfigDict, dict or schema)."""
  if isinstance(model_cfg, BaseConfig):
    return model_cfg
  d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  d.setdefault("kind", DEFAULT_KIND)   # configs saved before model.kind existed
  return schema(d["kind"]).from_dict(d)


def fill_saved(saved_model):
  """(model dict, names filled): a model section read from a saved run, with each
  field it predates set to the value the run had in effect (`BEFORE_FIELDS`),
  not to today's default. An unknown kind is returned as it is."""
  d = saved_model.to_dict() if hasattr(saved_model, "to_dict") else dict(saved_model)
  kind = d.get("kind", DEFAULT_KIND)
  if kind not in REGISTRY:
    return d, []
  missing = {k: v for k, v in REGISTRY[kind][0].BEFORE_FIELDS.items() if k not in d}
  return {**d, **missing}, sorted(missing)


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
