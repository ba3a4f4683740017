"""Rung (a) of the comparison ladder: a cord-intensity threshold, no learning.

T2 hyperintensities are brighter than the surrounding cord, so the simplest detector calls the
cord's brightest pixels anomalous. Its anomaly map is the intensity relative to the subject's
median cord intensity, `max(x / median_cord(x) - 1, 0)` inside the scoring ROI (0 = at or below
the typical cord signal; 0.5 = 50 % brighter), and everything after that (postprocessing, curves,
levels, scores, the unsupervised threshold, metrics) is the same code as for the learnt rungs.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from u2ad_jax.evaluation import scoring
from u2ad_jax.evaluation import settings as settings_lib
from u2ad_jax.evaluation.rungs import base

MAP_DESCRIPTION = ("anomaly = max(x / the subject's median cord intensity - 1, 0) inside the "
                   "eroded cord")


def intensity_maps(images: np.ndarray, score_roi: np.ndarray,
                   subject_ids: Sequence[str]) -> np.ndarray:
  """`[S, H, W]` images and scoring ROIs -> `[S, H, W]` float32 relative-intensity maps.

  The median is taken over all scoring-ROI pixels of the subject's slices, so one bright slice
  does not normalise itself away.
  """
  images = np.asarray(images, dtype=np.float32)
  score_roi = np.asarray(score_roi, dtype=bool)
  out = np.zeros_like(images)
  for _, pos in scoring.subject_positions(subject_ids).items():
    roi = score_roi[pos]
    if not roi.any():
      continue
    median = float(np.median(images[pos][roi]))
    if median <= 0:
      continue  # a black cord carries no contrast to compare with
    relative = np.maximum(images[pos] / median - 1.0, 0.0)
    out[pos] = np.where(roi, relative, 0.0)
  return out


class IntensityRung:
  """Rung (a) through the shared driver (`base.evaluate`); needs nothing but the cohort."""
  name = "intensity"

  def maps(self, prepared: base.PreparedCohort,
           settings: settings_lib.EvalSettings) -> base.RungMaps:
    s = prepared.slice_set
    provenance = {"model": {"name": "intensity", "variant": None,
                            "description": "cord intensity / subject median cord intensity - 1"},
                  "checkpoint_step": None, "cohort": os.path.abspath(prepared.root),
                  "anomaly_map": MAP_DESCRIPTION,
                  "curve": settings.describe_curve(),
                  "segment_scores": settings.describe_segments()}
    header = ["- Rung: cord-intensity threshold (no learning): anomaly = max(x / median cord "
              "intensity of the subject - 1, 0) inside the eroded cord.",
              f"- Cohort: `{prepared.root}` ({len(s)} slices)."]
    return base.RungMaps(anomaly=intensity_maps(s.images, s.score_roi, s.subject_ids),
                         provenance=provenance, header=header)
