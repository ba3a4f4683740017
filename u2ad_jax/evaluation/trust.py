"""Where an evaluation's numbers cannot be fully trusted: one-line warnings.

Each warning is one line, printed by `u2ad evaluate` on stderr and written at the top of
report.md and into summary.json; none stops the evaluation (the numbers may still be what the
user wants, e.g. a first look at one scan), but none is silent either:

- cohort (`cohort_warnings`): a vertebral level cut by the field of view (its centroid, and the
  segment bounds it sets, are off its centre: `levels.partial_levels`); a cord tilted against
  the image rows beyond `levels.MAX_TILT_DEGREES` (segments are row bands between centroids).
- threshold (`threshold_warnings`): computed from fewer than MIN_THRESHOLD_PATIENTS patients (a
  median and robust sigma of a few segment scores); degenerate (robust sigma 0: every pooled
  score equal; `thresholds.load_recorded` refuses to reuse it); recorded on another kind of
  cohort (phantom vs real) or with another masking ROI, or itself from too few patients.
- model (`model_warnings`): a checkpoint taken before the end of the run's final stage; a model
  trained on another kind of cohort, or with another masking ROI, than the evaluated one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from u2ad_jax.data import cohort as cohort_lib
from u2ad_jax.data import levels as levels_lib
from u2ad_jax.evaluation import thresholds

# Below this many patients the threshold's median and robust sigma rest on a handful of segment
# scores (one patient: 6); the demo cohorts have 24, the paper's clinical cohort more.
MIN_THRESHOLD_PATIENTS = 10


# A cohort-level warning names at most this many patients (then "+ N more"): one line each.
MAX_NAMED_PATIENTS = 5


def _patients(entries: list[str]) -> str:
  shown = ", ".join(entries[:MAX_NAMED_PATIENTS])
  more = len(entries) - MAX_NAMED_PATIENTS
  return shown + (f" + {more} more" if more > 0 else "")


def cohort_warnings(slice_set: Any, levels: Mapping[str, levels_lib.VertebralLevels]
                    ) -> list[str]:
  """Levels cut by the field of view and tilted cords (model grid): one line per kind of
  problem, naming the patients."""
  from u2ad_jax.data import slice_geometry  # pylint: disable=g-import-not-at-top

  cut_levels, tilted = [], []
  for sid in slice_set.subjects:
    positions = slice_set.indices_of(sid)
    geometry = slice_set.geometries.get(sid)
    pixel_mm = 1.0
    if geometry is not None:
      pixel_mm = float(geometry.fov_mm) / float(geometry.image_size)
      lv = levels.get(sid)
      if lv is not None and lv.method == "identity":
        rows_in_view = slice_geometry.model_inside(geometry).any(axis=1)
        margin = int(math.ceil(levels_lib.PARTIAL_LEVEL_MARGIN_MM / pixel_mm - 1e-9))
        cut = levels_lib.partial_levels(slice_set.vertebrae[positions], rows_in_view, margin)
        if cut:
          cut_levels.append(f"{sid} {'/'.join(cut)}")
    tilt = levels_lib.tilt_degrees(slice_set.score_roi[positions], (1.0, pixel_mm, pixel_mm),
                                   axis=1)
    if tilt > levels_lib.MAX_TILT_DEGREES:
      tilted.append(f"{sid} {tilt:.0f} degrees")
  out = []
  if cut_levels:
    out.append(f"levels cut by the field of view (within {levels_lib.PARTIAL_LEVEL_MARGIN_MM:g} "
               f"mm of its end: centroid and segment bounds off the level's centre): "
               f"{_patients(cut_levels)}")
  if tilted:
    out.append(f"cord tilted more than {levels_lib.MAX_TILT_DEGREES:g} degrees against the "
               f"image's S-I axis (segments are row bands between level centroids and may be "
               f"misnamed; reslice the scan along the cord): {_patients(tilted)}")
  return out


def threshold_warnings(decisions: thresholds.Decisions, num_patients: int,
                       cohort_kind: str | None = None, roi: str | None = None) -> list[str]:
  """Warnings about the decision threshold (see the module docstring)."""
  rule = decisions.rule
  out = []
  if isinstance(rule, thresholds.RecordedThreshold):
    if 0 < rule.num_patients < MIN_THRESHOLD_PATIENTS:
      out.append(f"the recorded threshold ({rule.source}) was computed from "
                 f"{rule.num_patients} patient(s), fewer than {MIN_THRESHOLD_PATIENTS}: its "
                 f"median and robust sigma are unreliable")
    if rule.cohort_kind and cohort_kind and not cohort_lib.same_kind(rule.cohort_kind,
                                                                     cohort_kind):
      out.append(f"the threshold was recorded on a {rule.cohort_kind} cohort ({rule.source}) "
                 f"and is applied to {cohort_kind}: scores of another kind of image are on "
                 f"another scale")
    if rule.roi and roi and rule.roi != roi:
      out.append(f"the threshold was recorded with the masking ROI '{rule.roi}', this cohort "
                 f"has '{roi}': reconstructions, and so scores, differ")
    return out
  if num_patients < MIN_THRESHOLD_PATIENTS:
    out.append(f"threshold computed from this cohort's {num_patients} patient(s), fewer than "
               f"{MIN_THRESHOLD_PATIENTS}: its median and robust sigma rest on a few segment "
               f"scores; apply one recorded on a larger cohort of the same checkpoint "
               f"(--threshold-from)")
  if decisions.sigma == 0.0:
    out.append(f"degenerate threshold: every pooled score equals {decisions.median:.4g} (robust "
               f"sigma 0), so nothing here exceeds it and it cannot be reused with "
               f"--threshold-from (it would flag every higher score of a later scan)")
  return out


def checkpoint_warning(meta: Mapping[str, Any] | None, config: Any, step: int) -> str | None:
  """A warning when checkpoint `step` (its `meta`: stage, epoch) precedes the end of the run's
  final stage; None when it is the final model or the position is unknown."""
  if not meta or "stage" not in meta:
    return None
  stages = config.get("stages") if hasattr(config, "get") else None
  stages = [stages] if isinstance(stages, str) else list(stages or [])
  if not stages:
    return None
  final = str(stages[-1])
  epochs = int(config.stage_epochs[final]) if final in config.stage_epochs else None
  stage, epoch = str(meta["stage"]), int(meta.get("epoch", 0))
  if stage == final and (epochs is None or epoch >= epochs):
    return None
  where = f"stage {stage}, epoch {epoch}" + (f" of {int(config.stage_epochs[stage])}"
                                             if stage in config.stage_epochs else "")
  return (f"checkpoint step {step} is from {where}, before the end of the final stage {final}: "
          f"not the model the run trains; evaluate the latest checkpoint once training is done")


def model_warnings(config: Any, cohort_kind: str, roi: str) -> list[str]:
  """Warnings when the evaluated cohort is another kind of image, or has another masking ROI,
  than the cohort the model was adapted on (config.data.clinical_dir, else public_dir)."""
  data = config.get("data") if hasattr(config, "get") else None
  train_dir = ""
  for field in ("clinical_dir", "public_dir"):
    value = data.get(field) if data is not None and hasattr(data, "get") else None
    if isinstance(value, str) and value:
      train_dir = value
      break
  if not train_dir:
    return []
  out = []
  trained_on = cohort_lib.cohort_kind(train_dir)
  if not cohort_lib.same_kind(trained_on, cohort_kind):
    out.append(f"the model was trained on a {trained_on} cohort ({train_dir}) and is applied to "
               f"{cohort_kind}: its reconstructions of this kind of image are untested")
  has_csf = cohort_lib.first_subject_has_csf(train_dir)
  if has_csf is not None and cohort_lib.roi_definition(has_csf) != roi:
    out.append(f"the masking ROI differs from training: '{roi}' here, "
               f"'{cohort_lib.roi_definition(has_csf)}' in {train_dir}")
  return out


def has_csf(slice_set: Any) -> bool:
  """Whether a loaded cohort's slices carry the CSF label (its masking ROI includes CSF)."""
  from u2ad_jax import labels as label_values  # pylint: disable=g-import-not-at-top
  return bool(np.any(slice_set.labels == label_values.CSF))
