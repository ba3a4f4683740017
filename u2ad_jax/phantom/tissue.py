"""Tissue signal and texture of the phantom's object.

Signal of a tissue: S = PD (1 - exp(-TR / T1)) exp(-TE / T2) with the tissue's PD / T1 / T2
jittered by +-10 % per subject, times 1 + a low-frequency texture of 3-8 % (marrow and fat also
get a finer trabecular / septal texture). The renderer (`render`) paints these signals.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


# Tissue relaxation properties: proton density (relative), T1 and T2 (ms). Literature reference
# values for CSF, cord, disc, desiccated disc and marrow; fat's T2 is set per scanner profile
# (apparent T2 of fat is long in 2D TSE, short in 3D variable-flip-angle sequences).
TISSUES: dict[str, tuple[float, float, float]] = {
    "csf": (0.95, 4273.0, 1578.0),
    "cord": (0.62, 780.0, 102.0),
    "disc_nucleus": (0.80, 1165.0, 102.0),
    "disc_desiccated": (0.62, 554.0, 56.0),
    "annulus": (0.55, 900.0, 48.0),
    "marrow": (0.80, 515.0, 80.0),
    "marrow_posterior": (0.75, 515.0, 80.0),
    "cortex": (0.10, 600.0, 14.0),
    "fat": (1.00, 290.0, 160.0),
    "muscle": (0.80, 1000.0, 38.0),
    "skin": (0.80, 900.0, 60.0),
    "neck_soft": (0.80, 1100.0, 45.0),
    "prevertebral": (0.80, 900.0, 45.0),
    "ligament": (0.30, 600.0, 22.0),
    "protrusion": (0.40, 800.0, 34.0),
    "soft_protrusion": (0.85, 1100.0, 100.0),
    "nerve": (0.72, 1000.0, 78.0),
    "joint": (0.90, 2000.0, 140.0),
    "cerebellum": (0.82, 1100.0, 95.0),
    "thyroid": (0.90, 1000.0, 88.0),
}

# Multiplicative low-frequency texture amplitude per tissue (3-8 %).
TEXTURE = {"csf": 0.03, "cord": 0.03, "marrow": 0.06, "fat": 0.06, "muscle": 0.07, "skin": 0.04,
           "neck_soft": 0.07, "prevertebral": 0.05, "cerebellum": 0.05}


def tissue_signals(rng: np.random.Generator, tr: float, te: float, fat_t2: float,
                   fat_pd: float, marrow_fat: float, muscle_fat: float) -> dict[str, float]:
  """Per-subject tissue signal S = PD (1 - exp(-TR/T1)) exp(-TE/T2), properties jittered +-10 %.

  Bone marrow and muscle are water / fat mixtures (fat fractions `marrow_fat`, higher in the
  posterior elements, and `muscle_fat`, the fatty infiltration of older patients' muscles), so
  they follow the profile's fat contrast: bright in 2D TSE, dark in 3D VFA.
  """
  signals = {}
  for name, (pd_, t1, t2) in TISSUES.items():
    if name == "fat":
      pd_, t2 = fat_pd, fat_t2
    jitter = rng.uniform(0.9, 1.1, 3)
    pd_, t1, t2 = pd_ * jitter[0], t1 * jitter[1], t2 * jitter[2]
    signals[name] = float(pd_ * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2))
  mixtures = (("marrow", marrow_fat), ("marrow_posterior", marrow_fat + 0.12), ("muscle", muscle_fat),
              ("neck_soft", muscle_fat + 0.04), ("prevertebral", muscle_fat + 0.04))
  for name, fraction in mixtures:
    ff = min(fraction, 0.9)
    signals[name] = (1.0 - ff) * signals[name] + ff * signals["fat"]
  return signals


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
  """Unit-variance Gaussian-smoothed white noise `[H, W]` float32 (sigma in pixels)."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
  return field / max(float(field.std()), 1e-6)


def texture_fields(rng: np.random.Generator, shape: tuple[int, int], pixel: float, num_slices: int,
                   slice_spacing: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per-slice texture fields: low frequency (~8 mm) correlated across neighbouring slices,
  and fine (~1.2 mm trabecular) independent per slice. Each is unit-variance float32 `[H, W]`.
  """
  coarse_px = 4.0  # mm per coarse cell
  ch, cw = int(np.ceil(shape[0] * pixel / coarse_px)) + 2, int(np.ceil(shape[1] * pixel / coarse_px)) + 2
  # Lateral correlation: smooth along x over ~6 mm.
  nx = num_slices
  vol = rng.standard_normal((nx, ch, cw)).astype(np.float32)
  sig_x = max(6.0 / max(slice_spacing, 1e-3), 0.01)
  vol = ndimage.gaussian_filter(vol, (sig_x, 2.0, 2.0), mode="wrap")
  low = []
  for i in range(nx):
    zoom = (shape[0] / ch * 1.0001, shape[1] / cw * 1.0001)  # slightly over, then cropped
    up = ndimage.zoom(vol[i], zoom, order=1)[:shape[0], :shape[1]]
    up = up - up.mean()
    low.append((up / max(float(up.std()), 1e-6)).astype(np.float32))
  fine = []
  half = (max(shape[0] // 2, 1), max(shape[1] // 2, 1))
  for _ in range(nx):
    f = smooth_noise(rng, half, max(0.6 / pixel, 0.5))
    zoom = (shape[0] / half[0] * 1.0001, shape[1] / half[1] * 1.0001)
    up = ndimage.zoom(f, zoom, order=1)[:shape[0], :shape[1]]
    fine.append((up / max(float(up.std()), 1e-6)).astype(np.float32))
  return low, fine
