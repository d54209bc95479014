"""The project's errors: one hierarchy, one line each, one exit code per kind.

Every CLI runs its `main` through `mmrec_jax.cli.run`, which prints a known
error as `error: <message>` (one line, no traceback) and exits with its code:
2 for bad input (flags, config, data, a folder to load), 1 for a run that
failed (a non-finite loss, a workdir in use), 130 / 143 for a run stopped by
Ctrl-C / SIGTERM.
"""
from __future__ import annotations


class MMRecError(Exception):
  """Base of the known errors; `exit_code` is what a CLI exits with."""
  exit_code = 1

  def one_line(self) -> str:
    return " ".join(str(self).split())


class UsageError(MMRecError, ValueError):
  """A bad command-line value (a prompt, a sampling setting, a path)."""
  exit_code = 2


class ConfigError(UsageError):
  """A config value is invalid; the message names the field and what to do."""


class DataError(UsageError):
  """Bad or missing input data; the message names the file (and line)."""


class LoadError(UsageError):
  """A model cannot be loaded (missing files, bad config, shape mismatch)."""


class TrainError(MMRecError):
  """A run cannot go on (non-finite loss, non-finite parameters)."""
  exit_code = 1


class StorageError(MMRecError):
  """A run could not write or read its files (a full disk, a read-only or vanished
  workdir); the message names the path, what happened and what to do."""
  exit_code = 1


class WorkdirBusyError(MMRecError):
  """Another process is training in this workdir."""
  exit_code = 1


class Interrupted(MMRecError):
  """A run stopped by a signal after saving; exit code as shells give (128 + signal)."""

  def __init__(self, message, exit_code=130):
    super().__init__(message)
    self.exit_code = exit_code
