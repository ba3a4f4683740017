"""The model grid of a volume: 1 mm pixels, the field of view, and the exact way back.

In-plane resampling to `pixel_mm` (1 mm) pixels, centre crop or zero pad to `fov_mm` (200 mm),
resize to `image_size` (256 in the paper); the slice thickness is kept (one model slice per
canonical x index). The three steps are affine along each in-plane axis, so they are composed
into ONE map from model pixel to source voxel coordinate and applied by a single interpolation
(cubic for the image, nearest for label maps). This avoids blurring the image twice, and makes the
geometric inverse (`slices_to_volume`) exact. The `pixel_mm` grid still decides the crop / pad
offsets (whole pixels, as a two-step implementation would). When the model pixel is larger than
the source voxel, the image is low-pass filtered first (Gaussian, sigma = (scale - 1) / 2 source
voxels) so that downsizing does not alias. Model pixels outside the acquired volume (padding) are
0 and label 0.

Slices in the model frame: rows superior -> inferior, columns anterior -> posterior.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from u2ad_jax.data import nifti


@dataclasses.dataclass(frozen=True, eq=False)
class SliceGeometry:
  """How the model slices of one subject relate to its input file (provenance).

  Model slice `i` is canonical x index `i`. Along each in-plane canonical axis a in (y, z), model
  grid index m (ascending along the canonical axis) sits at canonical voxel coordinate
  `u = scale[a] * m + offset[a]`; the model frame then flips and transposes that grid so that
  rows run S -> I and columns A -> P: pixel (r, c) is m_y = S - 1 - c, m_z = S - 1 - r.

  Attributes:
    source: the image file.
    orientation: the stored grid of the file (shape, affine, header, axis transform).
    canonical_affine: `[4, 4]` canonical voxel -> world (mm).
    voxel_mm: `(dx, dy, dz)` canonical voxel size in mm.
    image_size: model slice size S.
    fov_mm, pixel_mm: the field of view and intermediate pixel size that define the geometry.
    scale: `(sy, sz)` source voxels per model pixel.
    offset: `(oy, oz)` source voxel coordinate of model grid index 0.
    intensity_range: `(lo, hi)` the clip percentiles used to normalise the image.
  """
  source: str
  orientation: nifti.Orientation
  canonical_affine: np.ndarray
  voxel_mm: tuple[float, float, float]
  image_size: int
  fov_mm: float
  pixel_mm: float
  scale: tuple[float, float]
  offset: tuple[float, float]
  intensity_range: tuple[float, float] = (0.0, 1.0)

  @property
  def num_slices(self) -> int:
    """Number of sagittal slices (canonical x extent)."""
    return self.canonical_shape[0]

  @property
  def canonical_shape(self) -> tuple[int, int, int]:
    return self.orientation.canonical_shape

  # `affine`, `header` and `shape` make a geometry usable as `nifti.write_like`'s reference.
  @property
  def affine(self) -> np.ndarray:
    return self.orientation.affine

  @property
  def header(self) -> Any:
    return self.orientation.header

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.orientation.shape

  def model_to_canonical(self, slice_index: Any, rows: Any, cols: Any) -> np.ndarray:
    """Model pixel centres -> canonical voxel coordinates `[..., 3]` (x, y, z), fractional."""
    s = self.image_size
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    u_y = self.scale[0] * (s - 1 - cols) + self.offset[0]
    u_z = self.scale[1] * (s - 1 - rows) + self.offset[1]
    x = np.broadcast_to(np.asarray(slice_index, np.float64), u_y.shape)
    return np.stack([x, u_y, u_z], axis=-1)

  def model_to_world(self, slice_index: Any, rows: Any, cols: Any) -> np.ndarray:
    """Model pixel centres -> world coordinates `[..., 3]` in mm (RAS+)."""
    voxel = self.model_to_canonical(slice_index, rows, cols)
    return voxel @ self.canonical_affine[:3, :3].T + self.canonical_affine[:3, 3]

def compute_geometry(volume: nifti.Volume, image_size: int, fov_mm: float,
                     pixel_mm: float) -> SliceGeometry:
  """The model-grid geometry of a canonical volume (see the module docstring, step 2)."""
  if image_size < 1 or fov_mm <= 0 or pixel_mm <= 0:
    raise ValueError(f"bad geometry config: image_size={image_size}, fov_mm={fov_mm}, pixel_mm={pixel_mm}")
  shape = volume.data.shape
  voxel = volume.voxel_mm
  fov_pixels = max(1, int(round(fov_mm / pixel_mm)))
  scale, offset = [], []
  for axis in (1, 2):
    n, d = shape[axis], float(voxel[axis])
    # Step 1: n1 pixels of pixel_mm, centred on the acquired extent.
    n1 = max(1, int(round(n * d / pixel_mm)))
    # Step 2: centre crop (start >= 0) or zero pad (start < 0) to fov_pixels.
    start = (n1 - fov_pixels) // 2 if n1 >= fov_pixels else -((fov_pixels - n1) // 2)
    # Step 3: fov_pixels -> image_size with aligned pixel extents:
    #   j = (m + 0.5) * F / S - 0.5;  k = j + start;  u = (n - 1) / 2 + (k - (n1 - 1) / 2) * p / d.
    ratio = fov_pixels / image_size
    step = pixel_mm / d
    scale.append(ratio * step)
    offset.append((n - 1) / 2 + (0.5 * ratio - 0.5 + start - (n1 - 1) / 2) * step)
  return SliceGeometry(
      source=volume.path, orientation=volume.orientation, canonical_affine=volume.affine,
      voxel_mm=tuple(float(v) for v in voxel), image_size=int(image_size), fov_mm=float(fov_mm),
      pixel_mm=float(pixel_mm), scale=(scale[0], scale[1]), offset=(offset[0], offset[1]))


def model_inside(geometry: SliceGeometry) -> np.ndarray:
  """`[S, S]` bool in the model frame: pixels whose centre lies inside the acquired volume
  (False = zero padding)."""
  s = geometry.image_size
  m = np.arange(s, dtype=np.float64)
  inside = []
  for axis, n in ((0, geometry.canonical_shape[1]), (1, geometry.canonical_shape[2])):
    u = geometry.scale[axis] * m + geometry.offset[axis]
    inside.append((u >= -0.5) & (u <= n - 0.5))
  grid = inside[0][:, None] & inside[1][None, :]  # [m_y, m_z]
  return _grid_to_model(grid)


def to_model_slices(canonical: np.ndarray, geometry: SliceGeometry, order: int,
                    antialias: bool | None = None) -> np.ndarray:
  """Samples a canonical volume on the model grid.

  Args:
    canonical: `[X, Y, Z]` canonical volume (image or label map).
    geometry: from `compute_geometry`.
    order: spline order, 3 for images, 0 (nearest) for label maps.
    antialias: Gaussian low-pass before downsizing; default True for order > 0.

  Returns:
    `[X, S, S]` in the model frame (rows S -> I, cols A -> P), the input's dtype for order 0,
    float32 otherwise; 0 outside the acquired volume.
  """
  if antialias is None:
    antialias = order > 0
  data = canonical if order == 0 else canonical.astype(np.float32, copy=False)
  if antialias:
    for axis, scale in ((1, geometry.scale[0]), (2, geometry.scale[1])):
      if scale > 1.0:
        data = ndimage.gaussian_filter1d(data, sigma=(scale - 1.0) / 2.0, axis=axis, mode="nearest")
  s = geometry.image_size
  out = np.zeros((data.shape[0], s, s), dtype=data.dtype)
  inside = model_inside(geometry)
  for x in range(data.shape[0]):
    grid = ndimage.affine_transform(
        data[x], matrix=np.asarray(geometry.scale), offset=np.asarray(geometry.offset),
        output_shape=(s, s), order=order, mode="nearest")
    out[x] = np.where(inside, _grid_to_model(grid), 0)
  return out


def slices_to_volume(maps: np.ndarray, slice_index: Sequence[int] | np.ndarray,
                     geometry: SliceGeometry, order: int | None = None,
                     fill: float = 0.0) -> np.ndarray:
  """Per-slice maps in the model frame -> volume on the ORIGINAL stored voxel grid of the input.

  The exact inverse of the preprocessing geometry: each model slice goes back to its canonical x
  index, the in-plane model grid is sampled at every source voxel (inverse crop / resize /
  resample), and the canonical volume is un-reoriented to the stored axis order. Written with
  `nifti.write_like(path, volume, geometry)` it overlays the input voxel for voxel.

  Args:
    maps: `[n, S, S]` maps of n slices of one subject (model frame).
    slice_index: `[n]` canonical x index of each map (SliceSet.slice_index).
    geometry: the subject's SliceGeometry.
    order: interpolation order; default 0 (nearest) for bool / integer maps, 1 (linear) for
      float maps.
    fill: value of voxels with no map (slices not given, voxels outside the model field of view).

  Returns:
    `[I, J, K]` float32 on the input file's stored grid.
  """
  maps = np.asarray(maps)
  slice_index = np.asarray(slice_index, dtype=np.int64).reshape(-1)
  s = geometry.image_size
  if maps.ndim != 3 or maps.shape[1:] != (s, s):
    raise ValueError(f"maps must be [n, {s}, {s}], got {maps.shape}")
  if maps.shape[0] != slice_index.shape[0]:
    raise ValueError("one slice index per map is required")
  if len(set(slice_index.tolist())) != slice_index.shape[0]:
    raise ValueError("duplicate slice indices")
  nx, ny, nz = geometry.canonical_shape
  if slice_index.size and (slice_index.min() < 0 or slice_index.max() >= nx):
    raise ValueError(f"slice index out of range [0, {nx})")
  if order is None:
    order = 0 if (maps.dtype == bool or np.issubdtype(maps.dtype, np.integer)) else 1

  sy, sz = geometry.scale
  oy, oz = geometry.offset
  # Model grid coordinate of every source voxel, and whether it falls on the model field of view.
  m_y = (np.arange(ny) - oy) / sy
  m_z = (np.arange(nz) - oz) / sz
  covered = ((m_y >= -0.5) & (m_y <= s - 0.5))[:, None] & ((m_z >= -0.5) & (m_z <= s - 0.5))[None, :]
  canonical = np.full((nx, ny, nz), fill, dtype=np.float32)
  for x, slice_map in zip(slice_index, maps):
    grid = _model_to_grid(slice_map.astype(np.float32))
    sampled = ndimage.affine_transform(
        grid, matrix=np.array([1.0 / sy, 1.0 / sz]), offset=np.array([-oy / sy, -oz / sz]),
        output_shape=(ny, nz), order=order, mode="nearest")
    canonical[x] = np.where(covered, sampled, fill)
  return np.ascontiguousarray(geometry.orientation.to_original(canonical), dtype=np.float32)


def _grid_to_model(grid: np.ndarray) -> np.ndarray:
  # grid [m_y, m_z] (ascending P->A, I->S) -> model [r, c] with r = S-1-m_z, c = S-1-m_y.
  return grid[::-1, ::-1].T


def _model_to_grid(model: np.ndarray) -> np.ndarray:
  return model.T[::-1, ::-1]
