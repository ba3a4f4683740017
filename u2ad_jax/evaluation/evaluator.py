"""Checkpoint -> anomaly maps -> scores -> outputs (what `u2ad evaluate` runs).

Order of work, chosen so that bad input fails BEFORE anything is computed or written:
1. Restore the model read-only (`train.checkpoint.restore_for_eval`): a missing or damaged
   workdir / checkpoint raises CheckpointError naming the path.
2. Load the cohort with `require_vertebrae=True` and find every subject's vertebral levels (by
   identity where a vertebra map exists: segments outside the field of view are n/a; else by
   counting the seven bodies C2 ... T1): a subject without them raises LabelError naming its file.
3. Monte-Carlo maps (`uncertainty.mc_uncertainty`, jitted, batched over slices and each batch
   split over the local devices with shard_map; K =
   config.evaluation.num_samples, else the training K): EU, mean reconstruction and AU; the
   anomaly map is the residual x - mean as `config.evaluation.residual` says (`u2ad_jax/anomaly.py`:
   by default its positive part after removing the subject's median cord residual).
4. Scores, the unsupervised threshold and metrics (`analysis.analyse`, shared by every rung).
5. Outputs are written into a staging directory beside `--out`, which replaces `--out` only once
   complete: an error at any point leaves no partial report.

Per-subject outputs (subjects/<id>/): `<id>_anomaly.nii.gz` (the anomaly map),
`<id>_anomaly_postprocessed.nii.gz`, `<id>_eu.nii.gz`, `<id>_recon.nii.gz` (mean reconstruction,
in the input's intensity units) on the input's own voxel grid with its affine and header, and
`<id>_scores.json` (model, checkpoint step, threshold, scores, decisions, levels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from u2ad_jax import anomaly as anomaly_lib
from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import output_guard
from u2ad_jax import labels as label_values
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import curves
from u2ad_jax.evaluation import levels as levels_lib
from u2ad_jax.evaluation import postprocess as postprocess_lib
from u2ad_jax.evaluation import report
from u2ad_jax.evaluation import scoring
from u2ad_jax.evaluation import thresholds

# Offset folded into the config seed for the evaluation's MC masks: evaluation draws its own
# masks, reproducible from the config, independent of the training stream.
EVAL_SEED_OFFSET = 7919
DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Scoring settings read from `config.postprocess` and `config.evaluation`."""
  postprocess: postprocess_lib.PostprocessParams
  rule: thresholds.ThresholdRule
  reduction: str = "sum"
  residual: str = anomaly_lib.DEFAULT_RESIDUAL
  curve_window: int = 1           # rows (odd), from config.evaluation.curve_window_mm
  num_samples: int | None = None  # MC reconstructions per patch; None = the training K
  segment_norm: str = "none"      # 'none' | 'level_z' (scoring.normalise_levels)

  @classmethod
  def from_config(cls, config: Any) -> "EvalSettings":
    """Reads the settings; a key missing from an older run's recorded config takes today's
    default from configs/base.py (the one source of defaults).

    Raises:
      ValueError: a key these sections do not define (e.g. a misspelt or retired name).
    """
    ev = _with_defaults(config, "evaluation")
    return cls(
        postprocess=postprocess_lib.PostprocessParams.from_config(
            _with_defaults(config, "postprocess")),
        rule=thresholds.ThresholdRule(name=str(ev["threshold"]), k=float(ev["mad_k"]),
                                      **({"pool": str(ev["threshold_pool"])}
                                         if ev.get("threshold_pool") is not None else {})),
        reduction=str(ev["curve_reduction"]),
        residual=str(ev["residual"]),
        curve_window=curves.window_rows(float(ev["curve_window_mm"] or 0.0), _pixel_mm(config)),
        num_samples=None if ev.get("num_samples") is None else int(ev["num_samples"]),
        segment_norm=str(ev["segment_norm"]))

  def describe_curve(self) -> str:
    """How the curve is made, for reports and sidecars."""
    text = f"{self.reduction} across the cord width"
    if self.curve_window > 1:
      text += f", summed over {self.curve_window} rows along the cord"
    return text

  def describe_segments(self) -> str:
    """How segment scores are made, for reports and sidecars."""
    text = "max of the curve over the segment's rows"
    if self.segment_norm == "level_z":
      text += (", as a robust z per level: (score - median) / (1.4826 MAD) over the cohort's "
               "patients at that level")
    return text

  def __post_init__(self):
    if self.segment_norm not in scoring.SEGMENT_NORMS:
      raise ValueError(f"config.evaluation.segment_norm={self.segment_norm!r}; expected one of "
                       f"{scoring.SEGMENT_NORMS}")
    if self.residual not in anomaly_lib.RESIDUALS:
      raise ValueError(f"config.evaluation.residual={self.residual!r}; expected one of "
                       f"{anomaly_lib.RESIDUALS}")
    if self.num_samples is not None and self.num_samples < 1:
      raise ValueError(f"config.evaluation.num_samples must be >= 1, got {self.num_samples}")


def _pixel_mm(config: Any) -> float:
  """Row spacing of the model frame in mm (field of view / image size)."""
  data = _section(config, "data")
  return float(data.get("fov_mm", 200.0)) / float(data.get("image_size", 256))


def _with_defaults(config: Any, name: str) -> dict[str, Any]:
  """Scoring section `name` of `config` over configs/base.py's defaults; unknown keys fail."""
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top

  recorded = _section(config, name)
  known = set(SCORING_KEYS[name])
  unknown = sorted(set(recorded) - known)
  if unknown:
    raise ValueError(f"config.{name} has unknown setting(s) {unknown}; known: {sorted(known)}")
  return {**config_files.default_section(name), **recorded}


def _section(config: Any, name: str) -> dict[str, Any]:
  """A config section as a plain dict ({} when absent)."""
  if config is None:
    return {}
  section = config.get(name) if hasattr(config, "get") else getattr(config, name, None)
  if section is None:
    return {}
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


# Config sections an evaluation may override without retraining (scoring only: the model and
# its data geometry are fixed by the checkpoint).
SCORING_KEYS = {
    "evaluation": ("threshold", "mad_k", "threshold_pool", "curve_reduction", "curve_window_mm",
                   "residual", "num_samples", "segment_norm"),
    "postprocess": ("percentile", "min_size", "top_k"),
}


def apply_scoring_overrides(config: Any, overrides: Sequence[str]) -> Any:
  """`config` with `section.key=value` overrides of its scoring settings (SCORING_KEYS) applied
  in place (`config_lib.apply_overrides`), checked by building the EvalSettings.

  Raises:
    UsageError: a malformed override, a setting outside SCORING_KEYS, or a bad value.
  """
  from u2ad_jax.train import config_lib  # pylint: disable=g-import-not-at-top

  config_lib.apply_overrides(config, overrides, allowed=SCORING_KEYS)
  try:
    EvalSettings.from_config(config)
  except (TypeError, ValueError) as e:
    raise errors.UsageError(f"overrides {list(overrides)}: {e}") from e
  return config


# ------------------------------------------------------------------------------ staging


def staged_directory(out_dir: str | os.PathLike,
                     command: str = "evaluate") -> contextlib.AbstractContextManager[str]:
  """`output_guard.staged_directory`: a staging directory beside `out_dir` that replaces it only
  when complete, and only when `out_dir` is missing, empty or a previous `command` output."""
  return output_guard.staged_directory(out_dir, command)


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


def model_maps(model: Any, params: Any, config: Any, images: np.ndarray, train_roi: np.ndarray,
               *, batch_size: int = DEFAULT_BATCH_SIZE, seed: int | None = None,
               num_samples: int | None = None, devices: Sequence[Any] | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
  """EU, mean reconstruction and AU of every slice with the model's final weights.

  The one Monte-Carlo path (`u2ad_jax.mc_maps`, shared with the training refresh) over this
  process's devices.

  Args:
    model: flax module (`model.apply({'params': p}, images, plan)`).
    params: its parameters.
    config: the run's config (masking.ratio, uncertainty.num_samples / pass_chunk,
      data.min_roi_patches, seed).
    images: `[S, H, W]` float32 in [0, 1].
    train_roi: `[S, H, W]` bool (the masked region).
    batch_size: slices per call, split over `devices`; slices are batched by ROI size (largest
      first) with a shortened encoder, and the last batch is padded with copies of a slice.
    seed: PRNG seed of the MC patch orders (default config.seed + EVAL_SEED_OFFSET).
    num_samples: K, reconstructions per ROI patch (default config.uncertainty.num_samples).
    devices: devices to split each batch over (default: every local device; see
      `eval_devices`). Slice s draws its masks from `fold_in(key, s)` (`mc_maps.slice_keys`),
      so the maps do not depend on the device count or the batching (up to float rounding).
    progress: optional callback for one-line progress messages.

  Returns:
    dict of `[S, H, W]` float32 arrays 'eu', 'mean', 'au'.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the intensity rung needs no jax)
  from u2ad_jax import mc_maps  # pylint: disable=g-import-not-at-top

  unc = _section(config, "uncertainty")
  data = _section(config, "data")
  pass_chunk = unc.get("pass_chunk")
  if num_samples is None:
    num_samples = int(unc.get("num_samples", 10))
  num = images.shape[0]
  batch_size = max(1, min(int(batch_size), num))
  devices = eval_devices(batch_size, devices)
  if seed is None:
    seed = int(config.get("seed", 0)) + EVAL_SEED_OFFSET
  start = time.monotonic()

  def report(done: int) -> None:
    if progress is not None:
      progress(f"MC maps {done}/{num} slices on {len(devices)} device(s) "
               f"({time.monotonic() - start:.1f} s)")

  return mc_maps.compute_maps(
      lambda p, x, plan: model.apply({"params": p}, x, plan), params, jax.random.key(int(seed)),
      images, train_roi, progress=report, patch_size=int(model.patch_size),
      ratio=float(config.masking.ratio), num_samples=int(num_samples),
      pass_chunk=None if not pass_chunk else int(pass_chunk),
      min_roi=max(1, int(data.get("min_roi_patches", 1))),
      slices_per_device=batch_size // len(devices), mode="shard_map", devices=devices,
      outputs=("eu", "mean", "au"))


# ------------------------------------------------------------------------------ outputs


def _denormalise(recon: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
  lo, hi = intensity_range
  return recon * (hi - lo) + lo


def write_subject_outputs(out_dir: str, result: analysis.CohortResult, slice_set: Any,
                          provenance: Mapping[str, Any]) -> dict[str, dict[str, str]]:
  """Per-subject NIfTI maps on the input grid and the JSON sidecar; returns written files."""
  from u2ad_jax.data import nifti  # pylint: disable=g-import-not-at-top
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  written = {}
  voxels = peak_positions(result, slice_set)
  for i, s in enumerate(result.scores):
    sid = s.subject_id
    subject_dir = os.path.join(out_dir, "subjects", sid)
    geometry = slice_set.geometries.get(sid)
    pos = s.positions
    slice_index = slice_set.slice_index[pos]
    files = {}
    if geometry is not None:
      volumes = {"anomaly": result.anomaly[pos],
                 "anomaly_postprocessed": result.postprocessed[pos]}
      if result.eu is not None:
        volumes["eu"] = result.eu[pos]
      if result.recon is not None:
        volumes["recon"] = _denormalise(result.recon[pos], geometry.intensity_range)
      for name, maps in volumes.items():
        volume = preprocess.slices_to_volume(maps.astype(np.float32), slice_index, geometry)
        rel = f"{sid}_{name}.nii.gz"
        nifti.write_like(os.path.join(subject_dir, rel), volume, geometry)
        files[name] = rel
    sidecar = {
        "subject_id": sid,
        **dict(provenance),
        "threshold": report.threshold_summary(result),
        "patient": {
            "score": s.patient_score,
            "flagged": bool(result.decisions.patient_flags[i]),
            "peak_segment": label_values.SEGMENT_NAMES[s.peak_segment],
            "peak_voxel": voxels[sid]["patient"],
            "peak_slice_index": int(slice_set.slice_index[pos[s.peak_slice]]),
            "peak_row": s.peak_row,
        },
        "segments": {
            name: {"score": report.finite_or_none(s.segment_scores[k]),  # None = n/a
                   "flagged": bool(result.decisions.segment_flags[i, k]),
                   "peak_voxel": voxels[sid]["segments"][k],
                   "peak_slice_index": int(slice_set.slice_index[pos[s.segment_peak_slices[k]]]),
                   "peak_row": int(s.segment_peak_rows[k])}
            for k, name in enumerate(label_values.SEGMENT_NAMES)},
        "levels": {
            "centroid_rows": {n: report.finite_or_none(r) for n, r in
                              zip(label_values.VERTEBRA_NAMES, s.levels.centroid_rows)},
            "method": s.levels.method,
            "reference_slice_index": int(slice_set.slice_index[pos[s.levels.reference_slice]]),
            "frame": "model slice frame: rows superior -> inferior, columns anterior -> "
                     "posterior, slice index = canonical RAS x index; peak_voxel = (i, j, k) "
                     "of the input NIfTI's stored grid",
        },
        "slices_scored": [int(v) for v in slice_index],
        "files": files,
        "maps": (provenance.get("anomaly_map", "anomaly = the rung's anomaly map") +
                 "; recon = mean reconstruction in the input's intensity units; voxels of "
                 "slices that were not scored are 0"),
    }
    if result.truth is not None:
      sidecar["truth"] = {
          "has_lesion": bool(result.truth.patient[i]),
          "segments": [n for n, t in zip(label_values.SEGMENT_NAMES, result.truth.segments[i])
                       if t],
          "source": result.truth.source,
      }
    rel = f"{sid}_scores.json"
    io_utils.write_json(os.path.join(subject_dir, rel), sidecar)
    files["scores"] = rel
    written[sid] = files
  return written


def model_to_voxel(geometry: Any, slice_index: int, row: int, column: int) -> tuple[int, int, int]:
  """Model-frame pixel (row, column) of the slice at canonical x `slice_index` -> the nearest
  voxel `(i, j, k)` of the INPUT file's stored grid (`preprocess.SliceGeometry`: model pixel
  (r, c) is grid index m_y = S-1-c, m_z = S-1-r at canonical voxel `scale * m + offset`; the
  canonical axes are the stored ones permuted and flipped, `geometry.orientation.ornt`)."""
  s = int(geometry.image_size)
  canonical_shape = geometry.orientation.canonical_shape
  sy, sz = geometry.scale
  oy, oz = geometry.offset
  canonical = (int(slice_index),
               int(round(sy * (s - 1 - int(column)) + oy)),
               int(round(sz * (s - 1 - int(row)) + oz)))
  canonical = tuple(min(max(v, 0), n - 1) for v, n in zip(canonical, canonical_shape))
  ornt = np.asarray(geometry.orientation.ornt)
  stored = []
  for axis, (target, flip) in enumerate(ornt):
    v = canonical[int(target)]
    stored.append(int(geometry.orientation.shape[axis]) - 1 - v if flip < 0 else v)
  return stored[0], stored[1], stored[2]


def peak_positions(result: analysis.CohortResult, slice_set: Any) -> dict[str, dict[str, Any]]:
  """Where each patient's and each segment's peak lies, in the INPUT NIfTI's voxel indices.

  The curves sum across the cord width, so a peak is a (slice, row); its column is the row's
  maximum of the postprocessed map (else the raw anomaly map, else the middle of the scoring
  ROI on that row). Returns {subject: {"patient": (i, j, k) | None, "segments": [(i, j, k) |
  None] * 6}}; None where the subject has no input geometry (e.g. `.npy` slices).
  """
  out = {}
  for s in result.scores:
    geometry = slice_set.geometries.get(s.subject_id) if slice_set.geometries else None

    def voxel(position: int, row: int) -> tuple[int, int, int] | None:
      if geometry is None:
        return None
      pos = int(s.positions[position])
      column = None
      for maps in (result.postprocessed, result.anomaly):
        line = np.asarray(maps[pos][row])
        if line.max() > 0:
          column = int(np.argmax(line))
          break
      if column is None:
        roi_columns = np.flatnonzero(slice_set.score_roi[pos][row])
        column = int(roi_columns.mean()) if roi_columns.size else slice_set.images.shape[-1] // 2
      return model_to_voxel(geometry, int(slice_set.slice_index[pos]), row, column)

    out[s.subject_id] = {
        "patient": voxel(s.peak_slice, s.peak_row),
        "segments": [voxel(int(s.segment_peak_slices[k]), int(s.segment_peak_rows[k]))
                     for k in range(len(label_values.SEGMENT_NAMES))]}
  return out


def write_all(out_dir: str, result: analysis.CohortResult, slice_set: Any,
              provenance: Mapping[str, Any], header_lines: list[str]) -> str:
  """Report, tables, metrics, figures and per-subject files into `out_dir` (a staging dir)."""
  write_subject_outputs(out_dir, result, slice_set, provenance)
  lines = list(header_lines) + [
      f"- Vertebral levels: {levels_lib.describe({s.subject_id: s.levels for s in result.scores})}.",
      "- Per-subject maps (NIfTI on the input grid: anomaly, postprocessed anomaly, EU, "
      "reconstruction) and score sidecars: `subjects/<id>/`."]
  io_utils.write_json(os.path.join(out_dir, "summary.json"), {
      "name": result.name, **dict(provenance), "threshold": report.threshold_summary(result),
      "patients": {s.subject_id: {"score": s.patient_score,
                                  "flagged": bool(result.decisions.patient_flags[i])}
                   for i, s in enumerate(result.scores)}})
  return report.write_report(out_dir, result, slice_set.images, slice_set.slice_index, lines,
                             voxels=peak_positions(result, slice_set))


# ------------------------------------------------------------------------------ the command


@dataclasses.dataclass
class PreparedCohort:
  """A cohort loaded and checked for scoring (levels found)."""
  root: str
  slice_set: Any
  participants: dict[str, dict[str, Any]]
  levels: dict[str, Any]
  label_files: dict[str, str]


def prepare_cohort(data_dir: str | os.PathLike, data_config: Any,
                   progress: bool = True) -> PreparedCohort:
  """Loads a cohort for scoring; raises (LabelError naming the file) before any computation."""
  from u2ad_jax.data import cohort  # pylint: disable=g-import-not-at-top
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  root = os.fspath(data_dir)
  files = cohort.list_subjects(root)
  label_files = {f.subject_id: f.label for f in files}
  participants = cohort.read_participants(root)
  cohort.check_participants(root, list(label_files), participants)
  slice_set = preprocess.load_cohort(root, data_config, require_vertebrae=True, progress=progress)
  levels = scoring.cohort_levels(slice_set.labels, slice_set.score_roi, slice_set.subject_ids,
                                 {f.subject_id: f.vertebrae or f.label for f in files},
                                 vertebrae=slice_set.vertebrae)
  return PreparedCohort(root=root, slice_set=slice_set, participants=participants,
                        levels=levels, label_files=label_files)


def evaluate_checkpoint(workdir: str | os.PathLike, data_dir: str | os.PathLike,
                        out_dir: str | os.PathLike | None, *, step: int | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, name: str | None = None,
                        prepared: PreparedCohort | None = None,
                        overrides: Sequence[str] = (), overwrite: bool = False,
                        verbose: bool = True,
                        threshold_from: str | os.PathLike | None = None
                        ) -> analysis.CohortResult:
  """Evaluates one checkpoint on one cohort; writes everything to `out_dir` (None: nothing).

  `overrides` (`section.key=value`, see `apply_scoring_overrides`) change the scoring settings
  recorded with the run, e.g. `evaluation.residual=absolute` or `evaluation.num_samples=10`.
  `out_dir` follows `output_guard.check_output_dir` (checked before any work): it may not be,
  lie inside or contain the workdir or the cohort, and an existing non-empty `out_dir` is
  replaced only when it is a previous evaluation and `overwrite` is set.
  `threshold_from`: an earlier evaluation's directory whose recorded threshold is applied instead
  of one computed from this cohort (`thresholds.load_recorded`; checked before the MC maps).

  Raises:
    UsageError / InputError: an output directory that may not be written (nothing written).
    CheckpointError: missing / damaged workdir or checkpoint (nothing written).
    LabelError and other InputErrors: bad cohort, e.g. no vertebral labels (nothing written).
  """
  from u2ad_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  log = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if verbose else None
  workdir = os.fspath(workdir)
  if out_dir is not None:
    output_guard.check_output_dir(out_dir, "evaluate", overwrite=overwrite,
                                  protected={"--workdir": workdir, "--data": data_dir,
                                             "--threshold-from": threshold_from})
  try:
    model, params, config, restored_step = checkpoint.restore_for_eval(workdir, step)
  except (OSError, ValueError, KeyError) as e:
    # Unreadable files and malformed contents are the workdir's fault; anything else is a bug
    # and keeps its traceback.
    raise errors.CheckpointError(workdir, f"cannot restore ({type(e).__name__}: {e})") from e
  config = apply_scoring_overrides(config, overrides)
  if prepared is None:
    prepared = prepare_cohort(data_dir, config.data, progress=verbose)
  slice_set = prepared.slice_set
  _check_image_size(slice_set, model, prepared.root)
  settings = EvalSettings.from_config(config)
  if log:
    log(f"restored {workdir} step {restored_step}; {len(slice_set)} slices of "
        f"{len(slice_set.subjects)} subjects")
  num_samples = settings.num_samples or int(
      _section(config, "uncertainty").get("num_samples", 10))
  name = name or os.path.basename(os.path.normpath(workdir))
  variant = _section(config, "model").get("variant")
  provenance = {
      "model": {"name": name, "workdir": os.path.abspath(workdir), "variant": variant,
                "stages": _stages(config)},
      "checkpoint_step": restored_step,
      "num_samples": num_samples,
      "anomaly_map": anomaly_lib.describe(settings.residual),
      "curve": settings.describe_curve(),
      "segment_scores": settings.describe_segments(),
      "cohort": os.path.abspath(prepared.root),
      "postprocess": dataclasses.asdict(settings.postprocess),
  }
  rule = settings.rule
  if threshold_from is not None:
    if settings.segment_norm != "none":
      # Per-level z needs the cohort's own statistics, which a lone later scan does not have.
      raise errors.UsageError(f"--threshold-from with evaluation.segment_norm="
                              f"{settings.segment_norm!r}: per-level scores need a cohort; "
                              f"set evaluation.segment_norm=none")
    rule = thresholds.load_recorded(threshold_from, provenance)
  maps = model_maps(model, params, config, slice_set.images, slice_set.train_roi,
                    batch_size=batch_size, num_samples=num_samples, progress=log)
  anomaly = anomaly_lib.anomaly_maps(slice_set.images, maps["mean"], slice_set.score_roi,
                                     slice_set.subject_ids, settings.residual)
  result = analysis.analyse(
      name, images=slice_set.images, labels=slice_set.labels, score_roi=slice_set.score_roi,
      slice_subjects=slice_set.subject_ids, anomaly=anomaly,
      postprocess_params=settings.postprocess, rule=rule, reduction=settings.reduction,
      curve_window=settings.curve_window, segment_norm=settings.segment_norm,
      participants=prepared.participants, levels=prepared.levels, eu=maps["eu"],
      recon=maps["mean"], info=provenance)
  if out_dir is not None:
    header = [f"- Model: `{name}` ({variant}), checkpoint step {restored_step}, "
              f"K = {provenance['num_samples']} MC reconstructions per patch; "
              f"{provenance['anomaly_map']}.",
              f"- Cohort: `{prepared.root}` ({len(slice_set)} slices)."]
    with staged_directory(out_dir) as staging:
      write_all(staging, result, slice_set, provenance, header)
    if log:
      log(f"wrote {os.path.abspath(os.fspath(out_dir))}")
  return result


def evaluate_intensity(prepared: PreparedCohort, settings: EvalSettings,
                       out_dir: str | os.PathLike | None = None, *,
                       overwrite: bool = False) -> analysis.CohortResult:
  """The cord-intensity rung through the same scoring code (and outputs, when `out_dir`; the
  same output rule as `evaluate_checkpoint`)."""
  from u2ad_jax.evaluation import intensity_baseline  # pylint: disable=g-import-not-at-top

  if out_dir is not None:
    output_guard.check_output_dir(out_dir, "evaluate", overwrite=overwrite,
                                  protected={"--data": prepared.root})
  s = prepared.slice_set
  maps = intensity_baseline.intensity_maps(s.images, s.score_roi, s.subject_ids)
  provenance = {"model": {"name": "intensity", "variant": None,
                          "description": "cord intensity / subject median cord intensity - 1"},
                "checkpoint_step": None, "cohort": os.path.abspath(prepared.root),
                "anomaly_map": "anomaly = max(x / the subject's median cord intensity - 1, 0) "
                               "inside the eroded cord",
                "curve": settings.describe_curve(),
                "segment_scores": settings.describe_segments()}
  result = analysis.analyse(
      "intensity", images=s.images, labels=s.labels, score_roi=s.score_roi,
      slice_subjects=s.subject_ids, anomaly=maps, postprocess_params=settings.postprocess,
      rule=settings.rule, reduction=settings.reduction,
      curve_window=settings.curve_window, segment_norm=settings.segment_norm,
      participants=prepared.participants, levels=prepared.levels, info=provenance)
  if out_dir is not None:
    header = ["- Rung: cord-intensity threshold (no learning): anomaly = max(x / median cord "
              "intensity of the subject - 1, 0) inside the eroded cord.",
              f"- Cohort: `{prepared.root}` ({len(s)} slices)."]
    with staged_directory(out_dir) as staging:
      write_all(staging, result, s, provenance, header)
  return result


def _stages(config: Any) -> list[str]:
  stages = config.get("stages") if hasattr(config, "get") else None
  if stages is None:
    return []
  return [stages] if isinstance(stages, str) else [str(v) for v in stages]


def _check_image_size(slice_set: Any, model: Any, root: str) -> None:
  size = getattr(model, "image_size", None)
  if size is not None and tuple(slice_set.image_shape) != (int(size), int(size)):
    raise errors.InputError(root, f"cohort slices are {slice_set.image_shape} but the model "
                                  f"expects {size} x {size}")
