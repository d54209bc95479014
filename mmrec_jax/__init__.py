"""MM-Rec in JAX/Flax. `from mmrec_jax import load` loads a trained model (imported lazily)."""
import logging as _logging

# JAX logs an INFO line for every accelerator plugin it does not find; keep CLIs quiet.
_logging.getLogger("jax._src.xla_bridge").setLevel(_logging.WARNING)

__version__ = "0.1.0"


def __getattr__(name):
  if name == "load":
    from mmrec_jax.io.loading import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'mmrec_jax' has no attribute {name!r}")
