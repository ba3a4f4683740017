"""The anomaly curve along the cord and its segment maxima.

The curve of a slice reduces the postprocessed anomaly map across the cord width, row by row:
`curve[r] = sum_c map[r, c]` (or the max), then, with a window of w > 1 rows, sums it over the w
rows centred on r (`config.evaluation.curve_window_mm`, w odd). Rows run superior -> inferior in
the model frame, so the curve is a function of the position along the cord.

Why the window (project decision): a T2 hyperintensity extends along the cord over millimetres,
while the noise of a normal cord is independent from row to row; summing over about a lesion's
length (8 mm by default, less than a segment's ~15 mm) scores extent x intensity instead of one
row's noise maximum. Without it, the per-row maximum over ~100 rows x all slices of a normal
subject competes with the faint lesions.

A subject's curve is the row-wise maximum over its slices (they share the row grid), so the
segment maximum of the subject curve equals the maximum over slices of the per-slice segment
maxima.
"""

from __future__ import annotations

import numpy as np

from u2ad_jax.data import levels as levels_lib

REDUCTIONS = ("sum", "max")


def window_rows(window_mm: float, pixel_mm: float) -> int:
  """The odd number of rows closest to `window_mm` (>= 1; 0 mm = no window)."""
  if window_mm < 0 or pixel_mm <= 0:
    raise ValueError(f"curve window {window_mm} mm at {pixel_mm} mm per row is invalid")
  rows = max(1, int(round(window_mm / pixel_mm)))
  return rows + 1 - rows % 2


def anomaly_curve(maps: np.ndarray, reduction: str = "sum", window: int = 1) -> np.ndarray:
  """`[..., H, W]` non-negative map -> `[..., H]` curve (reduce over the width, then sum over a
  centred window of `window` rows (odd; rows beyond the image count 0))."""
  maps = np.asarray(maps, dtype=np.float64)
  if reduction == "sum":
    curve = maps.sum(axis=-1)
  elif reduction == "max":
    curve = maps.max(axis=-1)
  else:
    raise ValueError(f"unknown curve reduction {reduction!r}; expected one of {REDUCTIONS}")
  window = int(window)
  if window < 1 or window % 2 == 0:
    raise ValueError(f"curve window must be a positive odd number of rows, got {window}")
  if window > 1:
    half = window // 2
    padded = np.pad(curve, [(0, 0)] * (curve.ndim - 1) + [(half, half)])
    cumsum = np.concatenate([np.zeros(curve.shape[:-1] + (1,)), np.cumsum(padded, axis=-1)],
                            axis=-1)
    curve = cumsum[..., window:] - cumsum[..., :-window]
  return curve


def segment_maxima(curve: np.ndarray,
                   levels: levels_lib.VertebralLevels) -> tuple[np.ndarray, np.ndarray]:
  """Segment scores of a `[H]` curve.

  Returns:
    (scores [6] float, peak_rows [6] int): the maximum of the curve over each segment's rows and
    the row where it occurs (the first such row); a segment without rows scores 0 at its start;
    a segment outside the field of view (levels.segments_present) is n/a: NaN at row 0.
  """
  curve = np.asarray(curve, dtype=np.float64)
  row_segment = levels.row_segments(curve.shape[0])
  scores = np.zeros(levels_lib.NUM_SEGMENTS, dtype=np.float64)
  peaks = np.zeros(levels_lib.NUM_SEGMENTS, dtype=np.int64)
  for seg in range(levels_lib.NUM_SEGMENTS):
    rows = np.flatnonzero(row_segment == seg)
    if not levels.segments_present[seg]:
      scores[seg] = np.nan
      continue
    if rows.size == 0:
      peaks[seg] = int(np.clip(np.ceil(levels.centroid_rows[seg]), 0, curve.shape[0] - 1))
      continue
    best = int(np.argmax(curve[rows]))
    scores[seg] = curve[rows[best]]
    peaks[seg] = rows[best]
  return scores, peaks


def cord_reference(curve: np.ndarray, levels: levels_lib.VertebralLevels) -> float:
  """Mean of the curve between the C2 and T1 centroids: the plot's mean-error reference line."""
  rows = np.flatnonzero(levels.row_segments(np.asarray(curve).shape[0]) >= 0)
  return float(np.mean(np.asarray(curve)[rows])) if rows.size else 0.0
