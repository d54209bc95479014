"""The one CLI scaffold: every `python -m mmrec_jax.X` runs its main through `run`.

`run(main)` parses the flags itself (absl + `ml_collections.config_flags`) and
turns every known error into `error: <one line>` on stderr with its exit code:
a missing config file, a config with a syntax error, an unknown override field
(`--config.train.stepz=3`: "did you mean train.steps?"), a wrong-typed value, an
unknown flag or a stray argument exit 2 before `main` runs; the project's errors
(`mmrec_jax.errors`) exit with their code; Ctrl-C outside a training loop exits
130 without a traceback. `--help` (and `--helpfull`) exit 0.

`deferred_sigint()` lets a command stop cleanly on Ctrl-C at a point of its
choosing (e.g. between streamed tokens) instead of in the middle of a compile.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections.config_flags import config_flags as config_flags_lib

from mmrec_jax import errors
from mmrec_jax.config import files as config_files

HELP_ARGS = frozenset({"--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull",
                       "-helpfull", "--helpxml", "-helpxml"})
_FLAG_VALUE = re.compile(r"^flag --([^=\s]+)=(.*?): (.*)$", re.S)


def config_help(command="mmrec_jax.train", example="configs/tiny.py"):
  """Help text for a `--config` flag: how overrides work and how to list the fields."""
  return (f"Config file, e.g. {example}. Override any field with "
          "--config.SECTION.FIELD=VALUE (e.g. --config.train.steps=200 "
          "--config.model.d_model=256 --config.data.path=corpus/); sections: model, train, "
          "data, checkpoint, mesh. List every field and its value with: python -m "
          f"{command} --config={example} --print_config")


def fail(e: errors.MMRecError):
  print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
  sys.exit(e.exit_code)


def run(main):
  """absl `app.run(main)` with one-line errors and documented exit codes."""

  def wrapped(argv):
    quiet_library_noise()
    try:
      return main(argv)
    except errors.Interrupted as e:
      _flush_stdout()
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except errors.MMRecError as e:
      _flush_stdout()
      fail(e)
    except KeyboardInterrupt:
      _flush_stdout()
      print("\ninterrupted", file=sys.stderr, flush=True)
      sys.exit(130)

  app.run(wrapped, flags_parser=parse_flags)


def quiet_library_noise():
  """What libraries print behind the project's own messages stays off stderr: absl log
  lines of the checkpointer's background threads (a failed save is reported once, as
  this project's error) and the tracebacks Python prints at exit for the
  checkpointer's coroutines left pending on a closed event loop."""
  logging.set_verbosity(logging.FATAL)
  default = sys.unraisablehook

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    noise = (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)
             or isinstance(exc, ImportError) and "shutting down" in str(exc)
             or type(obj).__name__ == "coroutine")
    if not noise:
      default(unraisable)
  sys.unraisablehook = hook


def _flush_stdout():
  with contextlib.suppress(Exception):
    sys.stdout.flush()


# ----------------------------------------------------------------------------- flag parsing


def parse_flags(argv):
  """`flags.FLAGS(argv)` with one-line errors (exit 2); `--help` exits 0."""
  wants_help = any(a in HELP_ARGS for a in argv[1:])
  try:
    if not wants_help:
      argv = resolve_config_args(argv)
      check_config_overrides(argv)
      check_required(argv)
    rest = flags.FLAGS(argv)
    if not wants_help:
      for name in _config_flag_names():
        _check_loaded(name)
  except SystemExit as e:
    if wants_help and e.code in (0, 1, None):
      sys.exit(0)
    raise
  except errors.MMRecError as e:
    fail(e)
  except flags.Error as e:
    fail(errors.UsageError(_flag_error(e, argv)))
  except (SyntaxError, OSError, KeyError, AttributeError, ValueError, TypeError) as e:
    fail(errors.ConfigError(f"bad config or override: {_first_line(e)}; see --help"))
  if len(rest) > 1:
    fail(errors.UsageError(f"unexpected argument {rest[1]!r}; flags take the form --name=value "
                           "(see --help)"))
  return rest


def _first_line(e):
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _config_flag_names():
  names = []
  for name in list(flags.FLAGS):
    f = flags.FLAGS[name]
    if config_flags_lib.is_config_flag(f) and f.name == name and name not in names:
      names.append(name)
  return names


def _check_loaded(name):
  """A config file that failed to load (config_flags defers the error): one line."""
  value = flags.FLAGS[name].value
  if type(value).__name__ == "_ErrorConfig":
    path = _arg_value(sys.argv, name) or flags.FLAGS[name].default_as_str or "?"
    path = path.strip("'\"").split(":", 1)[0]
    raise errors.ConfigError(f"config file {path!r} not found; pass e.g. "
                             "--config=configs/tiny.py")


def _flag_error(e, argv):
  """One line for an absl flag error, naming the config field's type for overrides."""
  msg = str(e)
  m = _FLAG_VALUE.match(msg)
  if m:
    name, value, why = m.group(1), m.group(2), _first_line(ValueError(m.group(3)))
    for cname in _config_flag_names():
      if name.startswith(cname + "."):
        path = _arg_value(argv, cname)
        cfg = _try_load(path) if path else None
        old = _lookup(cfg, name[len(cname) + 1:]) if cfg is not None else _MISSING
        if old is not _MISSING and old is not None:
          kind = type(old).__name__
          article = "an" if kind[0] in "aeiou" else "a"
          return (f"--{name}={value}: {name[len(cname) + 1:]} takes {article} {kind} "
                  f"(like {old!r}), got {value!r}")
    return f"--{name}={value}: {why}"
  line = _first_line(e)
  if isinstance(e, flags.UnrecognizedFlagError):
    for cname in _config_flag_names():
      if getattr(e, "flagname", "").startswith(cname + "."):
        return f"--{e.flagname} needs --{cname}=FILE before it on the command line"
    return f"{line}; see --help for the flags"
  return f"{line}; see --help"


# ----------------------------------------------------------------------------- config files


def resolve_config_args(argv):
  """argv with every config flag's value resolved to a file (`--config=tiny` ->
  the shipped configs/tiny.py; a path that exists is kept as it is)."""
  names = _config_flag_names()
  out = [argv[0]]
  args = list(argv[1:])
  i = 0
  while i < len(args):
    a = args[i]
    if a == "--":
      out += args[i:]
      break
    for name in names:
      for dash in ("--", "-"):
        if a.startswith(f"{dash}{name}="):
          a = f"{dash}{name}=" + config_files.resolve(a[len(dash) + len(name) + 1:])
        elif a == f"{dash}{name}" and i + 1 < len(args):
          out.append(a)
          i += 1
          a = config_files.resolve(args[i])
    out.append(a)
    i += 1
  return out


def check_required(argv):
  """UsageError (one line, with an example) for a required flag left out."""
  given = {a.lstrip("-").split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
  for name in list(flags.FLAGS):
    f = flags.FLAGS[name]
    if f.name != name or f.default is not None or name in given:
      continue
    if getattr(f, "_mmrec_required", False) or _is_required(name):
      example = ("--config=tiny (shipped: " + ", ".join(config_files.packaged_names()) + ")"
                 if config_flags_lib.is_config_flag(f) else f"--{name}=...")
      raise errors.UsageError(f"--{name} is required; pass e.g. {example}")


def _is_required(name):
  """Whether absl marks flag `name` required (its validator says so)."""
  for v in flags.FLAGS[name].validators:
    if "must have a value other than None" in getattr(v, "message", ""):
      return True
  return False


_MISSING = object()


def _arg_value(argv, name):
  """The last value given for --name in argv ('--name=v' or '--name v'), or None."""
  value = None
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a == "--":
      break
    for dash in ("--", "-"):
      if a.startswith(f"{dash}{name}="):
        value = a[len(dash) + len(name) + 1:]
      elif a == f"{dash}{name}" and i + 1 < len(args):
        value = args[i + 1]
  return value


def _try_load(path):
  try:
    return config_files.load_file(path)
  except errors.MMRecError:
    return None


def _is_section(v):
  return isinstance(v, (ml_collections.ConfigDict, dict))


def _lookup(cfg, path):
  """The value at dotted `path` of `cfg`, or _MISSING."""
  node = cfg
  for part in path.split("."):
    if not _is_section(node) or part not in node:
      return _MISSING
    node = node[part]
  return node


def field_paths(cfg, prefix=""):
  """Every dotted field and section path of a ConfigDict."""
  out = []
  for k in cfg.keys():
    p = f"{prefix}{k}"
    out.append(p)
    v = cfg[k]
    if _is_section(v):
      out.extend(field_paths(v, p + "."))
  return out


def override_paths(argv, name):
  """The field paths of the `--name.a.b=value` (or `--noname.a.b`) overrides in argv."""
  out = []
  for a in argv[1:]:
    if a == "--":
      break
    if not a.startswith("-"):
      continue
    flag = a.lstrip("-").split("=", 1)[0]
    for head in (name + ".", "no" + name + "."):
      if flag.startswith(head):
        out.append(flag[len(head):])
        break
  return out


def check_config_overrides(argv):
  """ConfigError (one line) for a config file that does not load or an unknown override.

  Runs before absl parses the flags, on each config flag given in argv, so the
  message can name the field and the closest existing one.
  """
  for name in _config_flag_names():
    path = _arg_value(argv, name)
    if path is None:
      continue
    cfg = config_files.load_file(path)
    if not _is_section(cfg):
      raise errors.ConfigError(f"config file {path}: get_config() returned "
                               f"{type(cfg).__name__}, not a ConfigDict")
    fields = field_paths(cfg)
    for field in override_paths(argv, name):
      if _lookup(cfg, field) is not _MISSING:
        continue
      parts = field.split(".")
      parent = ".".join(parts[:-1])
      node = _lookup(cfg, parent) if parent else cfg
      if parent and node is not _MISSING and not _is_section(node):
        continue   # below a non-section value (e.g. a tuple index): config_flags decides
      close = difflib.get_close_matches(field, fields, n=1, cutoff=0.6)
      if close:
        hint = f"did you mean {close[0]}?"
      elif _is_section(node):
        keys = sorted(node.keys())
        shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
        hint = f"{parent or 'the config'} has: {shown}"
      else:
        hint = "see --help for how to list the fields"
      raise errors.ConfigError(f"unknown config field {field}; {hint}")


# ----------------------------------------------------------------------------- Ctrl-C


class StopRequest:
  """Set by Ctrl-C inside `deferred_sigint`; `requested` is checked by the caller."""

  def __init__(self):
    self.requested = False

  def check(self, message="interrupted"):
    """Raises errors.Interrupted(message, 130) if Ctrl-C was pressed."""
    if self.requested:
      raise errors.Interrupted(message, 130)


@contextlib.contextmanager
def deferred_sigint():
  """Within: Ctrl-C only sets `stop.requested` (the caller stops at a safe point).

  A second Ctrl-C quits at once (stdout flushed, exit 130). Outside the main
  thread this is a no-op that never sets the flag.
  """
  stop = StopRequest()

  def handler(signum, frame):
    del signum, frame
    if stop.requested:
      _flush_stdout()
      with contextlib.suppress(Exception):
        sys.stderr.write("\ninterrupted\n")
        sys.stderr.flush()
      os._exit(130)  # pylint: disable=protected-access  (second Ctrl-C: quit now)
    stop.requested = True

  try:
    old = signal.signal(signal.SIGINT, handler)
  except ValueError:   # not the main thread
    yield stop
    return
  try:
    yield stop
  finally:
    signal.signal(signal.SIGINT, old)
