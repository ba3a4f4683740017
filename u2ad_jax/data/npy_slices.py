"""Reader of the original U2AD release's preprocessed slice format (`.npy`).

Each file is a float64 array `(3, H, W)` (256 x 256 in the release): channel 0 the image,
min-max normalised to [0, 1]; channel 1 the binary ROI (cord + CSF); channel 2 the label map in
the convention of `u2ad_jax.labels`. Rows run superior -> inferior, anterior is on the left: the
model frame already, so no reorientation is needed and there is no volume to map back to.
"""

from __future__ import annotations

import os

import numpy as np

from u2ad_jax import errors
from u2ad_jax import labels as label_defs
from u2ad_jax.data import sliceset

PathLike = str | os.PathLike

# The release stores float64; values within this of 0 / 1 (image range) or of an integer
# (labels) are accepted as exact.
_TOLERANCE = 1e-6


def load_npy_slice(path: PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads and validates one slice file.

  Returns:
    `(image [H, W] float32 in [0, 1], roi [H, W] bool, labels [H, W] uint8)`.

  Raises:
    InputError: file not found.
    CorruptFileError: not a NumPy array file, or an image outside [0, 1].
    GeometryError: not shaped `(3, H, W)`.
    NonFiniteError: NaN / Inf values.
    LabelError: an ROI channel that is not binary, non-integer or unknown label values.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.InputError(path, "file not found")
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as e:  # ValueError (bad header / pickled object), EOFError, OSError.
    raise errors.CorruptFileError(path, f"cannot read as a .npy array ({type(e).__name__}: {e})") from e
  if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
    raise errors.CorruptFileError(path, "not a numeric array")
  if array.ndim != 3 or array.shape[0] != 3 or min(array.shape[1:]) < 1:
    raise errors.GeometryError(path, f"expected shape (3, H, W) (image, ROI, labels), got {array.shape}")
  array = array.astype(np.float64, copy=False)
  finite = np.isfinite(array)
  if not finite.all():
    raise errors.NonFiniteError(path, f"{int((~finite).sum())} NaN / Inf values")

  image, roi, labels = array
  if image.min() < -_TOLERANCE or image.max() > 1 + _TOLERANCE:
    raise errors.CorruptFileError(
        path, f"image channel spans [{image.min():.4g}, {image.max():.4g}], expected [0, 1]")
  if not np.all((np.abs(roi) <= _TOLERANCE) | (np.abs(roi - 1) <= _TOLERANCE)):
    raise errors.LabelError(path, "ROI channel is not binary (0 / 1)")
  rounded = np.rint(labels)
  if np.any(np.abs(labels - rounded) > _TOLERANCE):
    raise errors.LabelError(path, "label channel has non-integer values")
  unknown = sorted(int(v) for v in np.unique(rounded) if int(v) not in label_defs.KNOWN_LABELS)
  if unknown:
    raise errors.LabelError(path, f"unknown label values {unknown} (allowed: 0..7)")
  return (np.clip(image, 0.0, 1.0).astype(np.float32), roi > 0.5, rounded.astype(np.uint8))


def load_npy_dir(directory: PathLike, recompute_train_roi: bool = False) -> sliceset.SliceSet:
  """Loads every `*.npy` file of a directory (sorted by name) into a SliceSet.

  Subject id = file name without extension, slice index 0, geometry None (no volume).

  Args:
    directory: folder of release-format slices.
    recompute_train_roi: False keeps the file's ROI channel as the training ROI (what the
      original trained on); True derives it from the labels with this project's rule
      (labels {3, 4, 6} dilated once). The scoring ROI is always derived from the labels.

  Raises:
    InputError: directory missing or without `.npy` files; plus `load_npy_slice`'s errors.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise errors.InputError(directory, "directory not found")
  names = sorted(n for n in os.listdir(directory) if n.endswith(".npy"))
  if not names:
    raise errors.InputError(directory, "no .npy slice files found")
  slices = [load_npy_slice(os.path.join(directory, n)) for n in names]
  shapes = {s[0].shape for s in slices}
  if len(shapes) != 1:
    raise errors.GeometryError(directory, f"slices of different sizes: {sorted(shapes)}")
  images = np.stack([s[0] for s in slices])
  labels = np.stack([s[2] for s in slices])
  if recompute_train_roi:
    train_roi = sliceset.train_roi_from_labels(labels)
  else:
    train_roi = np.stack([s[1] for s in slices])
  ids = [n[:-len(".npy")] for n in names]
  return sliceset.SliceSet(
      images=images, train_roi=train_roi, score_roi=sliceset.score_roi_from_labels(labels),
      labels=labels, vertebrae=np.zeros_like(labels), subject_ids=ids,
      slice_index=np.zeros(len(ids), np.int32), geometries={i: None for i in ids})
