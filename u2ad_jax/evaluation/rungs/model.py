"""The learnt rungs: a checkpoint's Monte-Carlo reconstructions -> anomaly map.

1. Restore the model read-only (`train.checkpoint.restore_for_eval`): a missing or damaged
   workdir / checkpoint raises CheckpointError naming the path, before the cohort is loaded.
2. Monte-Carlo maps through the one MC path shared with the training refresh (`u2ad_jax.mc_maps`:
   slices batched by ROI size, each batch split over the local devices, per-slice keys;
   K = config.evaluation.num_samples, else the training K): EU, mean reconstruction and AU.
   In a multi-process job (`jax.distributed`) the cohort is split over the processes by subject
   (`subject_processes`), each process computes its subjects' slices with the keys of a
   one-process run, and the maps are gathered on process 0, which alone scores and writes the
   outputs (the other processes' `maps` and `evaluate` return None).
3. The anomaly map is the residual x - mean as `config.evaluation.residual` says
   (`u2ad_jax/anomaly.py`: by default its positive part after removing the subject's median cord
   residual); scoring and outputs are the shared driver's (`base.evaluate`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from u2ad_jax import anomaly as anomaly_lib
from u2ad_jax import errors
from u2ad_jax import output_guard
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import settings as settings_lib
from u2ad_jax.evaluation import thresholds
from u2ad_jax.evaluation import trust
from u2ad_jax.evaluation.rungs import base


# Offset folded into the config seed for the evaluation's MC masks: evaluation draws its own
# masks, reproducible from the config, independent of the training stream.
EVAL_SEED_OFFSET = 7919
DEFAULT_BATCH_SIZE = 8


# ------------------------------------------------------------------------------ model maps


def eval_devices(batch_size: int, devices: Sequence[Any] | None = None) -> list[Any]:
  """The devices the slices of one MC batch are split over: the first `d` of `devices`
  (default: this process's devices), `d` the largest count <= len(devices) dividing
  `batch_size`, so every device gets the same number of slices."""
  import jax  # pylint: disable=g-import-not-at-top

  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("no devices to evaluate on")
  usable = max(d for d in range(1, len(devices) + 1) if int(batch_size) % d == 0)
  return devices[:usable]


def subject_processes(subject_ids: Sequence[str], process_count: int) -> np.ndarray:
  """`[S]` subject ids -> `[S]` int: the process computing each slice's maps. Subject i (in
  order of first appearance) goes to process i mod `process_count`, all its slices with it (a
  process's share is whole patients; the maps themselves are per slice)."""
  order = {}
  for subject in subject_ids:
    order.setdefault(subject, len(order))
  return np.array([order[subject] % int(process_count) for subject in subject_ids], np.int64)


def model_maps(model: Any, params: Any, config: Any, images: np.ndarray, train_roi: np.ndarray,
               *, subject_ids: Sequence[str] | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, seed: int | None = None,
               num_samples: int | None = None, devices: Sequence[Any] | None = None,
               progress: Callable[[str], None] | None = None,
               mc_cache: dict | None = None) -> dict[str, np.ndarray] | None:
  """EU, mean reconstruction and AU of every slice with the model's final weights.

  The one Monte-Carlo path (`u2ad_jax.mc_maps`, shared with the training refresh) over this
  process's devices. In a multi-process job (collective: every process calls it with the same
  arguments) each process computes the slices of its subjects (`subject_processes`) and process
  0 gathers every slice's maps; slice s keeps the key of a one-process run, so the maps equal
  that run's up to float rounding.

  Args:
    model: flax module (`model.apply({'params': p}, images, plan)`).
    params: its parameters.
    config: the run's config (masking.ratio, uncertainty.num_samples / pass_chunk,
      data.min_roi_patches, seed).
    images: `[S, H, W]` float32 in [0, 1].
    train_roi: `[S, H, W]` bool (the masked region).
    subject_ids: `[S]` each slice's subject; required in a multi-process job.
    batch_size: slices per call, split over `devices`; slices are batched by ROI size (largest
      first) with a shortened encoder, and the last batch is padded with copies of a slice.
    seed: PRNG seed of the MC patch orders (default config.seed + EVAL_SEED_OFFSET).
    num_samples: K, reconstructions per ROI patch (default config.uncertainty.num_samples).
    devices: this process's devices to split each batch over (default: every local device; see
      `eval_devices`). Slice s draws its masks from `fold_in(key, s)` (`mc_maps.slice_keys`),
      so the maps do not depend on the device count or the batching (up to float rounding).
    progress: optional callback for one-line progress messages.
    mc_cache: a dict the caller keeps across calls: the Monte-Carlo functions built for `model`
      and these settings are kept there and reused, so other parameters of the same model (the
      checkpoints of a sweep) run without compiling again. None: built for this call.

  Returns:
    dict of `[S, H, W]` float32 arrays 'eu', 'mean', 'au'; None on the processes other than 0
    of a multi-process job.

  Raises:
    ValueError: a multi-process job without `subject_ids`.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the intensity rung needs no jax)
  from u2ad_jax import mc_maps  # pylint: disable=g-import-not-at-top

  unc = settings_lib.section(config, "uncertainty")
  data = settings_lib.section(config, "data")
  pass_chunk = unc.get("pass_chunk")
  if num_samples is None:
    num_samples = int(unc.get("num_samples", 10))
  processes = jax.process_count()
  if processes > 1 and subject_ids is None:
    raise ValueError("a multi-process evaluation splits the slices by subject: pass subject_ids")
  owner = (np.zeros(images.shape[0], np.int64) if processes == 1
           else subject_processes(subject_ids, processes))
  mine = np.flatnonzero(owner == jax.process_index())
  if processes > 1:
    images, train_roi = images[mine], train_roi[mine]
  num = mine.size
  batch_size = max(1, min(int(batch_size), num))
  devices = eval_devices(batch_size, devices)
  if seed is None:
    seed = int(config.get("seed", 0)) + EVAL_SEED_OFFSET
  start = time.monotonic()
  where = "" if processes == 1 else f" of process {jax.process_index()}/{processes}"

  def report(done: int) -> None:
    if progress is not None:
      progress(f"MC maps {done}/{num} slices on {len(devices)} device(s){where} "
               f"({time.monotonic() - start:.1f} s)")

  context = settings_lib.section(config, "model").get("context_patches")
  mc_settings = dict(
      patch_size=int(model.patch_size), ratio=float(config.masking.ratio),
      num_samples=int(num_samples), pass_chunk=None if not pass_chunk else int(pass_chunk),
      min_roi=max(1, int(data.get("min_roi_patches", 1))),
      slices_per_device=batch_size // len(devices), mode="shard_map", devices=tuple(devices),
      outputs=("eu", "mean", "au"),
      # The field of view the model was trained with (None: every patch).
      context_patches=None if context is None else int(context))

  def apply_fn(p, x, plan):
    return model.apply({"params": p}, x, plan)

  mc = None
  if mc_cache is not None:
    # The functions close over `model`: another model object gets functions of its own.
    cache_key = (id(model),) + tuple(sorted(mc_settings.items()))
    if cache_key not in mc_cache:
      mc_cache[cache_key] = mc_maps.MonteCarloMaps(apply_fn, **mc_settings)
    mc = mc_cache[cache_key]
  maps = mc_maps.compute_maps(apply_fn, params, jax.random.key(int(seed)), images, train_roi,
                              slice_ids=mine, progress=report, mc=mc, **mc_settings)
  if processes == 1:
    return maps
  return _gather_on_process_0(maps, owner, owner.shape + images.shape[1:])


def _gather_on_process_0(maps: dict[str, np.ndarray], owner: np.ndarray,
                         shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
  """Each process's maps `{name: [R_p, H, W]}` (its slices `owner == p`, in slice order) ->
  every slice's `[S, H, W]` on process 0, None elsewhere (collective)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  processes = jax.process_count()
  # The gather needs one shape in every process: the largest share, known without talking.
  rows = int(np.bincount(owner, minlength=processes).max())
  mine = np.flatnonzero(owner == jax.process_index())
  pad = rows - mine.size
  send_ids = np.concatenate([mine, np.full(pad, -1, np.int64)]).astype(np.int32)
  send = {}
  for name in ("eu", "mean", "au"):
    local = maps.get(name, np.zeros((0,) + tuple(shape[1:]), np.float32))  # no slices here
    send[name] = np.concatenate([local, np.zeros((pad,) + local.shape[1:], local.dtype)])
  # Every process receives `[P, rows, ...]`; only process 0 keeps it.
  got_ids, got = multihost_utils.process_allgather((send_ids, send))
  if jax.process_index() != 0:
    return None
  out = {name: np.zeros(tuple(shape), np.float32) for name in send}
  for p in range(processes):
    expected = np.flatnonzero(owner == p)
    ids = got_ids[p][got_ids[p] >= 0]
    if not np.array_equal(ids, expected):
      raise RuntimeError(f"Monte-Carlo maps: process {p} returned slices {ids.tolist()}, "
                         f"expected {expected.tolist()}; the processes disagree on the cohort")
    for name in out:
      out[name][expected] = got[name][p][:expected.size]
  return out


# ------------------------------------------------------------------------------ the rung


@dataclasses.dataclass
class ModelRung:
  """A restored checkpoint as a rung (`restore`); `maps` runs the Monte-Carlo reconstructions.

  Attributes:
    name: the rung's name in reports (default: the workdir's base name).
    workdir: the training workdir.
    model, params, config, step: `checkpoint.restore_for_eval`'s model, weights, recorded config
      (with the scoring overrides applied) and step.
    batch_size: slices per Monte-Carlo call (`model_maps`).
    threshold_from: an earlier evaluation's directory whose recorded threshold is applied
      (`thresholds.load_recorded`), or None.
    log: one-line progress messages, or None.
    mc_cache: the Monte-Carlo functions built so far (`model_maps`), shared with the rungs of
      other checkpoints of the same run (`at_step`), which then compile nothing again.
  """
  name: str
  workdir: str
  model: Any
  params: Any
  config: Any
  step: int
  batch_size: int = DEFAULT_BATCH_SIZE
  threshold_from: str | os.PathLike | None = None
  log: Callable[[str], None] | None = None
  mc_cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def restore(cls, workdir: str | os.PathLike, *, step: int | None = None,
              overrides: Sequence[str] = (), name: str | None = None,
              **options: Any) -> "ModelRung":
    """Restores `workdir`'s checkpoint (`step`, default the latest) read-only and applies the
    scoring `overrides` (`settings.apply_scoring_overrides`) to its recorded config.

    Raises:
      CheckpointError: missing / damaged workdir or checkpoint.
      UsageError: a bad override.
    """
    from u2ad_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    from u2ad_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

    # Recorded as `train` uses it: a URI (gs://bucket/run) exactly as given.
    workdir = workdir_lib.resolve(workdir)
    try:
      model, params, config, restored_step = checkpoint.restore_for_eval(workdir, step)
    except (OSError, ValueError, KeyError) as e:
      # Unreadable files and malformed contents are the workdir's fault; anything else is a bug
      # and keeps its traceback.
      raise errors.CheckpointError(workdir, f"cannot restore ({type(e).__name__}: {e})") from e
    config = settings_lib.apply_scoring_overrides(config, overrides)
    return cls(name=name or workdir_lib.name(workdir), workdir=workdir,
               model=model, params=params, config=config, step=restored_step, **options)

  def at_step(self, step: int) -> "ModelRung":
    """This rung with the parameters of checkpoint `step` of the same run (the model, config,
    scoring overrides and Monte-Carlo functions are shared).

    Raises:
      CheckpointError: no checkpoint at `step`, or a damaged one.
    """
    from u2ad_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    from u2ad_jax.train import settings as train_settings  # pylint: disable=g-import-not-at-top
    from u2ad_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

    optimizer = state_lib.make_optimizer(
        train_settings.optimizer_settings(self.config.optim), 1)
    with checkpoint.Checkpoints(self.workdir, read_only=True) as checkpoints:
      if int(step) not in checkpoints.all_steps():
        raise errors.CheckpointError(checkpoints.step_dir(step), f"no checkpoint at step {step} "
                                     f"(available: {checkpoints.all_steps()})")
      restored, _, _ = checkpoints.restore(
          int(step), checkpoint.abstract_train_state(self.model, optimizer))
    return dataclasses.replace(self, params=restored.params, step=int(step))

  def maps(self, prepared: base.PreparedCohort,
           settings: settings_lib.EvalSettings) -> base.RungMaps | None:
    slice_set = prepared.slice_set
    check_image_size(slice_set, self.model, prepared.root)
    if self.log:
      self.log(f"restored {self.workdir} step {self.step}; {len(slice_set)} slices of "
               f"{len(slice_set.subjects)} subjects")
    variant = settings_lib.section(self.config, "model").get("variant")
    provenance = {
        "model": {"name": self.name, "workdir": self.workdir,
                  "variant": variant, "stages": _stages(self.config)},
        "checkpoint_step": self.step,
        "num_samples": settings.mc_samples,
        "anomaly_map": anomaly_lib.describe(settings.residual),
        "curve": settings.describe_curve(),
        "segment_scores": settings.describe_segments(),
        "cohort": os.path.abspath(prepared.root),
        "postprocess": dataclasses.asdict(settings.postprocess),
    }
    rule = None
    if self.threshold_from is not None:
      if settings.segment_norm != "none":
        # Per-level z needs the cohort's own statistics, which a lone later scan does not have.
        raise errors.UsageError(f"--threshold-from with evaluation.segment_norm="
                                f"{settings.segment_norm!r}: per-level scores need a cohort; "
                                f"set evaluation.segment_norm=none")
      rule = thresholds.load_recorded(self.threshold_from, provenance)
    warnings = trust.model_warnings(self.config, prepared.kind, prepared.roi)
    stage_warning = trust.checkpoint_warning(self._checkpoint_meta(), self.config, self.step)
    if stage_warning:
      warnings.insert(0, stage_warning)
    maps = model_maps(self.model, self.params, self.config, slice_set.images,
                      slice_set.train_roi, subject_ids=slice_set.subject_ids,
                      batch_size=self.batch_size, num_samples=settings.mc_samples,
                      progress=self.log, mc_cache=self.mc_cache)
    if maps is None:  # a multi-process job's maps went to process 0
      return None
    anomaly = anomaly_lib.anomaly_maps(slice_set.images, maps["mean"], slice_set.score_roi,
                                       slice_set.subject_ids, settings.residual)
    header = [f"- Model: `{self.name}` ({variant}) of `{self.workdir}`, checkpoint step "
              f"{self.step}, K = {provenance['num_samples']} MC reconstructions per patch; "
              f"{provenance['anomaly_map']}.",
              f"- Cohort: `{prepared.root}` ({len(slice_set)} slices)."]
    return base.RungMaps(anomaly=anomaly, provenance=provenance, header=header, eu=maps["eu"],
                         recon=maps["mean"], rule=rule, warnings=warnings)

  def _checkpoint_meta(self) -> dict[str, Any] | None:
    """The restored checkpoint's training position (stage, epoch), None when unreadable."""
    from u2ad_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    try:
      checkpoints = checkpoint.Checkpoints(self.workdir, read_only=True)
    except errors.U2ADError:
      return None
    try:
      return checkpoints.restore_meta(self.step)
    except errors.U2ADError:
      return None
    finally:
      checkpoints.close()


def evaluate_checkpoint(workdir: str | os.PathLike, data_dir: str | os.PathLike,
                        out_dir: str | os.PathLike | None, *, step: int | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, name: str | None = None,
                        prepared: base.PreparedCohort | None = None,
                        overrides: Sequence[str] = (), overwrite: bool = False,
                        verbose: bool = True,
                        threshold_from: str | os.PathLike | None = None
                        ) -> analysis.CohortResult | None:
  """Evaluates one checkpoint on one cohort; writes everything to `out_dir` (None: nothing).
  In a multi-process job process 0 scores and writes; the others return None.

  `overrides` (`section.key=value`, see `settings.apply_scoring_overrides`) change the scoring
  settings recorded with the run, e.g. `evaluation.residual=absolute` or
  `evaluation.num_samples=10`. `out_dir` follows `output_guard.check_output_dir` (checked before
  any work): it may not be, lie inside or contain the workdir or the cohort, and an existing
  non-empty `out_dir` is replaced only when it is a previous evaluation and `overwrite` is set.
  `threshold_from`: an earlier evaluation's directory whose recorded threshold is applied instead
  of one computed from this cohort (`thresholds.load_recorded`; checked before the MC maps).

  Raises:
    UsageError / InputError: an output directory that may not be written (nothing written).
    CheckpointError: missing / damaged workdir or checkpoint (nothing written).
    LabelError and other InputErrors: bad cohort, e.g. no vertebral labels (nothing written).
  """
  log = stderr_log(verbose)
  protected = {"--workdir": os.fspath(workdir), "--data": data_dir,
               "--threshold-from": threshold_from}
  if out_dir is not None:
    output_guard.check_output_dir(out_dir, "evaluate", overwrite=overwrite, protected=protected)
  rung = ModelRung.restore(workdir, step=step, overrides=overrides, name=name,
                           batch_size=batch_size, threshold_from=threshold_from, log=log)
  if prepared is None:
    prepared = base.prepare_cohort(data_dir, rung.config.data, progress=verbose)
  settings = settings_lib.EvalSettings.from_config(rung.config)
  result = base.evaluate(rung, prepared, settings, out_dir, overwrite=overwrite,
                         protected=protected, log=log)
  if out_dir is not None and result is not None and log:
    log(f"wrote {os.path.abspath(os.fspath(out_dir))}")
  return result


def stderr_log(verbose: bool) -> Callable[[str], None] | None:
  """`[evaluate] message` lines on stderr when `verbose`, else None (no progress)."""
  if not verbose:
    return None
  return lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def _stages(config: Any) -> list[str]:
  stages = config.get("stages") if hasattr(config, "get") else None
  if stages is None:
    return []
  return [stages] if isinstance(stages, str) else [str(v) for v in stages]


def check_image_size(slice_set: Any, model: Any, root: str) -> None:
  """InputError (naming the cohort) when its slices are not the model's input size."""
  size = getattr(model, "image_size", None)
  if size is not None and tuple(slice_set.image_shape) != (int(size), int(size)):
    raise errors.InputError(root, f"cohort slices are {slice_set.image_shape} but the model "
                                  f"expects {size} x {size}")
