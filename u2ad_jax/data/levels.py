"""Vertebral levels C2 ... T1 of a subject, and the six scored segments.

Two ways to find the levels, by preference:

1. By identity, wherever the cohort has a vertebra instance map (`..._T2w_vertebrae.nii.gz`: the
   phantom's, or the one `u2ad prepare` derives from TotalSpineSeg / Spinal Cord Toolbox labels;
   ids of `labels.VERTEBRA_INSTANCE_IDS`, C2 -> 2 ... T1 -> 8). Vertebra C5 is the voxels with
   id 5 whatever the field of view, so a scan that starts below C1, or a body that is fused with
   its neighbour or missing from the body label, cannot shift the names. The reference slice is
   the slice with the largest cord area among those showing all seven ids C2 ... T1, and each
   centroid is the centroid of its id on that slice (on the phantom this is exactly the body the
   counting rule finds, so its results do not change). When no single slice shows all seven (a
   tilted spine in thin slices), each centroid is that id's centroid over all of the subject's
   slices (they share the row grid).
   Missing levels are n/a, not refused: a scan whose field of view lacks some of C2 ... T1 (e.g.
   it starts at C3) gets a NaN centroid for each missing level, and every segment with a missing
   end (C2-3 there) is n/a: no rows, a NaN score, never flagged, left out of the threshold's pool
   and of the metrics, and written as n/a in every table. A scan needs at least one complete
   segment (two adjacent levels) to be scored at all; with none, LabelError names what is
   missing.
2. By counting, the fallback for label maps without identities (the original release's format):

Rule: the vertebral-body label (2) of a sagittal slice is split into
4-connected components; components much smaller than the slice's typical body (a stray voxel, a
cut corner at the field-of-view edge) are dropped; the rest are ordered top-down by centroid row
and the first seven are C2, C3, ..., C7, T1. Segment `C{k}-{k+1}` spans the rows from the centroid
of vertebra k to the centroid of vertebra k+1 (half-open, so every row belongs to at most one
segment); rows above the C2 centroid or below the T1 centroid belong to no segment.

One subject has several slices; the levels are read from ONE reference slice and shared by all of
the subject's slices (they share the model's row grid): the slice with the largest cord area among
those that show at least seven bodies. The midline slice shows every body completely, while
off-midline slices may miss a body or cut it into pieces, which would shift the ordering.
Counting cannot know where the field of view starts: a scan starting at C3 is scored one level
off. That is why identities win wherever they exist.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import labels as label_values

# Components below this fraction of the slice's median body area are fragments, not bodies.
MIN_BODY_FRACTION = 0.25
# A level whose voxels come this close (mm) to the superior / inferior end of the field of view
# is cut by it: its centroid is not its centre, nor are the segment bounds it sets (SCT cord
# masks stop 1-3 mm short of the edge, hence a margin rather than "touches the edge").
PARTIAL_LEVEL_MARGIN_MM = 3.0
# Beyond this angle between the cord and the image's S-I axis, row bands between level
# centroids misname segments: a vertebral-body centroid lies ~20 mm in front of the cord, so a
# tilt t moves its row by ~20 sin(t) mm against the cord (measured on 12 phantom lesion patients
# with their slices rotated in plane: 10 degrees already moves 2-7 of 17 lesion segments' truth
# into a neighbouring band). Warned about, not corrected.
MAX_TILT_DEGREES = 25.0
NUM_LEVELS = len(label_values.VERTEBRA_NAMES)
NUM_SEGMENTS = len(label_values.SEGMENT_NAMES)


@dataclasses.dataclass(frozen=True)
class VertebralLevels:
  """Levels of one subject in the model's slice frame.

  Attributes:
    centroid_rows: `[7]` float, centroid rows of C2 ... T1, strictly increasing (superior first);
      NaN for a level outside the field of view (identity only).
    centroid_cols: `[7]` float, centroid columns (for drawing).
    reference_slice: position, within the subject's slices, of the slice the levels come from.
    num_bodies: number of bodies found on the reference slice (>= 7; extra ones are T2, T3 ...);
      by identity: the number of distinct vertebra ids on it.
    method: "identity" (vertebra instance map) or "count" (body components, C2 first).
  """
  centroid_rows: np.ndarray
  centroid_cols: np.ndarray
  reference_slice: int
  num_bodies: int
  method: str = "count"

  @property
  def names(self) -> tuple[str, ...]:
    return label_values.VERTEBRA_NAMES

  @property
  def segments_present(self) -> np.ndarray:
    """`[6]` bool: segments whose two bounding levels are both in view (n/a otherwise)."""
    present = np.isfinite(self.centroid_rows)
    return present[:-1] & present[1:]

  def segment_bounds(self) -> np.ndarray:
    """`[6, 2]` float: (start row, end row) of each segment, start inclusive, end exclusive."""
    return np.stack([self.centroid_rows[:-1], self.centroid_rows[1:]], axis=1)

  def row_segments(self, height: int) -> np.ndarray:
    """`[H]` int: the segment index (0 = C2-3 ... 5 = C7-T1) of each row, -1 outside C2..T1
    and in n/a segments."""
    rows = np.arange(height, dtype=np.float64)
    index = np.full(height, -1, dtype=np.int64)
    for seg in np.flatnonzero(self.segments_present):
      start, stop = self.centroid_rows[seg], self.centroid_rows[seg + 1]
      index[(rows >= start) & (rows < stop)] = seg
    return index


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
                vertebrae: np.ndarray | None = None,
                source: str | os.PathLike | None = None,
                subject_id: str | None = None) -> VertebralLevels:
  """Vertebral levels C2 ... T1 of one subject (by identity when `vertebrae` has ids).

  Args:
    label_slices: `[S, H, W]` label maps of the subject's slices (model frame).
    cord_area: `[S]` cord pixel count per slice, used to prefer the midline slice; by default the
      count of labels 3 and 6.
    vertebrae: `[S, H, W]` vertebra instance ids (0 = none) or None; all zeros (a cohort without
      a vertebra map) means "no identities" and the bodies are counted.
    source: the subject's label (or vertebra) file, named in the error.
    subject_id: named in the error when `source` is unknown.

  Raises:
    errors.LabelError: by identity, when any of C2 ... T1 is missing or the ids are not in
      top-down order; by counting, when no slice shows at least seven vertebral bodies.
  """
  label_slices = np.asarray(label_slices)
  if label_slices.ndim != 3:
    raise ValueError(f"label_slices must be [S, H, W], got {label_slices.shape}")
  if cord_area is None:
    cord_area = np.isin(label_slices, label_values.CORD_LABELS).sum(axis=(1, 2))
  if vertebrae is not None and np.asarray(vertebrae).any():
    return levels_by_identity(np.asarray(vertebrae), np.asarray(cord_area), source=source,
                              subject_id=subject_id)
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


def levels_by_identity(vertebrae: np.ndarray, cord_area: np.ndarray, *,
                       source: str | os.PathLike | None = None,
                       subject_id: str | None = None) -> VertebralLevels:
  """Levels from a `[S, H, W]` vertebra instance map (see the module docstring, rule 1)."""
  if vertebrae.ndim != 3:
    raise ValueError(f"vertebrae must be [S, H, W], got {vertebrae.shape}")
  ids = [label_values.VERTEBRA_INSTANCE_IDS[name] for name in label_values.VERTEBRA_NAMES]
  who = "" if subject_id is None else f" of {subject_id}"
  present = [set(np.unique(v).tolist()) for v in vertebrae]
  everywhere = set().union(*present)
  in_view = np.array([i in everywhere for i in ids])
  if not (in_view[:-1] & in_view[1:]).any():
    shown = [n for n, ok in zip(label_values.VERTEBRA_NAMES, in_view) if ok] or ["none"]
    raise errors.LabelError(
        source, f"vertebral levels{who}: only {', '.join(shown)} of C2 ... T1 in the scored "
                f"slices (vertebra map); no segment has both of its levels in view")
  ids_in_view = [i for i, ok in zip(ids, in_view) if ok]
  complete = [i for i, p in enumerate(present) if all(v in p for v in ids_in_view)]
  rows_grid = np.arange(vertebrae.shape[1], dtype=np.float64)[:, None]
  cols_grid = np.arange(vertebrae.shape[2], dtype=np.float64)[None, :]
  if complete:
    # Largest cord area first; ties go to the earlier slice (as in the counting rule).
    ref = max(complete, key=lambda i: (float(cord_area[i]), -i))
    where = vertebrae[ref:ref + 1]
  else:
    ref = int(np.argmax(cord_area))
    where = vertebrae
  centroid_rows, centroid_cols = [], []
  for v, ok in zip(ids, in_view):
    mask = (where == v).astype(np.float64)
    total = mask.sum() if ok else 0.0
    centroid_rows.append(float((mask * rows_grid).sum() / total) if total else np.nan)
    centroid_cols.append(float((mask * cols_grid).sum() / total) if total else np.nan)
  centroid_rows = np.asarray(centroid_rows)
  if np.any(np.diff(centroid_rows[np.isfinite(centroid_rows)]) <= 0):
    order = ", ".join(f"{n} {r:.1f}" for n, r in zip(label_values.VERTEBRA_NAMES, centroid_rows))
    raise errors.LabelError(source, f"vertebral levels{who}: vertebra ids are not in top-down "
                                    f"order (centroid rows {order})")
  return VertebralLevels(
      centroid_rows=centroid_rows, centroid_cols=np.asarray(centroid_cols),
      reference_slice=int(ref), num_bodies=len(present[ref] - {0}), method="identity")


def describe(levels: dict[str, VertebralLevels]) -> str:
  """One line for reports: how the cohort's levels were found."""
  methods = sorted({lv.method for lv in levels.values()})
  parts = {"identity": "by vertebra identity (vertebra instance map: C5-6 lies between the C5 and "
                       "C6 bodies whatever the field of view)",
           "count": "by counting vertebral-body components top-down, the first one called C2 "
                    "(no vertebra instance map)"}
  counts = {m: sum(lv.method == m for lv in levels.values()) for m in methods}
  text = "; ".join(f"{parts[m]}: {counts[m]} patient{'s' if counts[m] != 1 else ''}"
                   for m in methods)
  partial = {sid: [n for n, ok in zip(label_values.SEGMENT_NAMES, lv.segments_present) if not ok]
             for sid, lv in levels.items() if not lv.segments_present.all()}
  if partial:
    text += ("; segments outside the field of view are n/a (not scored, not flagged, not in the "
             "threshold or the metrics): " +
             ", ".join(f"{sid} {'/'.join(segs)}" for sid, segs in sorted(partial.items())))
  return text


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


def partial_levels(vertebrae: np.ndarray, rows_in_view: np.ndarray,
                   margin_rows: int) -> tuple[str, ...]:
  """Names of C2 ... T1 cut by the field of view on the model grid.

  Args:
    vertebrae: `[S, H, W]` vertebra instance ids of one subject's slices.
    rows_in_view: `[H]` bool, the model rows inside the acquired volume.
    margin_rows: a level with a voxel within this many rows of the first or last row in view
      is cut (PARTIAL_LEVEL_MARGIN_MM in rows).
  """
  rows = np.flatnonzero(np.asarray(rows_in_view, bool))
  if rows.size == 0:
    return ()
  first, last = int(rows.min()), int(rows.max())
  cut = []
  for name in label_values.VERTEBRA_NAMES:
    present = np.flatnonzero((np.asarray(vertebrae) ==
                              label_values.VERTEBRA_INSTANCE_IDS[name]).any(axis=(0, 2)))
    if present.size and (present.min() < first + margin_rows or
                         present.max() > last - margin_rows):
      cut.append(name)
  return tuple(cut)


def tilt_degrees(mask: np.ndarray, spacing: Sequence[float], axis: int) -> float:
  """Angle (degrees) between the long axis of a mask (the principal direction of its voxel
  coordinates, each axis scaled by `spacing` in mm) and the array axis `axis` (the S-I axis:
  canonical z of a volume, the rows of model slices `[S, H, W]`); 0 for a cord along it."""
  points = np.argwhere(np.asarray(mask, bool)).astype(np.float64)
  if points.shape[0] < 3:
    return 0.0
  points = (points - points.mean(axis=0)) * np.asarray(spacing, np.float64)[None]
  _, _, vt = np.linalg.svd(points, full_matrices=False)
  return float(np.degrees(np.arccos(min(1.0, abs(float(vt[0, axis]))))))
