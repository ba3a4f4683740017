"""Loading: volume -> the normalised 2D sagittal slices of one subject, and of a cohort.

Per volume (the preprocessing of `docs/method.md`):
1. Read image + label map (+ vertebra instances), validate, reorient to canonical RAS+
   (`nifti.read_subject`).
2. Geometry (`slice_geometry`): 1 mm pixels, the 200 mm field of view and `image_size`, composed
   into one interpolation whose inverse (`slice_geometry.slices_to_volume`) is exact.
3. Intensity: clip at the `clip_percentiles` (0.2 / 99.8) of the FOREGROUND, then min-max to
   [0, 1]. Foreground = model-grid voxels inside the acquired volume whose intensity exceeds
   `foreground_fraction` (default 1%) of the maximum there. This drops zero padding and
   zero-filled / near-zero air (whose share grows with the padding, so the low percentile would
   otherwise depend on the field of view) and keeps every tissue; noisy air above 1% of the
   maximum stays in, which only lowers the low clip slightly. Computed per volume over all its
   slices.
4. Slices in the model frame (rows superior -> inferior, columns anterior -> posterior) with the
   train and scoring ROIs of `sliceset`. A slice is kept when its train ROI touches at least
   `min_roi_patches` patches of `patch_size`.

Everything is NumPy / SciPy; nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import labels as label_defs
from u2ad_jax.data import cohort
from u2ad_jax.data import nifti
from u2ad_jax.data import slice_geometry
from u2ad_jax.data import sliceset

PathLike = str | os.PathLike

DEFAULT_FOREGROUND_FRACTION = 0.01
# Connected components of label 2 smaller than this (pixels) are nearest-neighbour specks, not
# vertebral bodies.
MIN_VERTEBRA_PIXELS = 2


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


def load_subject(files: cohort.SubjectFiles, cfg: Any, *,
                 require_vertebrae: bool = False) -> sliceset.SliceSet:
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

  geometry = slice_geometry.compute_geometry(image, int(cfg.image_size), float(cfg.fov_mm),
                                            float(cfg.pixel_mm))
  inside = slice_geometry.model_inside(geometry)
  raw = slice_geometry.to_model_slices(image.data, geometry, order=3)
  images, intensity_range = normalize_intensity(
      raw, inside[None], tuple(cfg.clip_percentiles),
      float(getattr(cfg, "foreground_fraction", DEFAULT_FOREGROUND_FRACTION)), source=image.path)
  geometry = dataclasses.replace(geometry, intensity_range=intensity_range)
  label_slices = slice_geometry.to_model_slices(label.data, geometry, order=0)
  if vertebrae is not None:
    vertebra_slices = slice_geometry.to_model_slices(vertebrae.data, geometry, order=0)
  else:
    vertebra_slices = np.zeros_like(label_slices)

  train_roi = sliceset.train_roi_from_labels(label_slices)
  patch_size, min_patches = int(cfg.patch_size), int(cfg.min_roi_patches)
  keep = sliceset.roi_patch_count(train_roi, patch_size) >= min_patches
  if not keep.any():
    raise errors.LabelError(
        label.path, f"no sagittal slice has a cord/CSF ROI touching {min_patches} patches of "
                    f"{patch_size} px at image size {geometry.image_size}")
  if require_vertebrae:
    _check_vertebrae(label, vertebrae, label_slices[keep], vertebra_slices[keep])

  index = np.flatnonzero(keep)
  return sliceset.SliceSet(
      images=images[index], train_roi=train_roi[index],
      score_roi=sliceset.score_roi_from_labels(label_slices[index]), labels=label_slices[index],
      vertebrae=vertebra_slices[index], subject_ids=[files.subject_id] * index.size,
      slice_index=index, geometries={files.subject_id: geometry})


def load_cohort(root: PathLike, cfg: Any, *, subjects: Sequence[str] | None = None,
                require_vertebrae: bool = False, progress: bool = True,
                skip_bad: bool = False) -> sliceset.SliceSet:
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
  return sliceset.SliceSet.concat(parts)


def _check_vertebrae(label: nifti.Volume, vertebrae: nifti.Volume | None, label_slices: np.ndarray,
                     vertebra_slices: np.ndarray) -> None:
  needed = label_defs.VERTEBRA_NAMES
  if vertebrae is not None:
    present = set(np.unique(vertebra_slices).tolist())
    missing = [name for name in needed if label_defs.VERTEBRA_INSTANCE_IDS[name] not in present]
    # By identity a partial field of view scores the segments it has (the others are n/a,
    # data/levels.py); it needs at least one segment with both of its levels.
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

