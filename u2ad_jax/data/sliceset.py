"""Preprocessed 2D slices with their ROIs and provenance, and the ROI rules.

Train ROI = labels {3, 4, 6} (cord, CSF, lesion) dilated once (3x3 cross); scoring ROI = labels
{3, 6} eroded once, or un-eroded where erosion empties a slice. Everything is NumPy / SciPy.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from scipy import ndimage

from u2ad_jax import labels as label_defs

if TYPE_CHECKING:  # annotations only: training code (and the benchmarks) need no NIfTI reader
  from u2ad_jax.data import slice_geometry


# 3x3 cross (4-connectivity) for the ROI dilation / erosion, as in the original release.
_CROSS = ndimage.generate_binary_structure(2, 1)


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
  geometries: dict[str, slice_geometry.SliceGeometry | None]

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
    geometries: dict[str, slice_geometry.SliceGeometry | None] = {}
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


def roi_patch_mask(roi: np.ndarray, patch_size: int) -> np.ndarray:
  """`[S, H, W]` bool -> `[S, N]` bool: which patches (row-major grid of `patch_size`) contain at
  least one ROI pixel; the same rule as `patches.patch_any`, on the host."""
  s, h, w = roi.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {(h, w)} is not a multiple of patch size {patch_size}")
  grid = np.asarray(roi, bool).reshape(s, h // patch_size, patch_size, w // patch_size,
                                       patch_size)
  return grid.any(axis=(2, 4)).reshape(s, -1)


def roi_patch_count(roi: np.ndarray, patch_size: int) -> np.ndarray:
  """`[S, H, W]` bool -> `[S]` int: number of ROI patches (`roi_patch_mask`)."""
  return roi_patch_mask(roi, patch_size).sum(axis=1)


def _per_slice(masks: np.ndarray, operation) -> np.ndarray:
  # A [1, 3, 3] structure applies the 2D cross to each slice of a stack independently.
  structure = _CROSS.reshape((1,) * (masks.ndim - 2) + _CROSS.shape)
  return operation(masks, structure=structure)
