"""Vertebral levels from the vertebral-body label, and the six scored segments.

Rule (method.md section 8): the vertebral-body label (2) of a sagittal slice is split into
4-connected components; components much smaller than the slice's typical body (a stray voxel, a
cut corner at the field-of-view edge) are dropped; the rest are ordered top-down by centroid row
and the first seven are C2, C3, ..., C7, T1. Segment `C{k}-{k+1}` spans the rows from the centroid
of vertebra k to the centroid of vertebra k+1 (half-open, so every row belongs to at most one
segment); rows above the C2 centroid or below the T1 centroid belong to no segment.

One subject has several slices; the levels are read from ONE reference slice and shared by all of
the subject's slices (they share the model's row grid): the slice with the largest cord area among
those that show at least seven bodies. The midline slice shows every body completely, while
off-midline slices may miss a body or cut it into pieces, which would shift the ordering.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import labels as label_values

# Components below this fraction of the slice's median body area are fragments, not bodies.
MIN_BODY_FRACTION = 0.25
NUM_LEVELS = len(label_values.VERTEBRA_NAMES)
NUM_SEGMENTS = len(label_values.SEGMENT_NAMES)


@dataclasses.dataclass(frozen=True)
class VertebralLevels:
  """Levels of one subject in the model's slice frame.

  Attributes:
    centroid_rows: `[7]` float, centroid rows of C2 ... T1, strictly increasing (superior first).
    centroid_cols: `[7]` float, centroid columns (for drawing).
    reference_slice: position, within the subject's slices, of the slice the levels come from.
    num_bodies: number of bodies found on the reference slice (>= 7; extra ones are T2, T3 ...).
  """
  centroid_rows: np.ndarray
  centroid_cols: np.ndarray
  reference_slice: int
  num_bodies: int

  @property
  def names(self) -> tuple[str, ...]:
    return label_values.VERTEBRA_NAMES

  def segment_bounds(self) -> np.ndarray:
    """`[6, 2]` float: (start row, end row) of each segment, start inclusive, end exclusive."""
    return np.stack([self.centroid_rows[:-1], self.centroid_rows[1:]], axis=1)

  def row_segments(self, height: int) -> np.ndarray:
    """`[H]` int: the segment index (0 = C2-3 ... 5 = C7-T1) of each row, -1 outside C2..T1."""
    rows = np.arange(height, dtype=np.float64)
    index = np.searchsorted(self.centroid_rows, rows, side="right") - 1
    index[(index < 0) | (index >= NUM_SEGMENTS)] = -1
    return index.astype(np.int64)


def vertebral_bodies(label_slice: np.ndarray,
                     min_fraction: float = MIN_BODY_FRACTION) -> list[tuple[float, float, int]]:
  """Vertebral bodies of one `[H, W]` label slice, top-down.

  Returns:
    A list of (centroid row, centroid column, area in pixels), sorted by centroid row, of the
    4-connected components of label 2 whose area is at least `min_fraction` times the median area.
  """
  body = np.asarray(label_slice) == label_values.VERTEBRA
  components, count = ndimage.label(body)
  if count == 0:
    return []
  index = np.arange(1, count + 1)
  areas = np.asarray(ndimage.sum_labels(body, components, index), dtype=np.int64)
  centroids = ndimage.center_of_mass(body, components, index)
  keep = areas >= min_fraction * float(np.median(areas))
  bodies = [(float(c[0]), float(c[1]), int(a)) for c, a, k in zip(centroids, areas, keep) if k]
  return sorted(bodies, key=lambda b: b[0])


def find_levels(label_slices: np.ndarray, cord_area: np.ndarray | None = None, *,
                source: str | os.PathLike | None = None,
                subject_id: str | None = None) -> VertebralLevels:
  """Vertebral levels C2 ... T1 of one subject.

  Args:
    label_slices: `[S, H, W]` label maps of the subject's slices (model frame).
    cord_area: `[S]` cord pixel count per slice, used to prefer the midline slice; by default the
      count of labels 3 and 6.
    source: the subject's label file, named in the error.
    subject_id: named in the error when `source` is unknown.

  Raises:
    errors.LabelError: when no slice shows at least seven vertebral bodies (C2 ... T1).
  """
  label_slices = np.asarray(label_slices)
  if label_slices.ndim != 3:
    raise ValueError(f"label_slices must be [S, H, W], got {label_slices.shape}")
  if cord_area is None:
    cord_area = np.isin(label_slices, label_values.CORD_LABELS).sum(axis=(1, 2))
  found = [vertebral_bodies(s) for s in label_slices]
  valid = [i for i, bodies in enumerate(found) if len(bodies) >= NUM_LEVELS]
  if not valid:
    most = max((len(b) for b in found), default=0)
    who = source if source is not None else None
    problem = (f"vertebral levels: at most {most} vertebral bodies (label {label_values.VERTEBRA}) "
               f"found on any slice{'' if subject_id is None else ' of ' + subject_id}; "
               f"segment scoring needs the seven bodies C2 ... T1")
    raise errors.LabelError(who, problem)
  # Largest cord area first; ties go to the earlier slice so the choice is deterministic.
  ref = max(valid, key=lambda i: (float(cord_area[i]), -i))
  bodies = found[ref][:NUM_LEVELS]
  return VertebralLevels(
      centroid_rows=np.array([b[0] for b in bodies], dtype=np.float64),
      centroid_cols=np.array([b[1] for b in bodies], dtype=np.float64),
      reference_slice=int(ref),
      num_bodies=len(found[ref]),
  )


def segment_truth_from_labels(label_slices: np.ndarray, levels: VertebralLevels) -> np.ndarray:
  """`[6]` bool: whether the lesion label (6) overlaps each segment's rows on any slice.

  Used when the cohort has no per-segment truth table; the lesion label never enters scoring.
  """
  label_slices = np.asarray(label_slices)
  lesion_rows = np.flatnonzero((label_slices == label_values.LESION).any(axis=(0, 2)))
  row_segment = levels.row_segments(label_slices.shape[1])
  truth = np.zeros(NUM_SEGMENTS, dtype=bool)
  for seg in row_segment[lesion_rows]:
    if seg >= 0:
      truth[seg] = True
  return truth
