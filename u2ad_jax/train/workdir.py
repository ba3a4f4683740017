"""Which directories `u2ad train` may use as its workdir.

Training writes config.json, checkpoints/, metrics.jsonl and figures into the workdir and, on a
resume, rewrites them. It must never do that in a folder that holds someone else's files, so:

  missing or empty          a new run (created only once every input has been checked);
  holds a u2ad training run a resume (the `output_guard` marker naming `train`, or the
                            config.json an earlier version of `u2ad train` wrote, with
                            checkpoints/ or nothing else);
  anything else             refused with one line, nothing touched.

`check_train_workdir` is the one rule; the marker is the one every command writes
(`u2ad_jax/output_guard.py`), so an evaluation or a demo folder is never taken for a run.

Workdirs as URIs. A workdir may be anything etils epath / Orbax accept: a local path or a URI
(`gs://bucket/run`, `s3://...`). `resolve` makes a local path absolute and leaves a URI exactly as
given (os.path would turn `gs://bucket/run` into a local folder `gs:`); every file of the workdir
is then reached through `path` (an `epath.Path`). The marker checks above are for local paths
only: on object storage a "directory" is a key prefix shared by whoever writes there, so for a
URI they are skipped (`check_train_workdir` says it resumes when a recorded config.json is there)
and choosing a fresh prefix is the user's part; the marker is still written.
"""

from __future__ import annotations

import json
import os

from etils import epath

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import output_guard

# True for a URI workdir (`gs://bucket/run`), False for a local path.
is_uri = io_utils.is_uri


def resolve(workdir: str | os.PathLike) -> str:
  """The workdir as used and recorded everywhere: a URI exactly as given, a local path made
  absolute (the one place a workdir is made absolute: nothing else may touch it with os.path)."""
  text = os.fspath(workdir)
  if is_uri(text):
    return text
  return os.path.abspath(text)


def same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
  """Whether two workdirs are the same run: URIs as given, local paths by their real path
  (symlinks and `..` resolved)."""
  a, b = resolve(a), resolve(b)
  if is_uri(a) or is_uri(b):
    return a.rstrip("/") == b.rstrip("/")
  return os.path.realpath(a) == os.path.realpath(b)


def name(workdir: str | os.PathLike) -> str:
  """The run's folder name (`run` of `gs://bucket/run/` or of `runs/run`)."""
  return resolve(workdir).rstrip("/").rsplit("/", 1)[-1]


def path(workdir: str | os.PathLike, *parts: str) -> epath.Path:
  """`epath.Path` of `workdir / parts` (a URI keeps its scheme, a local path its meaning)."""
  return epath.Path(resolve(workdir)).joinpath(*parts)


def join(workdir: str | os.PathLike, *parts: str) -> str:
  """`path(...)` as a string (for Orbax, messages and records)."""
  return os.fspath(path(workdir, *parts))

COMMAND = "train"  # what the marker of a training workdir names
# What a run written before the marker existed may hold (config.json identifies it).
_RUN_ENTRIES = {"config.json", "checkpoints", "metrics.jsonl", "train_curves.png",
                "checkpoints_damaged"}


def _is_recorded_config(path: str) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and {"model", "data", "stages"} <= set(data)


def is_train_run(workdir: str | os.PathLike) -> bool:
  """True when `workdir` is a directory written by `u2ad train`."""
  workdir = os.fspath(workdir)
  marker = output_guard.read_marker(workdir)
  if marker is not None:
    return marker["command"] == COMMAND
  try:
    entries = set(os.listdir(workdir))
  except OSError:
    return False
  # No marker: a run of an earlier version only if config.json is a recorded u2ad config and
  # nothing but a run's own files sits beside it.
  return ("config.json" in entries and entries <= _RUN_ENTRIES
          and _is_recorded_config(os.path.join(workdir, "config.json")))


def check_train_workdir(workdir: str | os.PathLike) -> bool:
  """Refuses a workdir `u2ad train` must not write into; returns True when it is a run to resume.

  For a URI the local marker rule is skipped (see the module docstring): True when the prefix
  holds a recorded config (a run to resume), else False.

  Raises:
    WorkdirError: `workdir` is a file, or a non-empty directory that is not a u2ad training run.
  """
  workdir = os.fspath(workdir)
  if is_uri(workdir):
    return path(workdir, "config.json").exists()
  if not os.path.exists(workdir):
    return False
  if not os.path.isdir(workdir):
    raise errors.WorkdirError(workdir, "--workdir exists and is not a directory")
  if not os.listdir(workdir):
    return False
  if is_train_run(workdir):
    return True
  raise errors.WorkdirError(
      workdir, "--workdir exists, is not empty and is not a u2ad training run (no "
      f"{output_guard.MARKER} of u2ad train); nothing was written: choose a new or empty "
      "directory")


def mark(workdir: str | os.PathLike) -> None:
  """Writes the marker that makes `workdir` a u2ad training run (atomic; idempotent)."""
  if is_uri(workdir):
    # Object stores replace a whole object per write: no temporary file needed.
    from u2ad_jax import __version__  # pylint: disable=g-import-not-at-top
    path(workdir, output_guard.MARKER).write_text(
        json.dumps({"command": COMMAND, "version": __version__}, indent=2) + "\n")
    return
  marker = output_guard.read_marker(workdir)
  if marker is None or marker["command"] != COMMAND:
    output_guard.write_marker(workdir, COMMAND)
