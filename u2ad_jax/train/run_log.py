"""What a training run reports: metric records, the console lines, the loss check.

The step's metrics stay on the device until a log boundary (`every` pending steps), a checkpoint
or the end of the stage: `add` only queues them, so the host keeps dispatching steps without
waiting for any of them to finish, and `flush` fetches all pending metrics in one transfer,
stops the run on the first non-finite loss (the trainer flushes before every save, so an
unchecked state is never saved) and logs them in step order. Every process checks the loss;
only process 0 (`chief`) writes `metrics.jsonl`, the curves and the TensorBoard event files
(`summaries`: every record written to metrics.jsonl is also a TensorBoard summary), and only a
verbose process 0 prints.
"""

from __future__ import annotations

import shlex
import sys
import time
from typing import Any

import numpy as np

from u2ad_jax import errors
from u2ad_jax import parallel
from u2ad_jax.train import metrics_log
from u2ad_jax.train import progress as progress_lib
from u2ad_jax.train import summaries as summaries_lib
from u2ad_jax.train import workdir as workdir_lib


class RunLog:
  """The run's log.

  Args:
    workdir: the run directory (metrics.jsonl, train_curves.png, TensorBoard events).
    chief: this process writes the files (process 0).
    verbose: print progress lines (process 0 only).
    tensorboard: also write TensorBoard event files (opened by `resume_from`).
  """

  def __init__(self, workdir: str, chief: bool, verbose: bool, tensorboard: bool = False):
    self.workdir = workdir
    self.chief = chief
    self.verbose = verbose
    self.tensorboard = tensorboard
    self.records = metrics_log.MetricsLog(workdir) if chief else None
    self.summaries: summaries_lib.Summaries | None = None
    self.progress: progress_lib.Progress | None = None
    self.stage = ""
    self.epochs = 0
    self.every = 1
    self._pending: list[tuple[dict[str, Any], dict[str, Any]]] = []

  def say(self, text: str) -> None:
    if self.verbose:
      print(f"[train] {text}", file=sys.stderr, flush=True)  # a log, not a result

  def resume_from(self, step: int | None) -> None:
    """Drops the records an interrupted attempt logged after its checkpoint `step` (all of them
    when it saved nothing), and opens the TensorBoard writer, which hides that attempt's events
    from `step + 1` on (`summaries.Summaries`); says the `tensorboard --logdir` line."""
    if not self.chief:
      return
    self.records.truncate_for_resume(0 if step is None else step)
    if self.tensorboard and self.summaries is None:
      resumed = step is not None or bool(summaries_lib.event_files(self.workdir))
      self.summaries = summaries_lib.Summaries(
          self.workdir, purge_step=(0 if step is None else step) + 1 if resumed else None)
      self.say(f"TensorBoard: tensorboard --logdir {shlex.quote(self.workdir)}")

  def event(self, record: dict[str, Any]) -> None:
    """Writes a record that is not a step's (stage start / end, map refresh, validation)."""
    if self.chief:
      self.records.write(record)
      if self.summaries is not None:
        self.summaries.event(record)

  def panel(self, step: int, maps: dict[str, Any]) -> None:
    """The validation image panel of `step` (TensorBoard only; `summaries.panel_image`)."""
    if self.summaries is not None:
      self.summaries.panel(step, maps)

  def begin_stage(self, stage: str, epochs: int, steps_per_epoch: int, done_steps: int,
                  every: int) -> None:
    """Starts the progress of `stage` (`done_steps` of it already done by a resumed run);
    metrics are fetched every `every` steps."""
    self.stage, self.epochs, self.every = stage, epochs, max(1, int(every))
    self.progress = progress_lib.Progress(stage, epochs * steps_per_epoch, done_steps,
                                          every=every, enabled=self.verbose)

  def message(self, text: str) -> None:
    """A console line of the current stage."""
    self.progress.message(text)

  def add(self, record: dict[str, Any], metrics: dict[str, Any], last_saved: int | None,
          checkpoint_dir: str) -> None:
    """Queues a step's record (`step`, `epoch`, guidance) and its device metrics (not read:
    no wait on the device); flushes when `every` steps are pending."""
    self._pending.append((record, metrics))
    if len(self._pending) >= self.every:
      self.flush(last_saved, checkpoint_dir)

  def flush(self, last_saved: int | None, checkpoint_dir: str) -> None:
    """Fetches the pending steps' metrics (waits for the newest of those steps), checks and
    logs them in step order.

    Raises:
      NonFiniteLossError: a loss is NaN / inf (the first such step is named, with the last good
        checkpoint, `last_saved` in `checkpoint_dir`).
    """
    if not self._pending:
      return
    pending, self._pending = self._pending, []
    fetched = parallel.to_host([metrics for _, metrics in pending])
    # One arrival time for all of them: the speed counts steps finished between fetches.
    arrived = time.monotonic()
    for (record, _), metrics in zip(pending, fetched):
      values = {k: float(v) for k, v in metrics.items()}
      record.update(values)
      if not np.isfinite(values["loss"]):
        kept = (f"the last good checkpoint is step {last_saved} in {checkpoint_dir}"
                if last_saved is not None else "no checkpoint had been saved")
        raise errors.NonFiniteLossError(
            f"non-finite loss ({values['loss']}) at step {record['step']} (stage {self.stage}, "
            f"epoch {record['epoch'] + 1}); training stopped and {kept}")
      record.update(self.progress.update(record["step"], record["epoch"], self.epochs, values,
                                         now=arrived))
      if self.chief:
        self.records.write(record)
        if self.summaries is not None:
          self.summaries.step_record(record)

  def end_stage(self, step: int, seconds: float) -> None:
    """The stage's closing line and record; redraws the curves."""
    self.message(f"done in {progress_lib.format_duration(seconds)} (step {step})")
    if self.chief:
      self.records.write({"event": "stage_end", "stage": self.stage, "step": step,
                          "seconds": seconds})
      metrics_log.plot_curves(self.records.read(),
                              workdir_lib.join(self.workdir, metrics_log.CURVES_FILE))
      if self.summaries is not None:
        self.summaries.flush()

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer (the run's end, or its failure)."""
    if self.summaries is not None:
      summaries, self.summaries = self.summaries, None
      summaries.close()
