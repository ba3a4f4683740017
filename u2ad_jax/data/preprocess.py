"""Volume -> 2D sagittal slices for the model, and per-slice maps -> volume on the input grid.

Per volume (method.md section 2):
1. Read image + label map (+ vertebra instances), validate, reorient to canonical RAS+
   (`nifti.read_subject`).
2. Geometry: in-plane resampling to `pixel_mm` (1 mm) pixels, centre crop or zero pad to
   `fov_mm` (200 mm), resize to `image_size` (256 in the paper); the slice thickness is kept
   (one model slice per canonical x index). The three steps are affine along each in-plane axis,
   so they are composed into ONE map from model pixel to source voxel coordinate and applied by
   a single interpolation (cubic for the image, nearest for label maps). This avoids blurring the
   image twice, and makes the geometric inverse (`slices_to_volume`) exact. The `pixel_mm` grid still
   decides the crop / pad offsets (whole pixels, as a two-step implementation would).
   When the model pixel is larger than the source voxel, the image is low-pass filtered first
   (Gaussian, sigma = (scale - 1) / 2 source voxels) so that downsizing does not alias.
   Model pixels outside the acquired volume (padding) are 0 and label 0.
3. Intensity: clip at the `clip_percentiles` (0.2 / 99.8) of the FOREGROUND, then min-max to
   [0, 1]. Foreground = model-grid voxels inside the acquired volume whose intensity exceeds
   `foreground_fraction` (default 1%) of the maximum there. This drops zero padding and
   zero-filled / near-zero air (whose share grows with the padding, so the low percentile would
   otherwise depend on the field of view) and keeps every tissue; noisy air above 1% of the
   maximum stays in, which only lowers the low clip slightly. Computed per volume over all its
   slices.
4. Slices in the model frame: rows superior -> inferior, columns anterior -> posterior.
   Train ROI = labels {3, 4, 6} dilated once (3x3 cross); scoring ROI = labels {3, 6} eroded
   once, or un-eroded where erosion empties a slice. A slice is kept when its train ROI touches
   at least `min_roi_patches` patches of `patch_size`.

Everything is NumPy / SciPy; nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import labels as label_defs
from u2ad_jax.data import cohort
from u2ad_jax.data import nifti

PathLike = str | os.PathLike

DEFAULT_FOREGROUND_FRACTION = 0.01
# Connected components of label 2 smaller than this (pixels) are nearest-neighbour specks, not
# vertebral bodies.
MIN_VERTEBRA_PIXELS = 2
# 3x3 cross (4-connectivity) for the ROI dilation / erosion, as in the original release.
_CROSS = ndimage.generate_binary_structure(2, 1)


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


@dataclasses.dataclass(eq=False)
class SliceSet:
  """A set of preprocessed 2D slices (S of them) with ROIs and provenance.

  Attributes:
    images: `[S, H, W]` float32 in [0, 1].
    train_roi: `[S, H, W]` bool, masking / training ROI.
    score_roi: `[S, H, W]` bool, anomaly scoring ROI.
    labels: `[S, H, W]` uint8 label map.
    vertebrae: `[S, H, W]` uint8 vertebra instance ids (zeros when unknown).
    subject_ids: S subject ids.
    slice_index: `[S]` int32 canonical x index of each slice in its subject's volume.
    geometries: subject id -> SliceGeometry (None for inputs without a volume, e.g. `.npy`).
  """
  images: np.ndarray
  train_roi: np.ndarray
  score_roi: np.ndarray
  labels: np.ndarray
  vertebrae: np.ndarray
  subject_ids: list[str]
  slice_index: np.ndarray
  geometries: dict[str, SliceGeometry | None]

  def __post_init__(self):
    self.images = np.asarray(self.images, np.float32)
    self.train_roi = np.asarray(self.train_roi, bool)
    self.score_roi = np.asarray(self.score_roi, bool)
    self.labels = np.asarray(self.labels, np.uint8)
    self.vertebrae = np.asarray(self.vertebrae, np.uint8)
    self.subject_ids = list(self.subject_ids)
    self.slice_index = np.asarray(self.slice_index, np.int32).reshape(-1)
    shape = self.images.shape
    if len(shape) != 3:
      raise ValueError(f"images must be [S, H, W], got {shape}")
    for name in ("train_roi", "score_roi", "labels", "vertebrae"):
      if getattr(self, name).shape != shape:
        raise ValueError(f"{name} shape {getattr(self, name).shape} != images shape {shape}")
    if len(self.subject_ids) != shape[0] or self.slice_index.shape[0] != shape[0]:
      raise ValueError("subject_ids and slice_index need one entry per slice")
    missing = set(self.subject_ids) - set(self.geometries)
    if missing:
      raise ValueError(f"no geometry entry for subjects {sorted(missing)}")

  def __len__(self) -> int:
    return self.images.shape[0]

  @property
  def image_shape(self) -> tuple[int, int]:
    """`(H, W)`."""
    return self.images.shape[1], self.images.shape[2]

  @property
  def subjects(self) -> list[str]:
    """Subject ids in order of first appearance."""
    return list(dict.fromkeys(self.subject_ids))

  def indices_of(self, subject_id: str) -> np.ndarray:
    """`[n]` positions of the slices of one subject, in stored order."""
    return np.flatnonzero(np.asarray(self.subject_ids, dtype=object) == subject_id)

  def subset(self, indices: Sequence[int] | np.ndarray) -> SliceSet:
    """The slices at `indices` (any order, repeats allowed; a bool mask works too)."""
    indices = np.asarray(indices)
    if indices.dtype == bool:
      indices = np.flatnonzero(indices)
    indices = indices.astype(np.int64)
    ids = [self.subject_ids[i] for i in indices]
    return SliceSet(
        images=self.images[indices], train_roi=self.train_roi[indices],
        score_roi=self.score_roi[indices], labels=self.labels[indices],
        vertebrae=self.vertebrae[indices], subject_ids=ids,
        slice_index=self.slice_index[indices],
        geometries={s: self.geometries[s] for s in dict.fromkeys(ids)})

  def subject(self, subject_id: str) -> SliceSet:
    """The slices of one subject."""
    return self.subset(self.indices_of(subject_id))

  @staticmethod
  def concat(sets: Iterable[SliceSet]) -> SliceSet:
    """Concatenates slice sets (same image size). A subject present in several sets must carry
    the same geometry object in each."""
    sets = list(sets)
    if not sets:
      raise ValueError("concat needs at least one SliceSet")
    geometries: dict[str, SliceGeometry | None] = {}
    for s in sets:
      for subject_id, geometry in s.geometries.items():
        if subject_id in geometries and geometries[subject_id] is not geometry:
          raise ValueError(f"subject {subject_id} appears in two sets with different geometries")
        geometries[subject_id] = geometry
    return SliceSet(
        images=np.concatenate([s.images for s in sets]),
        train_roi=np.concatenate([s.train_roi for s in sets]),
        score_roi=np.concatenate([s.score_roi for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        vertebrae=np.concatenate([s.vertebrae for s in sets]),
        subject_ids=[i for s in sets for i in s.subject_ids],
        slice_index=np.concatenate([s.slice_index for s in sets]),
        geometries=geometries)


# The contract's name for what `load_subject` returns: the slices of one subject.
SubjectSlices = SliceSet


# ----------------------------------------------------------------------------- ROIs


def train_roi_from_labels(labels: np.ndarray) -> np.ndarray:
  """`[..., H, W]` label maps -> training ROI: labels {3, 4, 6} dilated once per slice
  (3x3 cross)."""
  return _per_slice(np.isin(labels, label_defs.TRAIN_ROI_LABELS), ndimage.binary_dilation)


def score_roi_from_labels(labels: np.ndarray) -> np.ndarray:
  """`[..., H, W]` label maps -> scoring ROI: labels {3, 6} eroded once per slice (3x3 cross);
  a slice whose eroded cord is empty (a thin, off-midline cord) keeps its un-eroded cord."""
  cord = np.isin(labels, label_defs.CORD_LABELS)
  eroded = _per_slice(cord, ndimage.binary_erosion)
  empty = ~eroded.reshape(-1, *eroded.shape[-2:]).any(axis=(1, 2)).reshape(eroded.shape[:-2] + (1, 1))
  return np.where(empty, cord, eroded)


def roi_patch_count(roi: np.ndarray, patch_size: int) -> np.ndarray:
  """`[S, H, W]` bool -> `[S]` int: number of patches (row-major grid of `patch_size`) that
  contain at least one ROI pixel; the same rule as `patches.patch_any`."""
  s, h, w = roi.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {(h, w)} is not a multiple of patch size {patch_size}")
  grid = roi.reshape(s, h // patch_size, patch_size, w // patch_size, patch_size)
  return grid.any(axis=(2, 4)).sum(axis=(1, 2))


def _per_slice(masks: np.ndarray, operation) -> np.ndarray:
  # A [1, 3, 3] structure applies the 2D cross to each slice of a stack independently.
  structure = _CROSS.reshape((1,) * (masks.ndim - 2) + _CROSS.shape)
  return operation(masks, structure=structure)


# ----------------------------------------------------------------------------- geometry


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


# ----------------------------------------------------------------------------- intensity


def normalize_intensity(volume: np.ndarray, inside: np.ndarray | None = None,
                        percentiles: Sequence[float] = (0.2, 99.8),
                        foreground_fraction: float = DEFAULT_FOREGROUND_FRACTION,
                        source: PathLike | None = None) -> tuple[np.ndarray, tuple[float, float]]:
  """Percentile clip over the foreground, then min-max to [0, 1].

  Args:
    volume: intensities (any shape).
    inside: bool, broadcastable to `volume`: voxels that belong to the acquired field of view
      (None = all). Voxels outside are set to 0.
    percentiles: `(low, high)` in percent.
    foreground_fraction: foreground = inside voxels > this fraction of their maximum.
    source: file named in errors.

  Returns:
    `(normalised float32 like volume, (lo, hi))`. Because lo / hi are percentiles of a subset of
    the volume, clipping to [lo, hi] leaves exactly lo and hi as the min and max, so min-max of
    the clipped volume is `(clip(v, lo, hi) - lo) / (hi - lo)`.

  Raises:
    InputError: no foreground or no contrast (hi == lo).
  """
  volume = np.asarray(volume, dtype=np.float32)
  inside = np.ones(volume.shape, bool) if inside is None else np.broadcast_to(inside, volume.shape)
  values = volume[inside]
  peak = float(values.max()) if values.size else 0.0
  foreground = values[values > foreground_fraction * peak] if peak > 0 else values[:0]
  if foreground.size == 0:
    raise errors.InputError(source, "image has no foreground (all voxels <= 0)")
  lo, hi = (float(v) for v in np.percentile(foreground.astype(np.float64), percentiles))
  if not hi > lo:
    raise errors.InputError(source, f"image has no intensity contrast in the foreground ({lo} .. {hi})")
  normalised = (np.clip(volume, lo, hi) - lo) / (hi - lo)
  normalised = np.where(inside, normalised, 0.0).astype(np.float32)
  return normalised, (lo, hi)


# ----------------------------------------------------------------------------- loading


def load_subject(files: cohort.SubjectFiles, cfg: Any, *, require_vertebrae: bool = False) -> SliceSet:
  """Reads one subject and returns its usable slices.

  Args:
    files: the subject's files (`cohort.list_subjects`).
    cfg: `config.data` (image_size, fov_mm, pixel_mm, clip_percentiles, min_roi_patches,
      patch_size; optional foreground_fraction).
    require_vertebrae: scoring needs the vertebral bodies C2 ... T1 (segment boundaries);
      training does not.

  Returns:
    SliceSet of the slices whose train ROI touches at least `min_roi_patches` patches, in
    ascending slice index.

  Raises:
    Everything `nifti.read_subject` raises, and LabelError (naming the label or vertebrae file)
    when the cord ROI is empty, no slice has enough ROI patches, or (require_vertebrae) the
    vertebral bodies C2 ... T1 are not all present.
  """
  image, label, vertebrae = nifti.read_subject(files.image, files.label, files.vertebrae)
  if not np.isin(label.data, label_defs.CORD_LABELS).any():
    raise errors.LabelError(label.path, "empty cord ROI: no voxel labelled 3 (cord) or 6 (lesion)")

  geometry = compute_geometry(image, int(cfg.image_size), float(cfg.fov_mm), float(cfg.pixel_mm))
  inside = model_inside(geometry)
  raw = to_model_slices(image.data, geometry, order=3)
  images, intensity_range = normalize_intensity(
      raw, inside[None], tuple(cfg.clip_percentiles),
      float(getattr(cfg, "foreground_fraction", DEFAULT_FOREGROUND_FRACTION)), source=image.path)
  geometry = dataclasses.replace(geometry, intensity_range=intensity_range)
  label_slices = to_model_slices(label.data, geometry, order=0)
  if vertebrae is not None:
    vertebra_slices = to_model_slices(vertebrae.data, geometry, order=0)
  else:
    vertebra_slices = np.zeros_like(label_slices)

  train_roi = train_roi_from_labels(label_slices)
  patch_size, min_patches = int(cfg.patch_size), int(cfg.min_roi_patches)
  keep = roi_patch_count(train_roi, patch_size) >= min_patches
  if not keep.any():
    raise errors.LabelError(
        label.path, f"no sagittal slice has a cord/CSF ROI touching {min_patches} patches of "
                    f"{patch_size} px at image size {geometry.image_size}")
  if require_vertebrae:
    _check_vertebrae(label, vertebrae, label_slices[keep], vertebra_slices[keep])

  index = np.flatnonzero(keep)
  return SliceSet(
      images=images[index], train_roi=train_roi[index],
      score_roi=score_roi_from_labels(label_slices[index]), labels=label_slices[index],
      vertebrae=vertebra_slices[index], subject_ids=[files.subject_id] * index.size,
      slice_index=index, geometries={files.subject_id: geometry})


def load_cohort(root: PathLike, cfg: Any, *, subjects: Sequence[str] | None = None,
                require_vertebrae: bool = False, progress: bool = True,
                skip_bad: bool = False) -> SliceSet:
  """Loads every subject of a cohort directory (`cohort.list_subjects`) into one SliceSet.

  Args:
    root: cohort directory.
    cfg: `config.data`.
    subjects: optional subset of subject ids.
    require_vertebrae: see `load_subject` (True for scoring).
    progress: print one line per subject with timing (loads of a cohort take a while).
    skip_bad: report and skip subjects whose files are bad instead of raising (all bad still
      raises the first error).
  """
  files = cohort.list_subjects(root, subjects)
  parts, failures = [], []
  start = time.monotonic()
  for i, subject_files in enumerate(files):
    try:
      part = load_subject(subject_files, cfg, require_vertebrae=require_vertebrae)
    except errors.InputError as e:
      if not skip_bad:
        raise
      failures.append(e)
      print(f"[load_cohort] skipping {subject_files.subject_id}: {e}", file=sys.stderr, flush=True)
      continue
    parts.append(part)
    if progress:
      elapsed = time.monotonic() - start
      print(f"[load_cohort] {i + 1}/{len(files)} {subject_files.subject_id}: {len(part)} slices "
            f"({elapsed:.1f} s)", file=sys.stderr, flush=True)
  if not parts:
    raise failures[0]
  return SliceSet.concat(parts)


def _check_vertebrae(label: nifti.Volume, vertebrae: nifti.Volume | None, label_slices: np.ndarray,
                     vertebra_slices: np.ndarray) -> None:
  needed = label_defs.VERTEBRA_NAMES
  if vertebrae is not None:
    present = set(np.unique(vertebra_slices).tolist())
    missing = [name for name in needed if label_defs.VERTEBRA_INSTANCE_IDS[name] not in present]
    # By identity a partial field of view scores the segments it has (the others are n/a,
    # evaluation/levels.py); it needs at least one segment with both of its levels.
    in_view = [name not in missing for name in needed]
    if not any(a and b for a, b in zip(in_view[:-1], in_view[1:])):
      raise errors.LabelError(vertebrae.path, f"vertebral bodies {missing} are missing from the "
                                              f"slices used: no segment (C2-3 ... C7-T1) has "
                                              f"both of its levels in view")
    return
  best = 0
  for slice_labels in label_slices:
    components, count = ndimage.label(slice_labels == label_defs.VERTEBRA, structure=np.ones((3, 3)))
    if count:
      sizes = np.bincount(components.ravel())[1:]
      best = max(best, int((sizes >= MIN_VERTEBRA_PIXELS).sum()))
  if best < len(needed):
    raise errors.LabelError(
        label.path, f"at most {best} vertebral bodies (label 2) on any slice used; scoring needs "
                    f"{len(needed)} ({needed[0]}..{needed[-1]}) on at least one slice")
