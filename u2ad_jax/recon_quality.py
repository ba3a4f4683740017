"""Reconstruction quality on normal cord: SSIM, PSNR and reconstruction-image correlation.

The premise of U2AD is that the masked autoencoder reconstructs NORMAL anatomy; these numbers say
how well it does, on the scoring ROI (cord, eroded once) minus any lesion label. They are shared
by the validation during training (`u2ad_jax.train.validation`) and the evaluation's report.
Pure NumPy / SciPy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from u2ad_jax import labels as label_values


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  if size < 3 or size % 2 == 0:
    raise ValueError(f"SSIM window size must be odd and >= 3, got {size}")
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-0.5 * (x / sigma)**2)
  return w / w.sum()


def ssim_map(a: np.ndarray, b: np.ndarray, *, window: int = 11, sigma: float = 1.5,
             data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
  """Per-pixel SSIM (Wang et al. 2004) of two `[H, W]` images with a Gaussian window.

  Local statistics use the normalised Gaussian window (population moments, as in the paper);
  borders are reflected so the map keeps the image's shape.
  """
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"SSIM needs two [H, W] images of one shape, got {a.shape} and {b.shape}")
  w = _gaussian_window(window, sigma)

  def blur(x):
    return ndimage.correlate1d(ndimage.correlate1d(x, w, axis=0, mode="reflect"), w, axis=1,
                               mode="reflect")

  c1 = (k1 * data_range)**2
  c2 = (k2 * data_range)**2
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a * mu_a
  var_b = blur(b * b) - mu_b * mu_b
  cov = blur(a * b) - mu_a * mu_b
  num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
  den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
  return num / den


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, **kwargs) -> float:
  """Mean SSIM of `[H, W]` images in [0, 1], over `mask` (bool [H, W]) when given.

  The window still sees the pixels around the mask (the map is computed on the whole image),
  so the value describes the reconstruction of the masked structure in its context. NaN for an
  empty mask.
  """
  m = ssim_map(a, b, **kwargs)
  if mask is None:
    return float(m.mean())
  mask = np.asarray(mask).astype(bool)
  if mask.shape != m.shape:
    raise ValueError(f"mask {mask.shape} does not match the images {m.shape}")
  if not mask.any():
    return math.nan
  return float(m[mask].mean())


def normal_cord_quality(images: np.ndarray, recon: np.ndarray, score_roi: np.ndarray,
                        labels: np.ndarray | None = None) -> dict[str, float]:
  """Mean over slices of the mean reconstruction's quality on NORMAL cord.

  Args:
    images, recon: `[S, H, W]` inputs and mean reconstructions (clipped to [0, 1] here).
    score_roi: `[S, H, W]` bool scoring ROI (the cord).
    labels: optional `[S, H, W]` label maps; lesion pixels (label 6) are not normal cord.

  Returns:
    'ssim' (the SSIM map averaged over the slice's normal cord; the window sees the context),
    'psnr' (dB, peak 1, of the normal-cord pixels), 'corr' (Pearson correlation of image and
    reconstruction over the normal-cord pixels; 0 for a constant reconstruction, the flat band
    this number exists to catch) and 'num_slices' (slices with normal cord). NaN without any.
  """
  ssims, psnrs, corrs = [], [], []
  for i, (img, rec, roi) in enumerate(zip(images, recon, score_roi)):
    normal = np.asarray(roi, bool)
    if labels is not None:  # a new array: the caller's ROI is never changed
      normal = normal & (np.asarray(labels[i]) != label_values.LESION)
    if not normal.any():
      continue
    img = np.clip(np.asarray(img, np.float64), 0, 1)
    rec = np.clip(np.asarray(rec, np.float64), 0, 1)
    ssims.append(ssim(img, rec, normal))
    error = float(np.mean((img[normal] - rec[normal]) ** 2))
    psnrs.append(10.0 * math.log10(1.0 / max(error, 1e-12)))
    a, b = img[normal], rec[normal]
    corrs.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0)
  if not ssims:
    return {"ssim": math.nan, "psnr": math.nan, "corr": math.nan, "num_slices": 0.0}
  return {"ssim": float(np.mean(ssims)), "psnr": float(np.mean(psnrs)),
          "corr": float(np.mean(corrs)), "num_slices": float(len(ssims))}
