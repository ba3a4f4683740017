"""The one rule every command follows before it writes: never remove or overwrite what it did not
create.

A command's output directory carries a marker file (`MARKER`, JSON with the command's name and
the package version) written by that command. Then:
- a missing or empty output directory is used;
- an existing, non-empty directory is refused unless its marker names the SAME command and
  `--overwrite` is given (a directory without a marker may hold anything the user cares about);
- an output equal to, inside or containing a protected path (the run's workdir, the input
  cohort, ...) is refused, on resolved real paths (symlinks, `..`, relative paths);
- the replacement is a staged swap (`staged_directory`): everything is written into a staging
  directory beside the output and renamed over it only when complete; the only directory ever
  removed is a previous output carrying the same command's marker (checked again at swap time).

A kill at any moment leaves the previous output or nothing at the output path, never a mix;
the leftovers (a hidden `.NAME.staging-*` or `.NAME.old-*` beside it, each with the marker)
are removed by the next staged write of the same output.

`check_output_dir` is what a command calls before any work; `staged_directory` what it writes
through. `train` workdirs use the same marker (`write_marker`, `read_marker`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

from u2ad_jax import errors
from u2ad_jax import io_utils

MARKER = ".u2ad-output.json"
PathLike = str | os.PathLike


def _version() -> str:
  from u2ad_jax import __version__  # pylint: disable=g-import-not-at-top
  return __version__


def read_marker(directory: PathLike) -> dict[str, Any] | None:
  """The marker of `directory` ({'command': ..., 'version': ...}), or None when it has none or
  it is not a marker this package wrote (unreadable, not JSON, no command)."""
  path = os.path.join(os.fspath(directory), MARKER)
  try:
    with open(path, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
    return None
  return marker


def write_marker(directory: PathLike, command: str, **extra: Any) -> None:
  """Marks `directory` as an output of `u2ad <command>` (atomically)."""
  io_utils.write_json(os.path.join(os.fspath(directory), MARKER),
                      {"command": command, "version": _version(), **extra})


def _is_empty_dir(path: str) -> bool:
  with os.scandir(path) as entries:
    return next(entries, None) is None


def _relation(out: str, other: str) -> str | None:
  """How resolved `out` relates to resolved `other`: 'is', 'is inside', 'contains' or None."""
  if out == other:
    return "is"
  if os.path.commonpath([out, other]) == other:
    return "is inside"
  if os.path.commonpath([out, other]) == out:
    return "contains"
  return None


def check_output_dir(path: PathLike, command: str, *, overwrite: bool = False,
                     protected: Mapping[str, PathLike | None] | None = None,
                     flag: str = "--out") -> str:
  """Checks that `u2ad <command>` may write `path`; returns its absolute path. Writes nothing.

  Args:
    path: the output directory.
    command: the command's name (what its marker records).
    overwrite: the user's `--overwrite`: a previous output of the same command may be replaced.
    protected: {what: path} that the output must neither be, nor lie inside, nor contain, e.g.
      {"--workdir": run, "--data": cohort}; None values are skipped.
    flag: how the output is named in messages.

  Raises:
    UsageError: the output is, is inside or contains a protected path.
    InputError: the output exists and is not a directory, or is not empty and is not a previous
      output of `command` (or is one, without `overwrite`).
  """
  out = os.path.abspath(os.fspath(path))
  real = os.path.realpath(out)
  for what, other in (protected or {}).items():
    if other is None or os.fspath(other) == "":
      continue
    relation = _relation(real, os.path.realpath(os.fspath(other)))
    if relation is not None:
      raise errors.UsageError(f"{flag} {out} {relation} {what} {os.fspath(other)}; "
                              "choose an output directory of its own")
  if os.path.lexists(out) and not os.path.isdir(out):
    raise errors.InputError(out, "exists and is not a directory")
  if not os.path.isdir(out) or _is_empty_dir(out):
    return out
  marker = read_marker(out)
  if marker is None:
    raise errors.InputError(out, f"exists, is not empty and is not an output of `u2ad {command}` "
                                 f"(no {MARKER}); nothing was changed, choose another {flag}")
  if marker["command"] != command:
    raise errors.InputError(out, f"is an output of `u2ad {marker['command']}`, not of "
                                 f"`u2ad {command}`; nothing was changed, choose another {flag}")
  if not overwrite:
    raise errors.InputError(out, f"holds a previous `u2ad {command}` output; pass --overwrite "
                                 "to replace it")
  return out


def _remove_own_leftovers(parent: str, base: str, command: str) -> None:
  """Removes `.BASE.staging-*` / `.BASE.old-*` directories of an interrupted earlier swap of
  the same output, only when they carry `command`'s marker and their process is gone."""
  for name in os.listdir(parent):
    if not (name.startswith(f".{base}.staging-") or name.startswith(f".{base}.old-")):
      continue
    leftover = os.path.join(parent, name)
    marker = read_marker(leftover) if os.path.isdir(leftover) else None
    if marker is None or marker.get("command") != command:
      continue
    pid = marker.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
      continue  # another process is writing this output right now
    _remove_marked_tree(leftover)


def _remove_marked_tree(path: str) -> None:
  """Deletes a marked directory with its marker LAST: a removal killed half-way leaves a
  directory that still carries the marker, so the next run recognises and removes it."""
  for name in os.listdir(path):
    if name != MARKER:
      entry = os.path.join(path, name)
      if os.path.isdir(entry) and not os.path.islink(entry):
        shutil.rmtree(entry, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(entry)
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(path, MARKER))
  shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def staged_directory(out_dir: PathLike, command: str) -> Iterator[str]:
  """Yields an empty staging directory beside `out_dir` (already holding `command`'s marker);
  on normal exit it replaces `out_dir`.

  The directory replaced must be missing, empty, or a previous output of `command` (marker
  checked again here, at swap time); anything else raises InputError and is left untouched.
  On an exception the staging directory is removed and `out_dir` is untouched.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent, base = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  _remove_own_leftovers(parent, base, command)
  # Refuse before any work is staged (the caller normally checked already, with --overwrite).
  _check_replaceable(out_dir, command)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{base}.staging-")
  try:
    # The marker first: an interrupted staging directory is then recognisably ours.
    write_marker(staging, command, pid=os.getpid())
    yield staging
    write_marker(staging, command)
    _check_replaceable(out_dir, command)
    old = None
    if os.path.isdir(out_dir):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-")
      os.rmdir(old)
      os.replace(out_dir, old)
    os.replace(staging, out_dir)
  except BaseException:
    _remove_marked_tree(staging)
    raise
  if old is not None:
    _remove_marked_tree(old)


def _check_replaceable(out_dir: str, command: str) -> None:
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise errors.InputError(out_dir, "exists and is not a directory")
  if os.path.isdir(out_dir) and not _is_empty_dir(out_dir):
    marker = read_marker(out_dir)
    if marker is None or marker["command"] != command:
      raise errors.InputError(out_dir, f"is not a previous output of `u2ad {command}`; it is "
                                       "left untouched")
