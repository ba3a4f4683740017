"""Lesion contrast of the phantom: the measured lesion / local-cord ratio and its solver.

Each lesion's contrast is solved so that its lesion / local-cord ratio, measured in the
noise-free image, hits the target drawn for its grade (grade 1: faint and fuzzy; grade 2: sharp
and below the local CSF). The same measurement, margins and windows serve the real-anatomy
pseudo-patients (`pseudo_lesions`), so both benchmarks grade lesions alike.
"""

from __future__ import annotations

import numpy as np

from u2ad_jax import labels as L
from u2ad_jax.phantom import acquire as acq

# Lesion contrast windows: lesion / local-cord ratio per grade.
GRADE_RATIO = {1: (1.2, 1.5), 2: (1.5, 2.2)}
# The local cord of a lesion: cord voxels of the lesion's slices within this margin (mm) of its
# superior-inferior extent; the local CSF reference uses a wider margin.
LOCAL_CORD_MARGIN_MM = 10.0
LOCAL_CSF_MARGIN_MM = 20.0
LOCAL_CSF_PERCENTILE = 95.0
# Grade-2 lesions stay below this fraction of the local CSF reference.
CSF_HEADROOM = 0.95


def _lesion_regions(labels: np.ndarray, lesion_ids: np.ndarray, index: int, pixel: float):
  """Boolean masks (lesion, local cord, local CSF) of one lesion in `[X, H, W]` model slices."""
  lesion = lesion_ids == index
  if not lesion.any():
    return None
  slices = lesion.any(axis=(1, 2))
  rows = np.flatnonzero(lesion.any(axis=(0, 2)))
  r = np.arange(labels.shape[1])
  near = (r >= rows[0] - LOCAL_CORD_MARGIN_MM / pixel) & (r <= rows[-1] + LOCAL_CORD_MARGIN_MM / pixel)
  wide = (r >= rows[0] - LOCAL_CSF_MARGIN_MM / pixel) & (r <= rows[-1] + LOCAL_CSF_MARGIN_MM / pixel)
  cord = (labels == L.CORD) & slices[:, None, None] & near[None, :, None]
  csf = (labels == L.CSF) & slices[:, None, None] & wide[None, :, None]
  if not csf.any():
    csf = labels == L.CSF
  return lesion, cord, csf


def lesion_contrast(clean: np.ndarray, labels: np.ndarray, lesion_ids: np.ndarray, index: int,
                    pixel: float) -> dict[str, float] | None:
  """Measured contrast of one lesion in a noise-free `[X, H, W]` model-frame volume.

  ratio = mean(clean over the lesion's voxels) / mean(clean over the local cord), where the local
  cord is the cord-labelled (3) voxels of the slices containing the lesion whose rows lie within
  LOCAL_CORD_MARGIN_MM of the lesion's rows. csf_ratio = LOCAL_CSF_PERCENTILE-th percentile of
  the CSF-labelled voxels of those slices within LOCAL_CSF_MARGIN_MM, over the same local cord
  mean. Returns None when the lesion has no voxel.
  """
  regions = _lesion_regions(labels, lesion_ids, index, pixel)
  if regions is None:
    return None
  lesion, cord, csf = regions
  cord_mean = float(clean[cord].mean()) if cord.any() else float("nan")
  return dict(ratio=float(clean[lesion].mean()) / cord_mean,
              csf_ratio=float(np.percentile(clean[csf], LOCAL_CSF_PERCENTILE)) / cord_mean
              if csf.any() else float("nan"),
              voxels=int(lesion.sum()))


def solve_lesion_contrast(base, deltas, labels, lesion_ids, anatomy, signals, gamma, reference, pixel):
  """kappa per lesion such that the lesion's ratio in the noise-free image equals its target.

  The acquired image is linear in the lesion contrast up to the (monotonic) non-linearity, so
  each ratio is a cheap function of the kappas evaluated on the few voxels involved; a few
  secant steps per lesion, swept twice so that neighbouring lesions settle together.
  """
  n = len(anatomy.lesions)
  kappa = np.zeros(n)
  info = [dict(target=float(les.target_ratio)) for les in anatomy.lesions]
  if n == 0:
    return kappa, info
  # Tissue-level cap: about as bright as CSF (oedema / cystic change); the image-level target
  # keeps grade 2 below the local CSF.
  kappa_max = 1.1 * signals["csf"] / signals["cord"] - 1.0
  regions = [_lesion_regions(labels, lesion_ids, j + 1, pixel) for j in range(n)]
  zero = np.zeros_like(base[0])

  def values(mask):
    b = base[mask]
    d = []
    for j in range(n):
      per_slice = [deltas[j][i] if deltas[j][i] is not None else zero for i in range(base.shape[0])]
      d.append(np.stack(per_slice)[mask])
    return b, d

  cache = []
  for j in range(n):
    if regions[j] is None:
      cache.append(None)
      continue
    lesion, cord, csf = regions[j]
    cache.append((values(lesion), values(cord), values(csf)))

  def measure(j, kap):
    (bl, dl), (bc, dc), (bs, ds) = cache[j]
    def img(b, d):
      lin = b.copy()
      for m in range(n):
        if kap[m] > 0:
          lin += np.float32(kap[m]) * d[m]
      return np.abs(acq.nonlinearity(lin, gamma, reference))
    lesion_v, cord_v, csf_v = img(bl, dl), img(bc, dc), img(bs, ds)
    cord_mean = float(cord_v.mean()) if cord_v.size else 1.0
    return float(lesion_v.mean()) / cord_mean, float(np.percentile(csf_v, LOCAL_CSF_PERCENTILE)) / cord_mean

  for sweep in range(2):
    for j, les in enumerate(anatomy.lesions):
      if cache[j] is None:
        continue
      target = les.target_ratio
      if les.grade == 2:
        # Always below the local CSF: cap the target under the measured local CSF level. Where
        # the CSF around the lesion is too effaced to leave room for a grade-2 contrast (long
        # lesions over several compressed levels), the lesion is made a faint grade-1 one.
        _, csf_ratio = measure(j, kappa)
        cap = CSF_HEADROOM * csf_ratio
        if cap < GRADE_RATIO[2][0] + 0.03:
          les.grade = 1
          target = min(1.25 + 0.2 * (target - 1.6) / 0.5, cap)
          les.target_ratio = target
        else:
          target = float(np.clip(min(target, cap), GRADE_RATIO[2][0] + 0.03, GRADE_RATIO[2][1]))
      info[j]["target"] = target
      k = kappa[j] if kappa[j] > 0 else target - 1.0
      for _ in range(8):
        trial = kappa.copy()
        trial[j] = k
        ratio, _ = measure(j, trial)
        if abs(ratio - target) < 2e-3:
          break
        k = float(np.clip(k * (target - 1.0) / max(ratio - 1.0, 1e-3), 0.0, kappa_max))
      kappa[j] = k
  return kappa, info

