"""MM-Rec in JAX/Flax. `from mmrec_jax import load` loads a trained model (lazily imported)."""


def __getattr__(name):
  if name == "load":
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module("mmrec_jax.load")  # a callable module: load(path, ...)
  raise AttributeError(f"module 'mmrec_jax' has no attribute {name!r}")
