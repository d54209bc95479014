"""Workdir safety: one run per workdir, one guard for deletions, one atomic write.

  with workdir.lock("runs/tiny"):      # WorkdirBusyError if another process holds it
    ...
  workdir.guard_replace("exported/tiny")   # UsageError unless it is safe to replace
  workdir.atomic_write_json("runs/tiny/summary.json", {...})

The lock is `fcntl.flock` on `workdir/.lock` (released by the kernel when the
holder dies, so a dead run never blocks); the file names the holder (pid, host,
command line) for the message. Where the filesystem has no flock, the pid in the
file decides (a dead pid on this host is stale and taken over).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile

from mmrec_jax.errors import UsageError, WorkdirBusyError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
EXPORT_FILES = frozenset({"model.safetensors", "config.json", "tokenizer.json"})
ORBAX_MARKERS = frozenset({"_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt",
                           "commit_success.txt"})
MAX_WALK = 20000   # entries looked at below a target before refusing as too big to check


# ----------------------------------------------------------------------------- lock


def _holder_info():
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "cmd": " ".join([os.path.basename(sys.executable)] + _argv())}


def _argv():
  argv = list(sys.argv)
  if argv and argv[0].endswith(".py") and os.sep + "mmrec_jax" + os.sep in argv[0]:
    argv[0] = "-m mmrec_jax." + os.path.splitext(os.path.basename(argv[0]))[0]
  return argv


def _read_holder(fd):
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 65536).decode("utf-8", "replace"))
  except (OSError, ValueError):
    return {}


def _pid_alive(pid):
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True  # exists but not ours, or unreadable: assume alive
  return True


def _busy(workdir, holder):
  cmd = holder.get("cmd") or "unknown command"
  if len(cmd) > 120:
    cmd = cmd[:117] + "..."
  host = holder.get("host")
  where = "" if not host or host == socket.gethostname() else f" on host {host}"
  return WorkdirBusyError(
      f"workdir {workdir} is in use by process {holder.get('pid', '?')}{where} ({cmd}); "
      "wait for it or pass another --workdir")


def _open_lock_file(workdir):
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir={workdir} is a file, not a folder; pass a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
    return os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UsageError(f"cannot write to workdir {workdir} ({e.strerror or e}); pass a "
                     "writable --workdir") from None


def _write_holder(fd):
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(_holder_info()) + "\n").encode())
  os.fsync(fd)


@contextlib.contextmanager
def lock(workdir, enabled=True):
  """Holds an exclusive lock on `workdir` (created if missing) for the `with` body.

  Raises WorkdirBusyError at once (one line naming the holder's pid and command)
  if another live process holds it; UsageError if the workdir is a file or not
  writable. `enabled=False` is a no-op (e.g. on processes other than 0).
  """
  if not enabled:
    yield
    return
  workdir = os.fspath(workdir)
  fd = _open_lock_file(workdir)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise _busy(workdir, _read_holder(fd)) from None
      # No flock on this filesystem: the pid in the file decides.
      holder = _read_holder(fd)
      pid = holder.get("pid")
      same_host = holder.get("host") in (None, socket.gethostname())
      if pid and pid != os.getpid() and (not same_host or _pid_alive(pid)):
        raise _busy(workdir, holder) from None
    _write_holder(fd)
    try:
      yield
    finally:
      try:
        os.ftruncate(fd, 0)   # the file stays (removing it races with a new locker)
      except OSError:
        pass
  finally:
    os.close(fd)   # releases the flock


# ----------------------------------------------------------------------------- guard


def is_workdir(path):
  """A training workdir: config.json plus checkpoints/ or a .lock file."""
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and (os.path.isdir(os.path.join(path, CHECKPOINTS))
               or os.path.exists(os.path.join(path, LOCK_FILE))))


def is_checkpoint_dir(path):
  """An Orbax checkpoint folder: a step, or an item of a step (by Orbax's marker files)."""
  try:
    names = set(os.listdir(path))
  except OSError:
    return False
  return bool(names & ORBAX_MARKERS)


def _is_within(path, root):
  """True if `path` is `root` or lies below it (both real, absolute)."""
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def guard_replace(target, *, kind="export", flag="--out"):
  """Raises UsageError (one line) unless the folder `target` may be deleted/replaced.

  Only a previous `kind` (an export: model.safetensors, config.json,
  tokenizer.json and nothing else) may be replaced. Refused: a target that is,
  contains or lies inside a training workdir or a checkpoint folder; the current
  directory, the home directory, `/` or a folder above them; a file; a folder
  holding anything an export does not write. A missing target is fine.
  """
  path = os.path.realpath(os.fspath(target))
  shown = os.fspath(target)

  def refuse(why):
    raise UsageError(f"refusing to replace {flag}={shown}: {why}; pass a new or empty "
                     f"folder for {flag} (only a previous {kind} is ever replaced)")

  if not os.path.lexists(target):
    return
  for name, special in (("/", "/"), ("your home directory", os.path.expanduser("~")),
                        ("the current directory", os.getcwd())):
    special = os.path.realpath(special)
    if _is_within(special, path):
      refuse(f"it is {name}" if special == path else f"it contains {name}")
  if not os.path.isdir(path):
    refuse("it is a file, not a folder")
  parent = path
  while True:
    if is_workdir(parent):
      refuse("it is a training workdir" if parent == path
             else f"it lies inside the training workdir {parent}")
    if is_checkpoint_dir(parent):
      refuse("it is a checkpoint folder" if parent == path
             else f"it lies inside the checkpoint folder {parent}")
    up = os.path.dirname(parent)
    if up == parent:
      break
    parent = up
  seen = 0
  for root, dirs, files in os.walk(path):
    seen += len(dirs) + len(files)
    if seen > MAX_WALK:
      refuse(f"it holds more than {MAX_WALK} files and folders")
    if root != path and is_workdir(root):
      refuse(f"it contains the training workdir {root}")
    if root != path and is_checkpoint_dir(root):
      refuse(f"it contains the checkpoint folder {root}")
  foreign = sorted(set(os.listdir(path)) - EXPORT_FILES)
  if foreign:
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    refuse(f"it holds {foreign[0]!r}{more}, which an {kind} does not write")


# ----------------------------------------------------------------------------- atomic write


@contextlib.contextmanager
def atomic_open(path):
  """A binary file to write whose content appears at `path` only when the `with`
  body ends without an error (temp file in the same folder + fsync + os.replace);
  the one atomic-write mechanism of the project."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_write(path, data):
  """Writes `data` (str or bytes) to `path` atomically (see `atomic_open`)."""
  with atomic_open(path) as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_json(path, obj, **kw):
  """`atomic_write` of `json.dumps(obj, indent=2, sort_keys=True, **kw)` + newline."""
  kw = {"indent": 2, "sort_keys": True, **kw}
  atomic_write(path, json.dumps(obj, **kw) + "\n")
