"""Typed errors for bad input. Every message names the offending file and the problem."""

from __future__ import annotations

import os


class U2ADError(Exception):
  """Base class of the errors this package raises on purpose."""


class InputError(U2ADError):
  """A file or cohort cannot be used. `path` is the file, `problem` says why."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    where = self.path if self.path is not None else "<input>"
    super().__init__(f"{where}: {problem}")


class CorruptFileError(InputError):
  """Unreadable, truncated or not the expected format."""


class GeometryError(InputError):
  """Wrong dimensionality, or image / label shape or affine mismatch."""


class NonFiniteError(InputError):
  """NaN or Inf voxels."""


class LabelError(InputError):
  """Unknown label values, empty cord ROI or missing vertebra labels."""


class CheckpointError(InputError):
  """Missing, corrupt or incompatible checkpoint / workdir."""


class ConfigMismatchError(U2ADError):
  """A workdir was created with a config that differs in a shape-relevant way."""


class NonFiniteLossError(U2ADError):
  """Training produced a non-finite loss; the last good checkpoint is kept."""


class UsageError(U2ADError):
  """A command-line value that cannot be used (the message names the flag and the value)."""


class WorkdirError(InputError):
  """A training workdir that is not a u2ad run (refused, so nothing of the user's is touched)."""


class CheckpointWriteError(U2ADError):
  """A checkpoint could not be written (e.g. the disk is full); the last complete one is kept."""


class RunWriteError(U2ADError):
  """A file of a training run (metrics.jsonl, config.json, the curves, the marker) could not be
  written, e.g. on a full disk; training stopped and the last complete checkpoint is kept."""


class ProcessLostError(U2ADError):
  """Another process of a multi-process job stopped or cannot be reached (it missed a bounded
  wait); this process stops too."""


class ConfigValueError(U2ADError, ValueError):
  """A config value that cannot be used; the message names the key (config.guidance.params.w_eu).

  Also a ValueError, so callers that already treat config ValueErrors as bad config keep working.
  """


class Interrupted(U2ADError):
  """The user stopped a command (Ctrl-C). The message says what was kept and how to go on; the
  command line exits 130 (128 + SIGINT), not 2: nothing was wrong with the input."""


class TrainingInterrupted(Interrupted):
  """Ctrl-C during training. `step`: steps done; `checkpoint`: the newest complete checkpoint's
  step (None: none yet); `resume_hint`: how to go on (the command that resumes)."""

  def __init__(self, step: int, checkpoint: int | None, checkpoint_dir: str,
               resume_hint: str = "run the same command to resume"):
    self.step, self.checkpoint, self.checkpoint_dir = int(step), checkpoint, checkpoint_dir
    self.resume_hint = resume_hint
    kept = (f"the last checkpoint is step {checkpoint} ({checkpoint_dir})" if checkpoint is not None
            else f"no checkpoint was written yet ({checkpoint_dir})")
    super().__init__(f"interrupted at step {self.step}; {kept}; {resume_hint}")

  def with_hint(self, resume_hint: str) -> "TrainingInterrupted":
    """The same interruption with another way to go on (e.g. `u2ad demo ... --overwrite`)."""
    return TrainingInterrupted(self.step, self.checkpoint, self.checkpoint_dir, resume_hint)
