"""Cord coordinates of the phantom's in-plane grid.

Every structure of the anatomy (`anatomy`) is a profile along the cord; the renderer evaluates
it per pixel through the pixel's cord coordinates: `s`, the arc length along the centreline (0
at the dens tip), and `t`, the signed distance from the centreline (posterior positive).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from u2ad_jax.phantom import anatomy as pa

@dataclasses.dataclass
class Frame:
  """Per-pixel cord coordinates of the subject's in-plane grid (shared by all slices).

  Attributes:
    pixel: in-plane pixel size (mm).
    s, t: `[H, W]` float32 cord coordinates (mm) of each pixel (rows S->I, cols A->P).
    index: `[H, W]` int32 index of s into `pa.S_GRID`.
    z: `[H]` row positions (mm from the top of the field of view).
  """
  pixel: float
  s: np.ndarray
  t: np.ndarray
  index: np.ndarray
  z: np.ndarray
  _cache: dict = dataclasses.field(default_factory=dict)

  def g(self, profile: np.ndarray, key: str | None = None) -> np.ndarray:
    """Gathers an s-profile at every pixel (cached by key)."""
    if key is not None and key in self._cache:
      return self._cache[key]
    value = profile[self.index]
    if key is not None:
      self._cache[key] = value
    return value


def make_frame(anatomy: pa.Anatomy, rows: int, cols: int, pixel: float) -> Frame:
  """Cord coordinates of every pixel: nearest point on the centreline (Newton on its foot point)."""
  z = (np.arange(rows, dtype=np.float64) + 0.5) * pixel
  y = (np.arange(cols, dtype=np.float64) + 0.5) * pixel
  zz, yy = np.meshgrid(z, y, indexing="ij")
  c = np.polynomial.Polynomial(anatomy.centreline)
  dc, ddc = c.deriv(1), c.deriv(2)
  foot = zz.copy()
  for _ in range(3):
    yc, d1, d2 = c(foot), dc(foot), ddc(foot)
    f = (zz - foot) + (yy - yc) * d1
    fp = -1.0 - d1 * d1 + (yy - yc) * d2
    foot = foot - f / fp
  yc, d1 = c(foot), dc(foot)
  t = ((yy - yc) - (zz - foot) * d1) / np.sqrt(1.0 + d1 * d1)
  # Arc length along the centreline, 0 at the dens tip.
  zs = np.linspace(-200.0, z[-1] + 200.0, 4001)
  speed = np.sqrt(1.0 + dc(zs) ** 2)
  arc = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(zs))])
  arc -= np.interp(anatomy.s_of_dens, zs, arc)
  s = np.interp(foot, zs, arc)
  index = np.clip(np.rint((s - pa.S_MIN) / pa.S_STEP), 0, pa.S_GRID.size - 1).astype(np.int32)
  return Frame(pixel=pixel, s=s.astype(np.float32), t=t.astype(np.float32), index=index,
               z=z.astype(np.float32))
