"""Atomic file writes, and what a path is (a local path or a URI).

A reader (another process, a resumed run, a viewer) must never see a half-written file: every
writer here writes a temporary file in the destination's own directory (same file system, so
`os.replace` is an atomic rename) and renames it over the destination only when it is complete.
An interrupted write leaves the previous file (or nothing) in place and removes its temporary.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
from typing import Any, Iterable, Iterator, Sequence

PathLike = str | os.PathLike

# 'scheme://...': a URI (gs, s3, az, hf, ...); anything else is a local path.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: PathLike) -> bool:
  """True for a URI (`gs://bucket/run`), False for a local path. A URI is never given to os.path
  (which would read `gs://bucket/run` as a local folder `gs:`)."""
  return bool(_URI.match(os.fspath(path)))


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path`; on normal exit it is renamed onto `path`.

  For writers that insist on a filename (e.g. a library's `save(filename)`). `suffix` is
  appended to the temporary name for writers that pick a format from the extension. On an
  exception the temporary is removed and `path` is left untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Created with O_EXCL like mkstemp, but with mode 0o666 so the umask applies and the final
  # file gets the usual permissions (mkstemp's 0o600 would make outputs private).
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp{suffix}")
  os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def naming(path: PathLike) -> Iterator[None]:
  """Re-raises an OSError without a file name (write() and fsync() report a full disk without
  one) with `path`, so that its message says which file could not be written."""
  try:
    yield
  except OSError as e:
    if e.filename is None and e.errno is not None:
      raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    raise


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (flushed and fsynced before the rename); an OSError names
  `path`."""
  with naming(path), atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
  """Writes `text` to `path` atomically."""
  write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> None:
  """Writes `obj` as JSON (UTF-8, trailing newline) atomically.

  NumPy scalars and arrays are converted to Python numbers and lists, so metric dicts can be
  written as they come.
  """
  text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default)
  write_text(path, text + "\n")


def write_csv(path: PathLike, rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None,
              delimiter: str = ",") -> None:
  """Writes rows (and an optional header) as CSV, or TSV with `delimiter="\\t"`, atomically."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
  if header is not None:
    writer.writerow(header)
  for row in rows:
    writer.writerow(row)
  write_text(path, buffer.getvalue())


def _json_default(value: Any) -> Any:
  # Imported lazily: io_utils is used by light-weight code paths too.
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")
