"""Fault injection for the robustness tests: inert unless U2AD_FAULT_INJECT is set.

The tests must kill or break a training process at exact, named points (inside a checkpoint
save, between steps) to show that a resume is bit-identical and that a failure leaves the last
good checkpoint intact. Random wall-clock kills rarely land inside a save, so the trainer calls
`hit(point, step)` at a few named points and this module, reading the environment in this one
place, decides whether to act there.

  U2AD_FAULT_INJECT="ACTION@POINT:STEP[,ACTION@POINT:STEP...]"

POINT: `step` (before train step STEP, counted from 1, runs), `save_begin` (before the checkpoint of
STEP is written), `save_inflight` (the asynchronous write of STEP has started and not finished:
its temporary directory exists), `save_done` (the checkpoint of STEP is committed).
ACTION: `kill` (SIGKILL this process: no cleanup, like a preempted or OOM-killed job),
`enospc` (raise OSError(ENOSPC), as a full disk would), `nan` (only at `step`: the trainer
fills the batch of step STEP with NaN).

Nothing here runs in normal use: with the variable unset, `hit` returns None after one dict
lookup.
"""

from __future__ import annotations

import errno
import os
import signal

ENV_VAR = "U2AD_FAULT_INJECT"
POINTS = ("step", "save_begin", "save_inflight", "save_done")
ACTIONS = ("kill", "enospc", "nan")


def _plan() -> dict[tuple[str, int], str]:
  text = os.environ.get(ENV_VAR, "").strip()
  plan = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    action, _, where = item.partition("@")
    point, _, step = where.partition(":")
    if action not in ACTIONS or point not in POINTS or not step.isdigit():
      raise ValueError(f"{ENV_VAR}: cannot read {item!r}; expected ACTION@POINT:STEP with "
                       f"ACTION in {ACTIONS} and POINT in {POINTS}")
    plan[(point, int(step))] = action
  return plan


def wanted(point: str, step: int) -> bool:
  """Whether the plan acts at (point, step) (lets a caller prepare, e.g. wait for a commit)."""
  return ENV_VAR in os.environ and (point, int(step)) in _plan()


def hit(point: str, step: int) -> str | None:
  """Acts if the plan names (point, step): kills the process, raises OSError(ENOSPC), or
  returns the action for the caller to carry out ('nan'); else returns None."""
  if ENV_VAR not in os.environ:
    return None
  action = _plan().get((point, int(step)))
  if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  if action == "enospc":
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV_VAR})")
  return action
