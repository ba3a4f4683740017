"""Console progress: one line every `log_every_steps` with loss terms, norms, speed and ETA.

Plain lines (no carriage returns) so the output reads the same in a terminal, a SLURM log and
a CI log, on stderr (progress is not a result). Only process 0 prints. A figure that is not
known yet (the speed and ETA of the first, compiling step) or not reported (a norm the step does
not compute) is left out of the line rather than printed as `nan`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
  """`3725.4` -> `'1:02:05'`; unknown (nan / inf) -> `'?'`."""
  if not seconds == seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  seconds = int(round(max(0.0, seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def _bar(fraction: float, width: int = 20) -> str:
  fraction = min(max(fraction, 0.0), 1.0)
  filled = int(round(fraction * width))
  return "#" * filled + "." * (width - filled)


class Progress:
  """Progress of one stage.

  Args:
    stage: stage name (printed).
    total_steps: optimizer steps of the whole stage.
    done_steps: steps already done when this (possibly resumed) run starts the stage.
    every: print every this many steps (and at the last step).
    enabled: False silences it (non-zero processes, tests).
    stream: where to print (default stderr).
  """

  def __init__(self, stage: str, total_steps: int, done_steps: int = 0, every: int = 10,
               enabled: bool = True, stream: TextIO | None = None):
    self.stage = stage
    self.total = max(1, int(total_steps))
    self.done = int(done_steps)
    self.every = max(1, int(every))
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self._t0: float | None = None
    self._steps_since_t0 = 0
    self._images_since_t0 = 0.0
    self._last_time: float | None = None
    self._last_done = self.done

  def message(self, text: str) -> None:
    if self.enabled:
      print(f"[{self.stage}] {text}", file=self.stream, flush=True)

  def update(self, global_step: int, epoch: int, epochs: int, metrics: dict[str, Any],
             now: float | None = None) -> dict[str, float]:
    """Records one finished step; prints every `every` steps. Returns the speed figures
    `{'steps_per_sec', 'images_per_sec', 'eta_sec'}` (nan until known).

    now: when the step's metrics arrived (default: this call); steps fetched together share it.
    The speed excludes the steps that arrived with the first one after (re)start, which
    include compilation. Images are the step's `metrics['examples']` (the valid examples of its
    global batch; a short last batch counts what it holds).
    """
    now = time.monotonic() if now is None else now
    self.done += 1
    if self._t0 is None:
      self._t0 = now  # timing starts after the first (compiling) step
    elif now > self._t0:
      self._steps_since_t0 += 1
      self._images_since_t0 += float(metrics.get("examples", float("nan")))
    elapsed = now - self._t0
    timed = elapsed > 0 and self._steps_since_t0
    rate = self._steps_since_t0 / elapsed if timed else float("nan")
    images_rate = self._images_since_t0 / elapsed if timed else float("nan")
    remaining = self.total - self.done
    eta = remaining / rate if rate == rate and rate > 0 else float("nan")
    speed = {"steps_per_sec": rate, "images_per_sec": images_rate, "eta_sec": eta}
    if self.enabled and (self.done % self.every == 0 or self.done >= self.total):
      terms = " ".join(f"{k} {float(metrics[k]):.4g}" for k in ("image", "edge") if k in metrics)
      parts = [f"ep {epoch + 1}/{epochs} step {global_step} |{_bar(self.done / self.total)}| "
               f"{100.0 * self.done / self.total:5.1f}% loss {float(metrics['loss']):.5g}"
               + (f" ({terms})" if terms else "")]
      for label, key, fmt in (("|g|", "grad_norm", ".3g"), ("|w|", "param_norm", ".4g"),
                              ("lr", "lr", ".3g")):
        value = float(metrics.get(key, float("nan")))
        if value == value:
          parts.append(f"{label} {value:{fmt}}")
      if rate == rate:
        parts.append(f"{rate:.2f} steps/s ETA {format_duration(eta)}")
      else:
        parts.append("(first step: compiling; speed from the next)")
      line = " ".join(parts)
      self.message(line)
    return speed
