"""Lesions of the real-anatomy pseudo-patients: ellipsoids in the cord, contrast solved exactly.

A lesion is an ellipsoid along the local cord direction, drawn on the middle slice's cord and
extended laterally over 1-3 slices, kept inside its segment's rows (so it marks its own segment
only); grade 1 gets a fuzzy border, grade 2 a sharp one. Its contrast is measured like the
phantom's (`contrast`: lesion / local-cord ratio with the same margins and CSF reference) and
solved exactly for the target ratio, since the ratio is a linear-fractional function of the
added intensity.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from u2ad_jax import labels as L
from u2ad_jax.phantom import contrast

def _cord_centre(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per row: cord centre column (NaN where no cord) and cord AP width (pixels)."""
  cord = np.isin(labels, L.CORD_LABELS)
  width = cord.sum(axis=1).astype(np.float64)
  cols = np.arange(labels.shape[1], dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    centre = (cord * cols).sum(axis=1) / width
  return centre, width


def draw_lesion_shape(rng, volume_labels, segment, centroids, pixel, grade, spacing):
  """Weights `[X, H, W]` (1 inside, soft border for grade 1) and the ellipsoid mask, or None.

  Drawn on the middle slice's cord; each slice keeps only its own cord voxels.
  """
  num_slices = volume_labels.shape[0]
  labels = volume_labels[num_slices // 2]
  centre_col, width = _cord_centre(labels)
  top, bottom = centroids[segment], centroids[segment + 1]
  # Centre rows at least 4 px inside the segment, so a lesion of >= 2 px half-extent fits.
  rows = np.arange(int(np.ceil(top + 4)), int(np.floor(bottom - 4)) + 1)
  rows = rows[(rows >= 0) & (rows < labels.shape[0])]
  rows = rows[(width[rows] >= 3) & (labels[rows] == L.CORD).any(axis=1)]
  if rows.size == 0:
    return None
  r0 = float(rng.choice(rows))
  c0 = float(centre_col[int(r0)])
  half_len = rng.uniform(3.0, 15.0) / pixel / 2.0
  half_ap = min(rng.uniform(0.75, 2.0) / pixel, 0.3 * width[int(r0)])
  half_lat = rng.uniform(2.0, 5.0)  # mm
  # Local cord direction from the centreline over +-10 mm.
  span = np.arange(max(int(r0 - 10 / pixel), 0), min(int(r0 + 10 / pixel), labels.shape[0] - 1) + 1)
  good = np.isfinite(centre_col[span])
  slope = np.polyfit(span[good], centre_col[span][good], 1)[0] if good.sum() >= 3 else 0.0
  norm = np.hypot(1.0, slope)
  along = np.array([1.0, slope]) / norm
  across = np.array([-slope, 1.0]) / norm
  # Kept 1 px inside the segment's rows (the ellipse's row extent is sqrt((a along_r)^2 +
  # (b across_r)^2)), so the lesion marks its own segment only.
  room_rows = min(r0 - top - 1.0, bottom - r0 - 2.0)
  half_ap = min(half_ap, 0.7 * room_rows / max(abs(across[0]), 1e-6))
  extent = np.hypot(half_len * along[0], half_ap * across[0])
  if extent > room_rows:
    half_len = np.sqrt(max(room_rows ** 2 - (half_ap * across[0]) ** 2, 1.0)) / along[0]
  rr, cc = np.meshgrid(np.arange(labels.shape[0], dtype=np.float64),
                       np.arange(labels.shape[1], dtype=np.float64), indexing="ij")
  u = (rr - r0) * along[0] + (cc - c0) * along[1]
  v = (rr - r0) * across[0] + (cc - c0) * across[1]
  q2d = (u / half_len) ** 2 + (v / half_ap) ** 2
  positions = (np.arange(num_slices) - (num_slices - 1) / 2.0) * spacing
  weights = np.zeros((num_slices,) + labels.shape, np.float32)
  masks = np.zeros((num_slices,) + labels.shape, bool)
  for i, x in enumerate(positions):
    room = 1.0 - (x / half_lat) ** 2
    if room <= 0.05:
      continue
    q = q2d / room
    if grade == 1:
      w = np.exp(-2.0 * np.maximum(q - 0.5, 0.0)) * (q < 2.5)  # fuzzy border
    else:
      w = ndimage.gaussian_filter((q <= 1.0).astype(np.float64), 0.5)
    cord = volume_labels[i] == L.CORD
    weights[i] = (w * cord).astype(np.float32)
    masks[i] = (q <= 1.0) & cord
  if not masks.any():
    return None
  return weights, masks, dict(row=r0, col=c0, length_mm=2 * half_len * pixel,
                               ap_mm=2 * half_ap * pixel, lateral_mm=2 * half_lat)



def _local_regions(labels: np.ndarray, mask: np.ndarray, pixel: float):
  """(local cord, local CSF) masks of a lesion in `[X, H, W]` slices (phantom's margins)."""
  rows = np.flatnonzero(mask.any(axis=(0, 2)))
  slices = mask.any(axis=(1, 2))
  r = np.arange(labels.shape[1])
  cord_margin, csf_margin = contrast.LOCAL_CORD_MARGIN_MM / pixel, contrast.LOCAL_CSF_MARGIN_MM / pixel
  near = (r >= rows[0] - cord_margin) & (r <= rows[-1] + cord_margin)
  wide = (r >= rows[0] - csf_margin) & (r <= rows[-1] + csf_margin)
  cord = (labels == L.CORD) & slices[:, None, None] & near[None, :, None]
  csf = (labels == L.CSF) & slices[:, None, None] & wide[None, :, None]
  if not csf.any():
    csf = labels == L.CSF
  return cord, csf


def lesion_ratio(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, pixel: float
                 ) -> tuple[float, float]:
  """(lesion / local-cord mean ratio, local CSF 95th percentile / local-cord mean) in `[X, H, W]`."""
  cord, csf = _local_regions(labels, mask, pixel)
  cord_mean = float(image[cord].mean())
  csf_ratio = (float(np.percentile(image[csf], contrast.LOCAL_CSF_PERCENTILE)) / cord_mean
               if csf.any() else float("nan"))
  return float(image[mask].mean()) / cord_mean, csf_ratio


def solve_kappa(image, labels, weights, mask, target, pixel):
  """k such that `image + k * weights` has the lesion / local-cord ratio `target`."""
  cord, _ = _local_regions(labels, mask, pixel)
  # ratio(k) = (a + k b) / (c + k d): linear fractional, solved exactly.
  a, b = float(image[mask].mean()), float(weights[mask].mean())
  c, d = float(image[cord].mean()), float(weights[cord].mean()) if cord.any() else 0.0
  return max((target * c - a) / max(b - target * d, 1e-6), 0.0)

