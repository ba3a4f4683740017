"""Host-side anomaly-candidate selection: percentile threshold + connected components.

One operator serves two purposes with different parameters:
- AU-guided masking (docs/method.md, section 4): on the aleatoric map inside the scoring ROI, keep the
  top 3 components (8-connected, >= 2 pixels) of the pixels at or above the 90th percentile of the
  non-zero values; patches touching them are never masked (`candidate_patches`).
- Postprocessing of anomaly maps (section 8): the same thresholding, its own parameters, usually
  keeping every component (`threshold_components(..., top_k=None)`).

`top_k` has one meaning everywhere (here, `config.candidates.top_k`, `config.postprocess.top_k`):
a positive count keeps the strongest `top_k` components and `None` keeps all of them. 0 and
negative values are rejected: "keep none" would silently switch AU guidance or postprocessing off,
and "0 = all" surprises anyone who reads it as a count.

Everything here is numpy / scipy.ndimage and runs on the host when the maps are regenerated; the
result enters the jitted train step as a per-patch boolean.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity: diagonal neighbours belong to the same component.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def check_params(percentile: float, min_size: int, top_k: int | None) -> None:
  """Raises ValueError (naming the parameter) for settings `kept_components` cannot use."""
  if not 0.0 <= float(percentile) <= 100.0:  # NaN fails this too
    raise ValueError(f"percentile must be in [0, 100], got {percentile}")
  if int(min_size) < 1:
    raise ValueError(f"min_size must be >= 1, got {min_size}")
  if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or int(top_k) < 1):
    raise ValueError(f"top_k must be a count >= 1, or None to keep every component; got {top_k!r}")


def kept_components(value_map: np.ndarray, roi: np.ndarray, percentile: float = 90.0,
                    min_size: int = 2, top_k: int | None = 3) -> np.ndarray:
  """`[H, W]` map and ROI -> `[H, W]` bool union of the selected components.

  1. Restrict the map to the ROI (outside = 0).
  2. Threshold `t` = the `percentile` (numpy linear interpolation) of the NON-ZERO values inside
     the ROI; pixels in the ROI with value >= t and > 0 are foreground (>= so a flat map still
     selects something).
  3. 8-connected components of the foreground; drop those with fewer than `min_size` pixels.
  4. Rank by mean value x total value (= total^2 / size, large bright blobs first; ties keep the
     scan order of scipy's labelling) and keep the first `top_k` (>= 1; `None` keeps all).

  A map with no positive value inside the ROI selects nothing.
  """
  check_params(percentile, min_size, top_k)
  values = np.asarray(value_map, dtype=np.float64)
  roi = np.asarray(roi, dtype=bool)
  if values.ndim != 2 or values.shape != roi.shape:
    raise ValueError(f"map {values.shape} and roi {roi.shape} must be the same [H, W] shape")
  values = np.where(roi & np.isfinite(values), values, 0.0)
  positive = values > 0
  if not positive.any():
    return np.zeros(values.shape, dtype=bool)
  threshold = np.percentile(values[positive], float(percentile))
  foreground = positive & (values >= threshold)
  labels, num = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
  if num == 0:
    return np.zeros(values.shape, dtype=bool)
  index = np.arange(1, num + 1)
  sizes = ndimage.sum_labels(np.ones_like(values), labels, index)
  totals = ndimage.sum_labels(values, labels, index)
  big_enough = sizes >= int(min_size)
  scores = np.where(big_enough, totals * totals / np.maximum(sizes, 1), -np.inf)
  order = np.argsort(-scores, kind="stable")
  order = order[big_enough[order]]
  if top_k is not None:
    order = order[:int(top_k)]
  return np.isin(labels, index[order])


def threshold_components(value_map: np.ndarray, roi: np.ndarray, percentile: float,
                         min_size: int, top_k: int | None = None) -> np.ndarray:
  """Postprocessed map `[H, W]` float32: the map's values inside the kept components, 0 elsewhere.

  Same operator as the AU candidates (`kept_components`) with its own parameters;
  `top_k=None` keeps every component that passes the size filter.
  """
  kept = kept_components(value_map, roi, percentile, min_size, top_k)
  return np.where(kept, np.asarray(value_map, dtype=np.float32), np.float32(0.0))


def select_candidates(au: np.ndarray, score_roi: np.ndarray, percentile: float = 90.0,
                      min_size: int = 2, top_k: int | None = 3) -> np.ndarray:
  """AU anomaly candidates of one slice: `au [H, W]`, `score_roi [H, W]` bool -> `[H, W]` bool.

  The top `top_k` components of the AU map restricted to the scoring ROI (see
  `kept_components`).
  """
  return kept_components(au, score_roi, percentile, min_size, top_k)


def select_candidates_batch(au: np.ndarray, score_roi: np.ndarray, percentile: float = 90.0,
                            min_size: int = 2, top_k: int | None = 3) -> np.ndarray:
  """`au [B, H, W]`, `score_roi [B, H, W]` -> `[B, H, W]` bool candidates per slice."""
  au = np.asarray(au)
  score_roi = np.asarray(score_roi, dtype=bool)
  if au.ndim != 3 or au.shape != score_roi.shape:
    raise ValueError(f"au {au.shape} and score_roi {score_roi.shape} must be the same [B, H, W]")
  out = np.zeros(au.shape, dtype=bool)
  for i in range(au.shape[0]):
    out[i] = select_candidates(au[i], score_roi[i], percentile, min_size, top_k)
  return out


def candidate_patches(cands: np.ndarray, patch_size: int) -> np.ndarray:
  """`[B, H, W]` bool candidates -> `[B, N]` bool: True where the patch touches a candidate.

  Row-major patch grid, identical to `patches.patch_any` (numpy, host side).
  """
  cands = np.asarray(cands, dtype=bool)
  if cands.ndim != 3:
    raise ValueError(f"cands must be [B, H, W], got {cands.shape}")
  b, h, w = cands.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {(h, w)} is not a multiple of patch size {patch_size}")
  gh, gw = h // patch_size, w // patch_size
  blocks = cands.reshape(b, gh, patch_size, gw, patch_size)
  return blocks.any(axis=(2, 4)).reshape(b, gh * gw)
