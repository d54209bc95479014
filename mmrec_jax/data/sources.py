"""Document readers: the built-in corpus and dataset files.

A document is a `(doc_id, text)` pair. `doc_id` is stable (relative path, plus
`#index` of the block/line/row/record inside a file) and decides the train /
validation split through a hash, so the split of a document never changes
when other documents are added.

Formats (chosen by extension):
  * `.txt`: one document per blank-line-separated block (a line holding only
    whitespace counts as blank); leading/trailing newlines of a block are dropped.
  * `.jsonl`, `.jsonl.gz`, `.json.gz`: one JSON object per line, text in
    `text_field`; blank lines are ignored.
  * `.parquet`: text in column `text_field`; null rows are skipped (counted).
  * `.array_record`: each record is UTF-8 text, or a JSON object holding
    `text_field`.

Invalid UTF-8 is decoded with `errors='replace'` (U+FFFD); the number of
files/records affected is reported as a warning, never an error. Empty
documents are skipped and counted; zero documents in total is a `DataError`.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from mmrec_jax.errors import DataError  # pylint: disable=unused-import (re-exported)

log = logging.getLogger("mmrec_jax.data")

TEXT_EXTS = (".txt",)
JSONL_EXTS = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_EXTS = (".parquet",)
ARRAY_RECORD_EXTS = (".array_record",)
ALL_EXTS = TEXT_EXTS + JSONL_EXTS + PARQUET_EXTS + ARRAY_RECORD_EXTS
STDLIB_EXCLUDE = ("test/", "tests/", "idlelib/test/", "idlelib/idle_test/", "site-packages/")


@dataclasses.dataclass
class ReadReport:
  """Counts of what was read and skipped, for warnings and error messages."""
  files: int = 0
  docs: int = 0
  bytes: int = 0
  bad_utf8: int = 0            # files/records decoded with replacement chars
  empty_docs: int = 0
  empty_files: list = dataclasses.field(default_factory=list)
  unknown_ext: list = dataclasses.field(default_factory=list)

  def warn(self, spec):
    if self.bad_utf8:
      log.warning("%s: %d file(s)/record(s) had invalid UTF-8, decoded with "
                  "U+FFFD replacement characters", spec, self.bad_utf8)
    if self.empty_files:
      log.warning("%s: skipped %d file(s) without documents (e.g. %s)", spec,
                  len(self.empty_files), self.empty_files[0])
    if self.unknown_ext:
      log.warning("%s: skipped %d file(s) with unsupported extensions (e.g. %s); "
                  "supported: %s", spec, len(self.unknown_ext), self.unknown_ext[0],
                  ", ".join(ALL_EXTS))
    if self.empty_docs and spec != "built-in corpus":
      log.warning("%s: skipped %d empty document(s)", spec, self.empty_docs)


def is_val(doc_id, val_fraction):
  """Stable hash split: True if `doc_id` belongs to the validation split."""
  h = hashlib.sha1(doc_id.encode("utf-8")).digest()
  return int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction


def _decode(raw, report):
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    report.bad_utf8 += 1
    return raw.decode("utf-8", errors="replace")


def _ext(path):
  low = path.lower()
  for e in sorted(ALL_EXTS, key=len, reverse=True):
    if low.endswith(e):
      return e
  return os.path.splitext(low)[1]


# ---------------------------------------------------------------- file lists


def stdlib_root():
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(include_tests=False):
  """Sorted `(relative_path, absolute_path)` of the interpreter's stdlib `*.py`."""
  root = stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "site-packages")]
    for f in filenames:
      if not f.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
      if not include_tests and any(("/" + rel).find("/" + x) >= 0 for x in STDLIB_EXCLUDE):
        continue
      out.append((rel, os.path.join(dirpath, f)))
  out.sort()
  return out


def _glob_base(pattern):
  parts = pattern.replace(os.sep, "/").split("/")
  base = []
  for p in parts:
    if glob.has_magic(p):
      break
    base.append(p)
  return "/".join(base) or "."


def expand_path_spec(path_spec):
  """Files of a spec (file, directory, glob; comma-separated) as `(rel, abs)`.

  `rel` (the document-id prefix) is the basename for a file, and the path
  relative to the directory / the glob's fixed prefix otherwise. Files with
  unsupported extensions inside directories/globs are skipped with a warning;
  a named file with an unknown extension is an error.
  """
  out, unknown = [], []
  for spec in [s.strip() for s in path_spec.split(",") if s.strip()]:
    spec = os.path.expanduser(spec)
    if os.path.isfile(spec):
      if _ext(spec) not in ALL_EXTS:
        raise DataError(f"{spec}: unknown extension {_ext(spec)!r}; supported: "
                        f"{', '.join(ALL_EXTS)}")
      out.append((os.path.basename(spec), os.path.abspath(spec)))
      continue
    if os.path.isdir(spec):
      base, found = spec, []
      for dirpath, dirnames, filenames in os.walk(spec):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    elif glob.has_magic(spec):
      base = _glob_base(spec)
      found = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
    else:
      raise DataError(f"data path {spec!r} does not exist; check data.path / data.val_path "
                      "(a file, directory or glob, comma-separated)")
    files = []
    for f in sorted(found):
      (files if _ext(f) in ALL_EXTS else unknown).append(f)
    if not files:
      raise DataError(f"{spec}: no data files found (supported extensions: "
                      f"{', '.join(ALL_EXTS)})")
    out += [(os.path.relpath(f, base).replace(os.sep, "/"), os.path.abspath(f)) for f in files]
  if not out:
    raise DataError(f"data path {path_spec!r} names no files")
  return out, unknown


# ------------------------------------------------------------------- readers


def _read_txt(path, rel, report):
  with open(path, "rb") as f:
    text = _decode(f.read(), report)
  block, i = [], 0
  for line in text.splitlines(keepends=True) + ["\n"]:
    if line.strip():
      block.append(line)
    elif block:
      yield f"{rel}#{i}", "".join(block).strip("\r\n")
      block, i = [], i + 1


def _text_of(obj, field, where):
  if not isinstance(obj, dict) or field not in obj:
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{where}: record has no {field!r} field (has {keys}); set "
                    "data.text_field to the right field")
  text = obj[field]
  if text is None:
    return ""
  if not isinstance(text, str):
    raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string; "
                    "set data.text_field to a text field")
  return text


def _read_jsonl(path, rel, field, report):
  opener = gzip.open if path.lower().endswith(".gz") else open
  lineno = 0
  try:
    with opener(path, "rb") as f:
      for lineno, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        try:
          obj = json.loads(_decode(raw, report))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove "
                          "the line") from None
        yield f"{rel}#{lineno}", _text_of(obj, field, f"{path}:{lineno}")
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{path}: truncated or corrupt gzip after line {lineno} ({e}); "
                    "re-download or re-compress the file") from None


def _read_parquet(path, rel, field, report):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({e})") from None
  names = pf.schema_arrow.names
  if field not in names:
    raise DataError(f"{path}: Parquet file has no column {field!r} (columns: "
                    f"{names[:8]}); set data.text_field")
  row = 0
  try:
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
      for v in batch.column(0).to_pylist():
        if isinstance(v, bytes):
          v = _decode(v, report)
        if v is not None and not isinstance(v, str):
          raise DataError(f"{path}: column {field!r} holds {type(v).__name__}, not text; "
                          "set data.text_field to a string column")
        yield f"{rel}#{row}", v or ""
        row += 1
  except pa.ArrowException as e:
    raise DataError(f"{path}: corrupt Parquet data at row {row} ({e})") from None


def _read_array_record(path, rel, field, report):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from None
  try:
    n = reader.num_records()
    for start in range(0, n, 1024):
      for j, raw in enumerate(reader.read(list(range(start, min(n, start + 1024))))):
        i = start + j
        text = _decode(raw, report)
        if text.lstrip().startswith("{"):
          try:
            obj = json.loads(text)
          except json.JSONDecodeError:
            obj = None
          if isinstance(obj, dict):
            text = _text_of(obj, field, f"{path}: record {i}")
        yield f"{rel}#{i}", text
  finally:
    reader.close()


def _read_file(path, rel, field, report):
  ext = _ext(path)
  if ext in TEXT_EXTS:
    return _read_txt(path, rel, report)
  if ext in JSONL_EXTS:
    return _read_jsonl(path, rel, field, report)
  if ext in PARQUET_EXTS:
    return _read_parquet(path, rel, field, report)
  if ext in ARRAY_RECORD_EXTS:
    return _read_array_record(path, rel, field, report)
  raise DataError(f"{path}: unknown extension {ext!r}; supported: {', '.join(ALL_EXTS)}")


def _read_stdlib_file(path, rel, report):
  with open(path, "rb") as f:
    yield rel, _decode(f.read(), report)


def list_files(path_spec, include_tests=False):
  """`(rel, abs)` of the files behind a spec; empty spec: the built-in corpus."""
  if not path_spec:
    return stdlib_files(include_tests), []
  return expand_path_spec(path_spec)


def read_documents(path_spec, text_field="text", *, max_bytes=0, include_tests=False,
                   report=None):
  """Yields `(doc_id, text)` of every non-empty document, in a fixed order.

  Args:
    path_spec: file, directory or glob (comma-separated); empty for the
      built-in corpus (the running interpreter's stdlib sources).
    text_field: JSONL field / Parquet column / ArrayRecord JSON field.
    max_bytes: stop after this many UTF-8 bytes of text (0: no limit).
    include_tests: built-in corpus only: include the stdlib test files.
    report: optional `ReadReport` filled with counts.
  Raises:
    DataError: bad input (missing path, broken line, ...) or zero documents.
  """
  report = ReadReport() if report is None else report
  spec_name = path_spec or "built-in corpus"
  files, report.unknown_ext = list_files(path_spec, include_tests)
  for rel, path in files:
    report.files += 1
    docs_before = report.docs
    if path_spec:
      it = _read_file(path, rel, text_field, report)
    else:
      it = _read_stdlib_file(path, rel, report)
    for doc_id, text in it:
      if not text.strip():
        report.empty_docs += 1
        continue
      report.docs += 1
      report.bytes += len(text.encode("utf-8"))
      yield doc_id, text
      if max_bytes and report.bytes >= max_bytes:
        break
    if report.docs == docs_before and path_spec:
      report.empty_files.append(path)
    if max_bytes and report.bytes >= max_bytes:
      break
  report.warn(spec_name)
  if report.docs == 0:
    raise DataError(f"{spec_name}: zero documents after reading {report.files} file(s) "
                    f"(e.g. {files[0][1]}); the files are empty or hold only blank text")


def split_documents(d, split, max_bytes=0):
  """`(doc_id, text)` of one split ('train' or 'val') of config section `d`.

  With `d.val_path` the validation set is that path and training uses all of
  `d.path`; otherwise documents are split by `is_val(doc_id, d.val_fraction)`.
  `max_bytes` (0: none) caps the text yielded, on top of `d.max_bytes`.
  """
  if d.val_path:
    docs = read_documents(d.val_path if split == "val" else d.path, d.text_field,
                          max_bytes=d.max_bytes, include_tests=d.include_tests)
  else:
    docs = (x for x in read_documents(d.path, d.text_field, max_bytes=d.max_bytes,
                                      include_tests=d.include_tests)
            if is_val(x[0], d.val_fraction) == (split == "val"))
  total = 0
  for doc_id, text in docs:
    yield doc_id, text
    total += len(text)
    if max_bytes and total >= max_bytes:
      return
