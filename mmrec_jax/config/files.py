"""Config files: where a name points (a path, or a config shipped in the package)
and the one loader that runs a file's `get_config()`.

`--config=tiny`, `--config=configs/tiny.py` and `--config=/any/path.py` all work,
from a clone or an installed package: a path that exists is used as it is;
otherwise `configs/NAME.py`, `NAME.py` and `NAME` are looked up among the
package's configs (`mmrec_jax/configs/`, e.g. `baselines/transformer_tiny`).
"""
from __future__ import annotations

import importlib.util
import os

from mmrec_jax import errors

PACKAGED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_names():
  """The names of the configs shipped in the package (`tiny`, `baselines/...`)."""
  out = []
  for root, _, names in os.walk(PACKAGED):
    for n in names:
      if n.endswith(".py") and n != "__init__.py":
        rel = os.path.relpath(os.path.join(root, n), PACKAGED)
        out.append(rel[:-3].replace(os.sep, "/"))
  return sorted(out)


def resolve(name: str) -> str:
  """The file a config name points to (ConfigError naming the shipped ones if none)."""
  file, sep, arg = name.partition(":")
  if os.path.isfile(file):
    return name
  stem = file[:-3] if file.endswith(".py") else file
  for prefix in ("configs/", "./configs/", "mmrec_jax/configs/"):
    if stem.startswith(prefix):
      stem = stem[len(prefix):]
      break
  candidate = os.path.join(PACKAGED, stem + ".py")
  if stem and not os.path.isabs(stem) and ".." not in stem.split("/") and os.path.isfile(candidate):
    return candidate + (sep + arg if sep else "")
  shown = ", ".join(packaged_names())
  raise errors.ConfigError(f"config file {file!r} not found; pass a path or a shipped config "
                           f"({shown}), e.g. --config=tiny")


def _first_line(e):
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def load_file(name: str):
  """What a config file's `get_config()` returns ('file.py' or 'file.py:arg' passes
  `arg` to it), usually a ConfigDict; ConfigError in one line for a missing file, a
  syntax error, a failing import or a get_config() that raises."""
  path = resolve(name)
  file, *arg = path.split(":", 1)
  spec = importlib.util.spec_from_file_location("_mmrec_config", file)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except SyntaxError as e:
    raise errors.ConfigError(f"config file {file} has a syntax error at line {e.lineno}: "
                             f"{e.msg}; fix the file") from None
  except Exception as e:  # pylint: disable=broad-except  (user code)
    raise errors.ConfigError(f"config file {file} failed to load ({type(e).__name__}: "
                             f"{_first_line(e)}); fix the file") from None
  if not callable(getattr(mod, "get_config", None)):
    raise errors.ConfigError(f"config file {file} defines no get_config(); a config file is a "
                             "Python module with get_config() returning a ConfigDict")
  try:
    return mod.get_config(*arg)
  except errors.MMRecError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (user code)
    raise errors.ConfigError(f"config file {file}: get_config() raised {type(e).__name__}: "
                             f"{_first_line(e)}; fix the file") from None
