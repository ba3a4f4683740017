"""The anomaly curve along the cord and its segment maxima.

The curve of a slice reduces the postprocessed anomaly map across the cord width, row by row:
`curve[r] = sum_c map[r, c]` (or the max). Rows run superior -> inferior in the model frame, so
the curve is a function of the position along the cord. A subject's curve is the row-wise maximum
over its slices (they share the row grid), so the segment maximum of the subject curve equals the
maximum over slices of the per-slice segment maxima.
"""

from __future__ import annotations

import numpy as np

from u2ad_jax.evaluation import levels as levels_lib

REDUCTIONS = ("sum", "max")


def anomaly_curve(maps: np.ndarray, reduction: str = "sum") -> np.ndarray:
  """`[..., H, W]` non-negative map -> `[..., H]` curve (reduce over the width)."""
  maps = np.asarray(maps, dtype=np.float64)
  if reduction == "sum":
    return maps.sum(axis=-1)
  if reduction == "max":
    return maps.max(axis=-1)
  raise ValueError(f"unknown curve reduction {reduction!r}; expected one of {REDUCTIONS}")


def segment_maxima(curve: np.ndarray,
                   levels: levels_lib.VertebralLevels) -> tuple[np.ndarray, np.ndarray]:
  """Segment scores of a `[H]` curve.

  Returns:
    (scores [6] float, peak_rows [6] int): the maximum of the curve over each segment's rows and
    the row where it occurs (the first such row); a segment without rows scores 0 at its start.
  """
  curve = np.asarray(curve, dtype=np.float64)
  row_segment = levels.row_segments(curve.shape[0])
  scores = np.zeros(levels_lib.NUM_SEGMENTS, dtype=np.float64)
  peaks = np.zeros(levels_lib.NUM_SEGMENTS, dtype=np.int64)
  for seg in range(levels_lib.NUM_SEGMENTS):
    rows = np.flatnonzero(row_segment == seg)
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
