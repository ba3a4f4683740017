"""The one rule every command follows before it writes: never remove or overwrite what it did not
create.

The marker. A command's output directory carries a marker file (`MARKER`, JSON) written by that
command: the command's name, the package version, the directory it was written in (its real
path, device and inode) and, for an output replaced as a whole, the list of every file and
folder the command wrote there (`written`). A marker counts only in the directory it was written
in: copied into another folder, it proves nothing, and that folder is the user's.

The rule, checked before any work (`check_output_dir`):
- a missing or empty output directory is used;
- an existing, non-empty directory is refused unless it is this command's own: its marker names
  the SAME command and was written there, and it holds nothing the marker does not list (a file a
  user added inside a previous output makes `--overwrite` refuse, naming it); then `--overwrite`
  is still needed to replace it;
- an output equal to, inside or containing a protected path (the run's workdir, the input
  cohort, ...) is refused, on resolved real paths (symlinks, `..`, relative paths); a URI
  (`gs://...`) is never a local path and cannot collide;
- an output replaced as a whole may not be or contain the current directory (`--out .`): the
  swap would leave the shell in a deleted folder;
- a symlink given as the output is followed: the directory it points to is replaced and the link
  stays as it was.

The replacement is a staged swap (`staged_directory`): everything is written into a staging
directory beside the output (beside the link's target for a symlink), which is renamed over it
only when complete. The previous output is set aside, the new one moved in, and the previous one
then deleted entry by listed entry, its marker last: only what the command wrote is ever deleted.

A kill at any moment leaves the previous output or the new one at the output path (never a mix),
and possibly a hidden leftover beside it, which the next check or write of the same output
resolves: a `.NAME.staging-*` (a killed write) is removed; a `.NAME.old-*` is removed when the
output is there (a kill while the previous output was being deleted) and MOVED BACK when the
output is missing (a kill between setting the previous output aside and moving the new one in).

Outputs written into rather than swapped (`u2ad demo`, `ablate`, `study`: `swapped=False`) keep
what they hold; only their staged sub-outputs (evaluations, cohorts) are replaced, and those are
checked up front too. `train` workdirs use the same marker (`write_marker`, `read_marker`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator, Mapping

from u2ad_jax import errors
from u2ad_jax import io_utils

MARKER = ".u2ad-output.json"
PathLike = str | os.PathLike


def _version() -> str:
  from u2ad_jax import __version__  # pylint: disable=g-import-not-at-top
  return __version__


# ------------------------------------------------------------------------------ the marker


def read_marker(directory: PathLike) -> dict[str, Any] | None:
  """The marker of `directory` ({'command': ..., 'version': ..., ...}), or None when it has none
  or it is not a marker this package wrote (unreadable, not JSON, no command)."""
  path = os.path.join(os.fspath(directory), MARKER)
  try:
    with open(path, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
    return None
  return marker


def _identity(path: str) -> list[int]:
  """[device, inode] of `path` (kept by a rename on the same file system, new for a copy)."""
  stat = os.stat(path)
  return [int(stat.st_dev), int(stat.st_ino)]


def _write(directory: str, command: str, at: str | None = None, **extra: Any) -> None:
  """Writes the marker into `directory`, tied to it (`at`: the real path the directory will have,
  for a staging directory that is renamed into place)."""
  io_utils.write_json(os.path.join(directory, MARKER), {
      "command": command, "version": _version(),
      "directory": at or os.path.realpath(directory), "inode": _identity(directory), **extra})


def write_marker(directory: PathLike, command: str, **extra: Any) -> None:
  """Marks `directory` as an output of `u2ad <command>` (atomically), tied to this directory: a
  copy of the marker in another folder counts for nothing. `extra` fields are recorded too."""
  _write(os.fspath(directory), command, **extra)


def _written_here(directory: str, marker: Mapping[str, Any]) -> bool:
  """Whether `marker` was written in `directory`: its recorded real path, or its device and
  inode (an output moved on the same file system keeps them; a copy gets new ones)."""
  if marker.get("directory") == os.path.realpath(directory):
    return True
  try:
    return marker.get("inode") == _identity(directory)
  except OSError:
    return False


def _listing(directory: str) -> list[str]:
  """Every file and folder under `directory` (relative '/'-paths), its top-level marker aside."""
  entries = []
  for root, dirs, files in os.walk(directory):
    rel_root = os.path.relpath(root, directory)
    for name in dirs + files:
      rel = name if rel_root == "." else f"{rel_root}/{name}"
      if rel != MARKER:
        entries.append(rel)
  return sorted(entries)


def _unlisted(directory: str, written: list[str]) -> str | None:
  """The first entry under `directory` that `written` does not list (relative path), or None."""
  listed = set(written)
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    rel_root = os.path.relpath(root, directory)
    for name in dirs + sorted(files):
      rel = name if rel_root == "." else f"{rel_root}/{name}"
      if rel != MARKER and rel not in listed:
        return rel
  return None


def _not_ours(directory: str, command: str, swapped: bool) -> str | None:
  """Why the existing, non-empty `directory` may not be replaced (`swapped`) or written into as
  `command`'s previous output (a predicate of the folder: "exists, ...", "holds ..."), or None
  when it may."""
  marker = read_marker(directory)
  if marker is None:
    return f"exists, is not empty and is not an output of `u2ad {command}` (no {MARKER})"
  if marker["command"] != command:
    return f"is an output of `u2ad {marker['command']}`, not of `u2ad {command}`"
  if marker.get("directory") is None and marker.get("inode") is None:
    return (f"holds a {MARKER} of an earlier u2ad that does not record where it was written, so "
            "it cannot show the folder is its own (remove the folder yourself to replace it)")
  if not _written_here(directory, marker):
    return f"holds a {MARKER} written in {marker.get('directory')}, not here (a copy)"
  if swapped:
    written = marker.get("written")
    if not isinstance(written, list):
      return (f"has a {MARKER} that does not list what `u2ad {command}` wrote there, so nothing "
              "in it may be deleted")
    extra = _unlisted(directory, written)
    if extra is not None:
      return (f"holds {extra}, which `u2ad {command}` did not write (move it out to replace "
              "the output)")
  return None


def _nested_not_ours(directory: str) -> str | None:
  """In an output that is written into (not swapped): the first marked sub-output that may not
  be replaced (a staged one: an evaluation or a cohort inside a demo) or written into (an ablate
  inside a study), or None. Training runs are resumed, never replaced: not looked into."""
  for root, dirs, _ in os.walk(directory):
    dirs.sort()
    descend = []
    for name in dirs:
      sub = os.path.join(root, name)
      marker = None if os.path.islink(sub) else read_marker(sub)
      if marker is None:
        descend.append(name)
        continue
      if marker["command"] == "train":
        continue
      swapped = "written" in marker
      problem = _not_ours(sub, marker["command"], swapped=swapped)
      if problem is not None:
        return f"{os.path.relpath(sub, directory)} {problem}"
      if not swapped:
        descend.append(name)  # its own staged sub-outputs are replaced too
    dirs[:] = descend
  return None


# ------------------------------------------------------------------------------ the checks


def _relation(out: str, other: str) -> str | None:
  """How resolved `out` relates to resolved `other`: 'is', 'is inside', 'contains' or None."""
  if out == other:
    return "is"
  if os.path.commonpath([out, other]) == other:
    return "is inside"
  if os.path.commonpath([out, other]) == out:
    return "contains"
  return None


def _is_empty_dir(path: str) -> bool:
  with os.scandir(path) as entries:
    return next(entries, None) is None


def check_protected(path: PathLike, protected: Mapping[str, PathLike | None] | None,
                    flag: str = "--out") -> None:
  """UsageError when the output `path` is, lies inside or contains a protected path ({what:
  path}; None, empty and URI values are skipped), on resolved real paths."""
  out = os.path.abspath(os.fspath(path))
  real = os.path.realpath(out)
  for what, other in (protected or {}).items():
    if other is None or os.fspath(other) == "" or io_utils.is_uri(other):
      continue  # a URI (gs://bucket/run) is not on this file system
    relation = _relation(real, os.path.realpath(os.fspath(other)))
    if relation is not None:
      raise errors.UsageError(f"{flag} {out} {relation} {what} {os.fspath(other)}; "
                              "choose an output directory of its own")


def _refuse_current_directory(out: str, real: str, flag: str) -> None:
  """UsageError when the output replaced as a whole is or contains the current directory."""
  try:
    cwd = os.path.realpath(os.getcwd())
  except FileNotFoundError:
    return  # the current directory is already gone: nothing to pull out from under anyone
  relation = _relation(real, cwd)
  if relation == "is":
    raise errors.UsageError(
        f"{flag} {out} is the current directory: the output is replaced as a whole, which would "
        f"leave this shell in a deleted folder; run from its parent with {flag} "
        f"{os.path.basename(real)}")
  if relation == "contains":
    raise errors.UsageError(
        f"{flag} {out} contains the current directory {cwd}: the output is replaced as a whole, "
        "which would leave this shell in a deleted folder; run from outside it")


def check_output_dir(path: PathLike, command: str, *, overwrite: bool = False,
                     protected: Mapping[str, PathLike | None] | None = None,
                     flag: str = "--out", swapped: bool = True) -> str:
  """Checks that `u2ad <command>` may write `path`; returns its absolute path (a symlink is
  kept as given: it is followed when written). Writes nothing, except that it puts back a
  previous output an interrupted swap had set aside (see the module docstring).

  Args:
    path: the output directory.
    command: the command's name (what its marker records).
    overwrite: the user's `--overwrite`: a previous output of the same command may be replaced
      (swapped) or written into again (not swapped).
    protected: {what: path} that the output must neither be, nor lie inside, nor contain, e.g.
      {"--workdir": run, "--data": cohort}; None values and URIs are skipped.
    flag: how the output is named in messages.
    swapped: the command replaces the directory as a whole (`staged_directory`); False for the
      commands that write into it (demo, ablate, study).

  Raises:
    UsageError: the output is, is inside or contains a protected path, or (swapped) is or
      contains the current directory.
    InputError: the output exists and is not a directory, or is not empty and is not wholly a
      previous output of `command` (or is one, without `overwrite`).
  """
  out = os.path.abspath(os.fspath(path))
  check_protected(out, protected, flag)
  real = os.path.realpath(out)
  if swapped:
    _refuse_current_directory(out, real, flag)
    _restore_set_aside(real, command)
  if os.path.lexists(real) and not os.path.isdir(real):
    raise errors.InputError(out, "exists and is not a directory")
  if not os.path.isdir(real) or _is_empty_dir(real):
    return out
  problem = _not_ours(real, command, swapped)
  if problem is None and not swapped:
    problem = _nested_not_ours(real)
  if problem is not None:
    raise errors.InputError(out, f"{problem}; nothing was changed, choose another {flag}")
  if not overwrite:
    raise errors.InputError(out, f"holds a previous `u2ad {command}` output; pass --overwrite "
                                 "to replace it")
  return out


# ------------------------------------------------------------------------------ the staged swap


@contextlib.contextmanager
def staged_directory(out_dir: PathLike, command: str) -> Iterator[str]:
  """Yields an empty staging directory beside `out_dir` (already holding `command`'s marker);
  on normal exit it replaces `out_dir`.

  The directory replaced must be missing, empty, or wholly a previous output of `command`
  (checked again here, at swap time); anything else raises InputError and is left untouched. A
  symlink `out_dir` is followed: its target is replaced, the link kept. On an exception the
  staging directory is removed and `out_dir` is as it was.
  """
  out = os.path.abspath(os.fspath(out_dir))
  real = os.path.realpath(out)
  parent, base = os.path.split(real)
  _refuse_current_directory(out, real, "the output")
  os.makedirs(parent, exist_ok=True)
  _restore_set_aside(real, command)
  _remove_own_leftovers(parent, base, command)
  # Refuse before any work is staged (the caller normally checked already, with --overwrite).
  _check_replaceable(out, real, command)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{base}.staging-")
  old = None
  try:
    # The marker first: an interrupted staging directory is then recognisably ours.
    _write(staging, command, at=real, pid=os.getpid())
    yield staging
    _write(staging, command, at=real, written=_listing(staging))
    _check_replaceable(out, real, command)
    if os.path.isdir(real) and not _is_empty_dir(real):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-")
      os.rmdir(old)
      os.replace(real, old)
    try:
      # A missing or empty directory is replaced by this one rename.
      os.replace(staging, real)
    except BaseException:
      if old is not None:
        os.replace(old, real)
        old = None
      raise
  except BaseException:
    _remove_marked_tree(staging)
    raise
  if old is not None:
    _remove_output(old)


def remove_output(path: PathLike, command: str) -> None:
  """Deletes `path`, a whole output of `u2ad <command>` written there (a staged one: its marker
  lists what it wrote), entry by listed entry and its marker last, as a swap deletes the output
  it replaces. Anything else is refused and left untouched.

  Raises:
    InputError: `path` is not wholly such an output (not marked, another command's, a copy, or
      holding a file the command did not write).
  """
  out = os.path.abspath(os.fspath(path))
  real = os.path.realpath(out)
  problem = _not_ours(real, command, swapped=True)
  if problem is not None:
    raise errors.InputError(out, f"is not an output of `u2ad {command}` that may be removed: it "
                                 f"{problem}; it is left untouched")
  _remove_output(real)


def _check_replaceable(out: str, real: str, command: str) -> None:
  if os.path.lexists(real) and not os.path.isdir(real):
    raise errors.InputError(out, "exists and is not a directory")
  if os.path.isdir(real) and not _is_empty_dir(real):
    problem = _not_ours(real, command, swapped=True)
    if problem is not None:
      raise errors.InputError(out, f"is not a previous output of `u2ad {command}`: it {problem}; "
                                   "it is left untouched")


def _restore_set_aside(real: str, command: str) -> None:
  """When nothing is at `real`, moves back the previous output of `command` that an interrupted
  swap set aside there (`.BASE.old-*` recorded for `real`, not half deleted)."""
  if os.path.lexists(real):
    return
  parent, base = os.path.split(real)
  try:
    names = os.listdir(parent)
  except OSError:
    return
  candidates = []
  for name in names:
    path = os.path.join(parent, name)
    if not name.startswith(f".{base}.old-") or os.path.islink(path) or not os.path.isdir(path):
      continue
    marker = read_marker(path)
    if (marker is not None and marker["command"] == command and not marker.get("removing")
        and marker.get("directory") == real and isinstance(marker.get("written"), list)):
      candidates.append((os.stat(path).st_ctime, path))  # a rename sets ctime: newest aside
  if candidates:
    _, newest = max(candidates)
    os.replace(newest, real)
    print(f"[u2ad] {real}: put back the previous `u2ad {command}` output that an interrupted run "
          "had set aside", file=sys.stderr, flush=True)


def _remove_own_leftovers(parent: str, base: str, command: str) -> None:
  """Removes `.BASE.staging-*` / `.BASE.old-*` directories of an interrupted earlier swap of
  the same output, only when they carry `command`'s marker and their process is gone."""
  for name in os.listdir(parent):
    staging = name.startswith(f".{base}.staging-")
    if not (staging or name.startswith(f".{base}.old-")):
      continue
    leftover = os.path.join(parent, name)
    if os.path.islink(leftover) or not os.path.isdir(leftover):
      continue
    marker = read_marker(leftover)
    if marker is None or marker.get("command") != command:
      continue
    pid = marker.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
      continue  # another process is writing this output right now
    if staging:
      _remove_marked_tree(leftover)  # a folder this package created and filled, wholly its own
    elif isinstance(marker.get("written"), list):
      _remove_output(leftover)


def _remove_marked_tree(path: str) -> None:
  """Deletes a staging directory (created and filled by this package alone) with its marker
  LAST: a removal killed half-way leaves a directory that still carries the marker, so the next
  run recognises and removes it."""
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


def _remove_output(path: str) -> None:
  """Deletes a previous output set aside by a swap: only the entries its marker lists (deepest
  first), the marker last. The marker is first flagged `removing`, so a half-deleted output is
  never moved back; anything else found there (which the checks refuse) is kept."""
  marker = read_marker(path)
  if marker is None or not isinstance(marker.get("written"), list):
    return
  io_utils.write_json(os.path.join(path, MARKER), {**marker, "removing": True})
  for rel in sorted(marker["written"], key=lambda r: r.count("/"), reverse=True):
    entry = os.path.join(path, *rel.split("/"))
    if os.path.isdir(entry) and not os.path.islink(entry):
      with contextlib.suppress(OSError):  # not empty: it holds something not listed
        os.rmdir(entry)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(entry)
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(path, MARKER))
  try:
    os.rmdir(path)
  except OSError:
    print(f"[u2ad] kept {path}: it holds files the command did not write",
          file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
