"""What every rung shares: the prepared cohort, the rung's maps, and the scoring driver.

A rung is a class with a `name` and `maps(prepared, settings) -> RungMaps`: it makes one anomaly
map per slice (and says how, for reports and sidecars). Everything after that is the same code
for every rung (`evaluate`): postprocessing, curves, vertebral levels, segment and patient
scores, the unsupervised threshold, metrics (`analysis.analyse`) and the outputs
(`outputs.write_all`, staged so that an error leaves no partial report). Adding a rung is one
module with such a class plus its line in `registry.RUNGS`.

Order of work, chosen so that bad input fails BEFORE anything is computed or written: the
output directory is checked first (`output_guard.check_output_dir`), the cohort is loaded with
`require_vertebrae=True` and every subject's vertebral levels are found (by identity where a
vertebra map exists: segments outside the field of view are n/a; else by counting the seven
bodies C2 ... T1; a subject without them raises LabelError naming its file) before any map.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Protocol

import numpy as np

from u2ad_jax import output_guard
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import outputs
from u2ad_jax.evaluation import scoring
from u2ad_jax.evaluation import settings as settings_lib
from u2ad_jax.evaluation import thresholds
from u2ad_jax.evaluation import trust


@dataclasses.dataclass
class PreparedCohort:
  """A cohort loaded and checked for scoring (levels found).

  Attributes (besides the loaded data): kind (`cohort.cohort_kind`: phantom, real scans, ...),
  roi (`cohort.roi_definition`: the masking ROI its labels give), warnings (`trust.
  cohort_warnings`: levels cut by the field of view, tilted cords), one line each.
  """
  root: str
  slice_set: Any
  participants: dict[str, dict[str, Any]]
  levels: dict[str, Any]
  label_files: dict[str, str]
  kind: str = "unknown"
  roi: str = ""
  warnings: list[str] = dataclasses.field(default_factory=list)


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
                        levels=levels, label_files=label_files, kind=cohort.cohort_kind(root),
                        roi=cohort.roi_definition(trust.has_csf(slice_set)),
                        warnings=trust.cohort_warnings(slice_set, levels))


@dataclasses.dataclass
class RungMaps:
  """One rung's maps of a cohort and how they were made.

  Attributes:
    anomaly: `[S, H, W]` float32 anomaly maps (S = the cohort's slices).
    provenance: model / checkpoint / map description, recorded in sidecars, summary.json and
      metrics.json (`provenance['anomaly_map']` names the map in the report).
    header: the report's first lines (what the rung is, which cohort).
    eu, recon: `[S, H, W]` epistemic uncertainty and mean reconstruction (None: not made).
    rule: the threshold rule when it is not the settings' (a recorded threshold).
    warnings: the rung's own one-line warnings (`trust.model_warnings`), for the report.
  """
  anomaly: np.ndarray
  provenance: dict[str, Any]
  header: list[str]
  eu: np.ndarray | None = None
  recon: np.ndarray | None = None
  rule: thresholds.ThresholdRule | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)


class Rung(Protocol):
  """A way of making anomaly maps (see the module docstring)."""
  name: str

  def maps(self, prepared: PreparedCohort, settings: settings_lib.EvalSettings
           ) -> RungMaps | None:
    """The cohort's maps; None on the processes of a multi-process job that do not score."""


def evaluate(rung: Rung, prepared: PreparedCohort, settings: settings_lib.EvalSettings,
             out_dir: str | os.PathLike | None = None, *, overwrite: bool = False,
             protected: dict[str, Any] | None = None,
             log: Callable[[str], None] | None = None) -> analysis.CohortResult | None:
  """Scores `rung` on `prepared` and, when `out_dir`, writes its outputs there; returns None
  (nothing scored or written) when the rung returns no maps in this process (the processes
  other than 0 of a multi-process job).

  `out_dir` follows `output_guard.check_output_dir` (checked before the maps): it may not be, lie
  inside or contain the cohort or a `protected` path ({flag: path}), and an existing non-empty
  `out_dir` is replaced only when it is a previous evaluation and `overwrite` is set.

  The result's `warnings` (cohort, rung and threshold: `trust.py`) go to `log` (one call per
  line, prefixed "warning: "), the report and summary.json.
  """
  if out_dir is not None:
    output_guard.check_output_dir(out_dir, "evaluate", overwrite=overwrite,
                                  protected={"--data": prepared.root, **(protected or {})})
  maps = rung.maps(prepared, settings)
  if maps is None:
    return None
  s = prepared.slice_set
  result = analysis.analyse(
      rung.name, images=s.images, labels=s.labels, score_roi=s.score_roi,
      slice_subjects=s.subject_ids, anomaly=maps.anomaly, postprocess_params=settings.postprocess,
      rule=maps.rule or settings.rule, reduction=settings.reduction,
      curve_window=settings.curve_window, segment_norm=settings.segment_norm,
      participants=prepared.participants, levels=prepared.levels, eu=maps.eu, recon=maps.recon,
      info=maps.provenance)
  result.warnings = (list(prepared.warnings) + list(maps.warnings) + trust.threshold_warnings(
      result.decisions, len(result.scores), prepared.kind, prepared.roi))
  # What the threshold was computed on, for a later --threshold-from to compare with.
  provenance = {**maps.provenance, "cohort_kind": prepared.kind, "roi": prepared.roi}
  if log is not None:
    for warning in result.warnings:
      log(f"warning: {warning}")
  if out_dir is not None:
    with outputs.staged_directory(out_dir) as staging:
      outputs.write_all(staging, result, s, provenance, maps.header)
  return result
