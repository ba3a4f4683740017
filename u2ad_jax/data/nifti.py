"""NIfTI reading with validation, canonical reorientation, and aligned writing of output maps.

Every volume is reoriented to the closest canonical RAS+ frame on reading (the transform of
`nib.as_closest_canonical`, computed explicitly so that it can be inverted): the index of axis 0
increases towards the subject's right (+x), axis 1 towards anterior (+y), axis 2 towards
superior (+z). Reorientation only permutes and flips axes (no resampling), so it is exactly
invertible; `Orientation` keeps what the inverse needs, so that maps computed in the canonical
frame can be written back on the input's own voxel grid with its own affine and header, and
overlay the input in any viewer.

Bad input raises a typed error from `u2ad_jax.errors` whose message names the file:
CorruptFileError (unreadable / truncated / not NIfTI), GeometryError (not 3D, shape or affine
mismatch between image and label map), NonFiniteError (NaN / Inf voxels), LabelError (label
values outside the convention of `u2ad_jax.labels`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Any

import nibabel as nib
from nibabel import orientations
import numpy as np

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import labels as label_defs

PathLike = str | os.PathLike

# Image and label affines must agree to this many mm (translation) / mm per voxel (rotation and
# scale terms). Converters round affines to float32, so exact equality is too strict; a real
# mismatch (another series, another resolution) is orders of magnitude larger.
AFFINE_ATOL_MM = 1e-3

# Voxel values allowed in a vertebra instance map: 0 = not a vertebral body, else the instance ids.
VERTEBRA_MAP_VALUES = frozenset({0, *label_defs.VERTEBRA_INSTANCE_IDS.values()})

_RAS = orientations.axcodes2ornt(("R", "A", "S"))


@dataclasses.dataclass(frozen=True, eq=False)
class Orientation:
  """The stored voxel grid of an input file and how it maps to the canonical RAS+ grid.

  Attributes:
    shape: `(I, J, K)` spatial shape as stored in the file.
    affine: `[4, 4]` the file's voxel -> world (mm) affine.
    ornt: `[3, 2]` nibabel orientation of the stored axes relative to RAS+
      (`nib.orientations.io_orientation(affine)`); applying it gives the canonical array.
    header: the file's header (kept so that output maps carry the same header fields).
  """
  shape: tuple[int, int, int]
  affine: np.ndarray
  ornt: np.ndarray
  header: Any

  @property
  def canonical_shape(self) -> tuple[int, int, int]:
    """Shape `(X, Y, Z)` of the canonical array."""
    return tuple(int(self.shape[int(axis)]) for axis in np.argsort(self.ornt[:, 0]))

  def to_canonical(self, stored: np.ndarray) -> np.ndarray:
    """`[I, J, K]` array on the stored grid -> `[X, Y, Z]` canonical (a view where possible)."""
    return orientations.apply_orientation(stored, self.ornt)

  def to_original(self, canonical: np.ndarray) -> np.ndarray:
    """`[X, Y, Z]` canonical array -> `[I, J, K]` on the stored grid; exact inverse of
    `to_canonical` (axes are only permuted and flipped)."""
    return orientations.apply_orientation(canonical, orientations.ornt_transform(_RAS, self.ornt))


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """A validated volume in the canonical RAS+ frame.

  Attributes:
    path: the file it was read from.
    data: `[X, Y, Z]` float32 for images, uint8 for label and vertebra maps.
    affine: `[4, 4]` canonical voxel -> world (mm) affine.
    orientation: the stored grid (for writing maps back).
  """
  path: str
  data: np.ndarray
  affine: np.ndarray
  orientation: Orientation

  @property
  def voxel_mm(self) -> np.ndarray:
    """`[3]` voxel size (mm) along the canonical axes (x, y, z), from the affine columns."""
    return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def read_volume(path: PathLike, kind: str = "image") -> Volume:
  """Reads and validates one NIfTI file and reorients it to canonical RAS+.

  Args:
    path: `.nii` or `.nii.gz` file.
    kind: "image" (float32 intensities, must be finite), "label" (values of the label
      convention, 0..7) or "vertebrae" (0 or a vertebra instance id).

  Returns:
    The canonical `Volume`.

  Raises:
    InputError: the file does not exist.
    CorruptFileError: unreadable, truncated or not a NIfTI / nibabel image.
    GeometryError: not a 3D volume (a 4D file with a singleton 4th axis is accepted), or an
      unusable affine.
    NonFiniteError: NaN or Inf voxels.
    LabelError: (label / vertebrae kinds) non-integer or unknown values.
  """
  if kind not in ("image", "label", "vertebrae"):
    raise ValueError(f"unknown volume kind {kind!r}")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.InputError(path, "file not found")
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for foreign / damaged headers.
    raise errors.CorruptFileError(path, f"cannot read as NIfTI ({type(e).__name__}: {e})") from e

  shape = tuple(int(s) for s in img.shape)
  # Trailing singleton axes (e.g. a 4D file with one time point) carry no extra data.
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise errors.GeometryError(path, f"expected a 3D volume, got shape {tuple(img.shape)}")
  if min(shape) < 1:
    raise errors.GeometryError(path, f"empty volume, shape {shape}")
  affine = np.asarray(img.affine, dtype=np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise errors.GeometryError(path, "affine is not finite or is singular")

  try:
    if kind == "image":
      stored = np.asarray(img.get_fdata(dtype=np.float32))
    else:
      # Keeps the stored integer dtype when the file has no scaling (get_fdata would cast
      # every label file to float); scaled files come back scaled, as floats.
      stored = np.asarray(img.dataobj)
  except Exception as e:  # truncated gzip -> EOFError / OSError / zlib.error, short file -> ValueError.
    raise errors.CorruptFileError(path, f"cannot read voxel data, file truncated or corrupt "
                                        f"({type(e).__name__}: {e})") from e
  stored = stored.reshape(shape)

  if kind == "image":
    _check_finite(path, stored)
    data = stored.astype(np.float32, copy=False)
  else:
    data = _validate_labels(path, stored, kind)

  ornt = orientations.io_orientation(affine)
  orientation = Orientation(shape=shape, affine=affine, ornt=ornt, header=img.header.copy())
  canonical = np.ascontiguousarray(orientation.to_canonical(data))
  canonical_affine = affine @ orientations.inv_ornt_aff(ornt, shape)
  return Volume(path=path, data=canonical, affine=canonical_affine, orientation=orientation)


def read_subject(image_path: PathLike, label_path: PathLike,
                 vertebrae_path: PathLike | None = None) -> tuple[Volume, Volume, Volume | None]:
  """Reads an image with its label map (and optional vertebra instance map) and checks that
  they share one voxel grid.

  Returns:
    `(image, labels, vertebrae or None)`, all canonical.

  Raises:
    GeometryError naming the label (or vertebrae) file when its shape differs from the image's,
    or its affine differs by more than `AFFINE_ATOL_MM`; plus everything `read_volume` raises.
  """
  image = read_volume(image_path, "image")
  label = read_volume(label_path, "label")
  _check_same_grid(image, label)
  vertebrae = None
  if vertebrae_path is not None:
    vertebrae = read_volume(vertebrae_path, "vertebrae")
    _check_same_grid(image, vertebrae)
  return image, label, vertebrae


def write_like(path: PathLike, volume: np.ndarray, reference: Any, dtype: Any = np.float32) -> None:
  """Writes `volume` as NIfTI with the reference's affine and header, atomically.

  Args:
    path: output file; `.nii.gz` is gzip-compressed, `.nii` is not.
    volume: `[I, J, K]` array on the reference's STORED voxel grid (what
      `slice_geometry.slices_to_volume` returns).
    reference: the input it must overlay: a NIfTI path, a nibabel image, an object with
      `affine` and `header` attributes (`Orientation`, `slice_geometry.SliceGeometry`), or a tuple
      `(affine, header_or_None)`.
    dtype: stored data type (float32 by default; the header's scaling is reset).
  """
  affine, header, ref_shape = _reference_geometry(reference)
  volume = np.asarray(volume)
  if volume.ndim != 3:
    raise ValueError(f"write_like expects a 3D volume, got shape {volume.shape}")
  if ref_shape is not None and tuple(volume.shape) != tuple(ref_shape[:3]):
    raise ValueError(f"volume shape {volume.shape} does not match the reference grid {ref_shape[:3]}")
  if header is not None:
    header = header.copy()
    header.set_data_dtype(dtype)
    # The input's display window (cal_min / cal_max) would mis-window a map in another range.
    header["cal_min"] = 0
    header["cal_max"] = 0
  img = nib.Nifti1Image(volume.astype(dtype), affine, header=header)
  # Stored values are the map itself: no intensity scaling inherited from the input's header.
  img.header.set_slope_inter(1.0, 0.0)
  data = img.to_bytes()
  if os.fspath(path).endswith(".gz"):
    # mtime=0 keeps the bytes a pure function of the map (reproducible outputs).
    data = gzip.compress(data, compresslevel=6, mtime=0)
  io_utils.write_bytes(path, data)


def _reference_geometry(reference: Any) -> tuple[np.ndarray, Any, tuple[int, ...] | None]:
  if isinstance(reference, (str, os.PathLike)):
    try:
      reference = nib.load(os.fspath(reference))
    except Exception as e:
      raise errors.CorruptFileError(reference, f"cannot read reference NIfTI ({e})") from e
  if isinstance(reference, tuple):
    affine, header = reference
    return np.asarray(affine, dtype=np.float64), header, None
  if isinstance(reference, nib.spatialimages.SpatialImage):
    shape = tuple(int(s) for s in reference.shape)
    return np.asarray(reference.affine), reference.header, shape
  if hasattr(reference, "affine") and hasattr(reference, "header"):
    shape = getattr(reference, "shape", None)
    return np.asarray(reference.affine), reference.header, shape
  raise TypeError(f"unsupported reference type {type(reference).__name__}")


def _check_finite(path: str, data: np.ndarray) -> None:
  finite = np.isfinite(data)
  if not finite.all():
    n_nan = int(np.isnan(data).sum())
    n_inf = int(data.size - finite.sum() - n_nan)
    raise errors.NonFiniteError(path, f"{n_nan} NaN and {n_inf} Inf voxels")


def _validate_labels(path: str, stored: np.ndarray, kind: str) -> np.ndarray:
  if np.issubdtype(stored.dtype, np.floating):
    _check_finite(path, stored)
    rounded = np.rint(stored)
    if np.any(np.abs(stored - rounded) > 1e-3):
      raise errors.LabelError(path, f"{kind} map has non-integer values")
    stored = rounded
  allowed = label_defs.KNOWN_LABELS if kind == "label" else VERTEBRA_MAP_VALUES
  values = np.unique(stored)
  unknown = sorted(int(v) for v in values if int(v) not in allowed)
  if unknown:
    raise errors.LabelError(path, f"unknown {kind} values {unknown} (allowed: {sorted(allowed)})")
  return stored.astype(np.uint8)


def _check_same_grid(image: Volume, other: Volume) -> None:
  if other.orientation.shape != image.orientation.shape:
    raise errors.GeometryError(
        other.path, f"shape {other.orientation.shape} differs from the image's "
                    f"{image.orientation.shape} ({image.path})")
  diff = np.abs(other.orientation.affine - image.orientation.affine).max()
  if diff > AFFINE_ATOL_MM:
    raise errors.GeometryError(
        other.path, f"affine differs from the image's ({image.path}) by up to {diff:.4g} "
                    f"(tolerance {AFFINE_ATOL_MM})")
