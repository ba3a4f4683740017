"""Real scans in: TotalSpineSeg / Spinal Cord Toolbox segmentations -> the project's cohort layout.

A researcher with sagittal T2w scans gets everything the cohort needs (cord, CSF, vertebral
bodies, discs, vertebra identities) from tools that run on the scan alone, instead of drawing our
label map by hand. This module reads those tools' outputs, checks them, and converts them to
`labels.py` values plus the vertebra instance map (`labels.VERTEBRA_INSTANCE_IDS`, C2 -> 2 ...
T2 -> 9) that `data/levels.py` uses to name the levels by identity.

Conventions implemented (looked up in the tools' own documentation, not guessed):

TotalSpineSeg (`totalspineseg INPUT OUTPUT`, also `sct_deepseg totalspineseg`), the final output
`step2_output/<input name>.nii.gz`, README "List of Classes" of neuropoly/totalspineseg at commit
67f03f6 (2025, the nnunetv2 2.6.2 / labels_iso_bids_0924 release):
  1 spinal_cord, 2 spinal_canal (the canal voxels not labelled cord), 11-17 vertebrae C1-C7,
  21-32 T1-T12, 41-45 L1-L5, 50 sacrum, 63-67 discs C2-C3 ... C6-C7, 71-82 discs C7-T1 ...
  T11-T12, 91-95 discs T12-L1 ... L4-L5, 100 disc L5-S.
  The 2024 README (commit 0284d94) used TotalSegmentator's numbering (vertebrae 18-41, sacrum 92,
  cord 200, canal 201, discs 202-224); a file in that numbering is refused with a message saying
  so (its 92 would read as a lumbar disc in the new one).
  Conversion: cord -> 3; CSF -> 4 = canal minus cord (label 2 voxels); discs -> 1; vertebral body
  -> 2 = the voxels of a vertebra C2 ... sacrum ANTERIOR to the canal (TotalSpineSeg labels whole
  vertebrae, body and posterior arch; in a sagittal scan the body is the part in front of the
  canal: per axial level z, the voxels whose anterior coordinate exceeds the canal's most anterior
  voxel at that z, interpolated along z where the canal is not labelled). C1 has no body (its
  anterior arch is not one) and is left out of label 2. Vertebra map: the body voxels of C2 ... T2
  get their identity (12..17 -> 2..7, 21 -> 8, 22 -> 9); lower vertebrae are bodies without an id.
  TotalSpineSeg resamples its outputs back onto the input grid by default; `--iso` outputs are on
  another grid and are refused (shape / affine mismatch).

Spinal Cord Toolbox (`sct_deepseg_sc` or `sct_deepseg spinalcord`, then `sct_label_vertebrae`),
SCT documentation "Applying the labeling algorithm" (vertebral-labeling tutorial, SCT 6.x):
  `<stem>_seg_labeled.nii.gz`: the cord segmentation with each voxel valued by its vertebral level,
  "as though the vertebrae were projected onto the spinal cord", C3 -> 3, C4 -> 4, ... (counted
  from C1 = 1: C7 = 7, T1 = 8, ..., T12 = 19, L1 = 20 ... L5 = 24). `<stem>_seg_labeled_discs`
  (single voxels, C2/C3 -> 3, ...) is not needed: the level-valued cord carries the same levels.
  SCT gives no vertebral-body or disc masks, so a converted SCT cohort has none (labels 1 and 2
  stay empty): the vertebra map holds the level-valued CORD voxels of C2 ... T2 (SCT level n ->
  id n, the two numberings coincide there), and a level's centroid is the centre of its cord
  stretch, i.e. the vertebra's centre projected onto the cord. Scoring (segments between
  consecutive centroids) works the same; counting bodies (the fallback) is impossible, and the
  figures show no bodies. CSF needs a canal mask: `<stem>_canal_seg.nii.gz` (binary, cord
  included, e.g. from `sct_deepseg` canal models renamed to this name) is used when present; without
  it the cohort has no CSF label and the masking ROI is the dilated cord only (documented in the
  README; training then sees less of the CSF).

Checks (one line naming the file, nothing written): a scan without its segmentation, a
segmentation on another grid (shape, or affine beyond `nifti.AFFINE_ATOL_MM`), values that are not
the tool's, no cord, no segment with both of its levels in view (C2-3 ... C7-T1). A scan missing
only some of C2 ... T1 is converted with a warning: evaluation scores the segments it has and
writes n/a for the others (data/levels.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import nibabel as nib
import numpy as np

from u2ad_jax import errors
from u2ad_jax import labels as label_defs
from u2ad_jax.data import levels as levels_lib
from u2ad_jax.data import nifti

PathLike = str | os.PathLike

TOOLS = ("totalspineseg", "sct")

# --- TotalSpineSeg (step2_output, README at commit 67f03f6).
TSS_CORD = 1
TSS_CANAL = 2
TSS_VERTEBRAE = {
    **{f"C{i}": 10 + i for i in range(1, 8)},
    **{f"T{i}": 20 + i for i in range(1, 13)},
    **{f"L{i}": 40 + i for i in range(1, 6)},
    "sacrum": 50,
}
TSS_DISCS = frozenset([*range(63, 68), *range(71, 83), *range(91, 96), 100])
TSS_VALUES = frozenset({0, TSS_CORD, TSS_CANAL, *TSS_VERTEBRAE.values(), *TSS_DISCS})
# The 2024 (TotalSegmentator-style) numbering: cord 200, canal 201 are the tell-tale values.
TSS_LEGACY_MARKERS = frozenset({200, 201})

# --- Spinal Cord Toolbox: vertebral level values of `_seg_labeled` (C1 = 1 ... L5 = 24).
SCT_MAX_LEVEL = 24
SCT_LABELED_SUFFIX = "_seg_labeled"
SCT_CANAL_SUFFIX = "_canal_seg"
# A level-labelled cord occupies hundreds of mm^3 per level (cross-section ~50-80 mm^2 over
# 15-20 mm); point labels (sct_label_utils, `_seg_labeled_discs`) a few voxels. A file whose
# largest level is below this is point labels, not a cord: one axial millimetre of thin cord.
MIN_LEVEL_VOLUME_MM3 = 30.0

# Lesion masks of `prepare --lesions DIR`, by scan stem: the first that exists. `_lesion_seg`
# is sct_deepseg's lesion tasks (and the SCT test data), `_lesionseg` sct_deepseg_lesion's.
LESION_SUFFIXES = ("_lesion_seg", "_lesionseg", "_lesion")


NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# Our instance ids of C2 ... T2 in each tool's numbering.
_TSS_TO_INSTANCE = {TSS_VERTEBRAE[name]: i for name, i in label_defs.VERTEBRA_INSTANCE_IDS.items()}
_SCT_TO_INSTANCE = {level: level for level in label_defs.VERTEBRA_INSTANCE_IDS.values()}


@dataclasses.dataclass(frozen=True)
class Converted:
  """One scan's maps in the canonical RAS+ frame (`[X, Y, Z]` uint8).

  Attributes:
    labels: `labels.py` values (0, 1 disc, 2 body, 3 cord, 4 CSF, 6 lesion with a lesion mask).
    vertebrae: instance ids of C2 ... T2 (0 elsewhere).
    levels_present: the names of C2 ... T1 present in the vertebra map.
    levels_partial: those cut by the superior / inferior end of the field of view
      (`partial_levels`): their centroids are not their centres.
    tilt_degrees: angle between the cord and the S-I voxel axis (`levels.tilt_degrees`).
    lesion_voxels: voxels labelled lesion (6) from a lesion mask (`with_lesions`).
    lesion_outside_cord: lesion-mask voxels outside the cord, left unlabelled.
  """
  labels: np.ndarray
  vertebrae: np.ndarray
  levels_present: tuple[str, ...]
  levels_partial: tuple[str, ...] = ()
  tilt_degrees: float = 0.0
  lesion_voxels: int = 0
  lesion_outside_cord: int = 0

  @property
  def levels_missing(self) -> tuple[str, ...]:
    return tuple(n for n in label_defs.VERTEBRA_NAMES if n not in self.levels_present)

  @property
  def segments_missing(self) -> tuple[str, ...]:
    """Segments with a level out of view: n/a in evaluation (data/levels.py)."""
    names = label_defs.VERTEBRA_NAMES
    return tuple(seg for seg, upper, lower in zip(label_defs.SEGMENT_NAMES, names[:-1], names[1:])
                 if upper not in self.levels_present or lower not in self.levels_present)


def subject_id_for(filename: str) -> str:
  """The subject id of a scan file: its BIDS `sub-` entity, else `sub-` + the file stem with
  everything but letters and digits removed (the cohort layout needs `sub-<alphanumeric>`)."""
  stem = strip_nifti_extension(os.path.basename(filename))
  match = re.search(r"(?:^|_)sub-([A-Za-z0-9]+)", stem)
  if match:
    return f"sub-{match.group(1)}"
  label = re.sub(r"[^A-Za-z0-9]", "", stem)
  if not label:
    raise errors.InputError(filename, "cannot make a subject id from the file name (no letters "
                                      "or digits)")
  return f"sub-{label}"


def strip_nifti_extension(name: str) -> str:
  for ext in NIFTI_EXTENSIONS:
    if name.endswith(ext):
      return name[:-len(ext)]
  return name


def find_nifti(stem: str) -> str | None:
  for ext in NIFTI_EXTENSIONS:
    if os.path.isfile(stem + ext):
      return stem + ext
  return None


def segmentation_paths(tool: str, image_path: PathLike, segs_dir: PathLike) -> dict[str, str | None]:
  """The tool's files for one scan: {"seg": path, "canal": path or None}.

  Raises:
    InputError naming the expected segmentation file when it is missing.
  """
  segs_dir = os.fspath(segs_dir)
  stem = strip_nifti_extension(os.path.basename(os.fspath(image_path)))
  if tool == "totalspineseg":
    # `--segs` may be TotalSpineSeg's whole output folder; its final labels are step2_output/.
    if os.path.isdir(os.path.join(segs_dir, "step2_output")):
      segs_dir = os.path.join(segs_dir, "step2_output")
    seg = find_nifti(os.path.join(segs_dir, stem))
    if seg is None:
      raise errors.InputError(os.path.join(segs_dir, stem + ".nii.gz"),
                              f"TotalSpineSeg segmentation of {os.fspath(image_path)} not found "
                              f"(TotalSpineSeg names its output after the input)")
    return {"seg": seg, "canal": None}
  if tool == "sct":
    seg = find_nifti(os.path.join(segs_dir, stem + SCT_LABELED_SUFFIX))
    if seg is None:
      expected = os.path.join(segs_dir, stem + SCT_LABELED_SUFFIX + ".nii.gz")
      others = sorted(n for n in os.listdir(segs_dir) if n.startswith(stem + "_")
                      and n.endswith(NIFTI_EXTENSIONS) and "_labeled" not in n)
      if others:
        # Usually the plain cord mask of sct_deepseg_sc: say which step is missing.
        hint = label_vertebrae_hint(os.path.basename(os.fspath(image_path)), others[0])
        raise errors.InputError(expected, f"SCT level-labelled cord of {os.fspath(image_path)} "
                                          f"not found; {others[0]} is there, but scoring needs "
                                          f"the vertebral levels: {hint}")
      raise errors.InputError(expected, f"SCT level-labelled cord of {os.fspath(image_path)} not "
                                        f"found (sct_label_vertebrae writes "
                                        f"<scan>{SCT_LABELED_SUFFIX}.nii.gz)")
    return {"seg": seg, "canal": find_nifti(os.path.join(segs_dir, stem + SCT_CANAL_SUFFIX))}
  raise ValueError(f"unknown tool {tool!r}; expected one of {TOOLS}")


def label_vertebrae_hint(scan_name: str, cord_mask: PathLike) -> str:
  """How to get the level-labelled cord of `scan_name` (a file name) from a plain cord mask, as
  one clause (sct_label_vertebrae names its output after the mask: `<mask>_labeled`)."""
  scan_stem = strip_nifti_extension(os.path.basename(scan_name))
  mask_name = os.path.basename(os.fspath(cord_mask))
  return (f"run `sct_label_vertebrae -i {scan_name} -s {mask_name} -c t2` and put the "
          f"{strip_nifti_extension(mask_name)}_labeled.nii.gz it writes into --segs as "
          f"{scan_stem}{SCT_LABELED_SUFFIX}.nii.gz")


def lesion_path(image_path: PathLike, lesions_dir: PathLike) -> str:
  """The lesion mask of a scan in `lesions_dir` (`<stem>` + one of LESION_SUFFIXES).

  Raises:
    InputError naming the expected file: every scan needs one once --lesions is given (an
    all-zero mask says "no lesion"; a missing file would be an unknown, not a healthy, cord).
  """
  stem = strip_nifti_extension(os.path.basename(os.fspath(image_path)))
  for suffix in LESION_SUFFIXES:
    found = find_nifti(os.path.join(os.fspath(lesions_dir), stem + suffix))
    if found is not None:
      return found
  raise errors.InputError(os.path.join(os.fspath(lesions_dir), stem + LESION_SUFFIXES[0] +
                                       ".nii.gz"),
                          f"lesion mask of {os.fspath(image_path)} not found (looked for "
                          f"{', '.join(stem + s for s in LESION_SUFFIXES)}); give an all-zero "
                          f"mask for a scan without lesion")


def read_segmentation(path: PathLike, image: nifti.Volume) -> np.ndarray:
  """Reads an integer segmentation that must lie on the image's voxel grid.

  Returns:
    `[X, Y, Z]` int32 in the image's canonical frame.

  Raises:
    CorruptFileError, GeometryError (not 3D, other shape or affine than the image),
    LabelError (non-integer or non-finite values).
  """
  path = os.fspath(path)
  try:
    img = nib.load(path)
    stored = np.asarray(img.dataobj)
  except Exception as e:  # nibabel / gzip raise many types for damaged files
    raise errors.CorruptFileError(path, f"cannot read as NIfTI ({type(e).__name__}: {e})") from e
  shape = tuple(int(s) for s in stored.shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise errors.GeometryError(path, f"expected a 3D segmentation, got shape {stored.shape}")
  stored = stored.reshape(shape)
  if shape != image.orientation.shape:
    raise errors.GeometryError(path, f"shape {shape} differs from the scan's "
                                     f"{image.orientation.shape} ({image.path}); segmentations "
                                     f"must be on the scan's grid (TotalSpineSeg: without --iso)")
  diff = float(np.abs(np.asarray(img.affine, np.float64) - image.orientation.affine).max())
  if diff > nifti.AFFINE_ATOL_MM:
    raise errors.GeometryError(path, f"affine differs from the scan's ({image.path}) by up to "
                                     f"{diff:.4g} mm (tolerance {nifti.AFFINE_ATOL_MM}): not the "
                                     f"same grid")
  if np.issubdtype(stored.dtype, np.floating):
    if not np.all(np.isfinite(stored)):
      raise errors.LabelError(path, "segmentation has NaN / Inf values")
    rounded = np.rint(stored)
    if np.any(np.abs(stored - rounded) > 1e-3):
      raise errors.LabelError(path, "segmentation has non-integer values (a probability map, "
                                    "not labels?)")
    stored = rounded
  return np.ascontiguousarray(image.orientation.to_canonical(stored.astype(np.int32)))


def _unknown_values(path: str, seg: np.ndarray, allowed: frozenset[int], what: str) -> None:
  values = set(np.unique(seg).tolist())
  unknown = sorted(values - allowed)
  if unknown:
    shown = unknown[:8] + (["..."] if len(unknown) > 8 else [])
    raise errors.LabelError(path, f"values {shown} are not {what}")


def convert_totalspineseg(seg: np.ndarray, path: PathLike = "<segmentation>",
                          voxel_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> Converted:
  """TotalSpineSeg step-2 labels `[X, Y, Z]` (canonical RAS+) -> our maps (module docstring);
  `voxel_mm` (canonical voxel size) measures the field-of-view margin and the cord's tilt."""
  path = os.fspath(path)
  seg = np.asarray(seg)
  values = set(np.unique(seg).tolist())
  if values & TSS_LEGACY_MARKERS and not values & {TSS_CORD, TSS_CANAL}:
    raise errors.LabelError(path, "values 200/201 (cord/canal) are the 2024 TotalSpineSeg "
                                  "numbering; re-run a current TotalSpineSeg (cord 1, canal 2)")
  _unknown_values(path, seg, TSS_VALUES, "TotalSpineSeg step-2 labels (cord 1, canal 2, "
                                         "vertebrae 11-50, discs 63-100)")
  cord = seg == TSS_CORD
  if not cord.any():
    raise errors.LabelError(path, f"no spinal cord voxel (label {TSS_CORD})")
  canal = cord | (seg == TSS_CANAL)
  bone = np.isin(seg, [v for n, v in TSS_VERTEBRAE.items() if n != "C1"])
  body = bone & anterior_to(canal, path)
  labels = np.zeros(seg.shape, np.uint8)
  labels[np.isin(seg, sorted(TSS_DISCS))] = label_defs.DISC
  labels[body] = label_defs.VERTEBRA
  labels[seg == TSS_CANAL] = label_defs.CSF
  labels[cord] = label_defs.CORD
  vertebrae = np.zeros(seg.shape, np.uint8)
  for tool_value, instance in _TSS_TO_INSTANCE.items():
    vertebrae[body & (seg == tool_value)] = instance
  return _finish(path, labels, vertebrae, voxel_mm)


def convert_sct(levels_cord: np.ndarray, canal: np.ndarray | None = None,
                path: PathLike = "<segmentation>",
                canal_path: PathLike = "<canal>",
                voxel_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> Converted:
  """SCT level-valued cord (and optional binary canal) `[X, Y, Z]` -> our maps (docstring).

  Raises LabelError for the two common mix-ups: a plain binary cord mask (values 0 / 1) and
  sparse point labels (every level under MIN_LEVEL_VOLUME_MM3, `voxel_mm` the voxel size)."""
  path = os.fspath(path)
  levels_cord = np.asarray(levels_cord)
  _unknown_values(path, levels_cord, frozenset(range(SCT_MAX_LEVEL + 1)),
                  f"SCT vertebral levels of a labelled cord (0, C1 = 1 ... L5 = {SCT_MAX_LEVEL}); "
                  f"pass sct_label_vertebrae's {SCT_LABELED_SUFFIX} file")
  cord = levels_cord > 0
  if not cord.any():
    raise errors.LabelError(path, "no spinal cord voxel (all zero)")
  if set(np.unique(levels_cord).tolist()) == {0, 1}:
    # Only "C1": a binary cord mask (sct_deepseg_sc), not a level-labelled one.
    scan = _scan_of(path)
    raise errors.LabelError(path, "a plain binary cord mask (values 0 / 1, as sct_deepseg_sc "
                                  "writes), not a cord labelled by vertebral level: "
                                  + label_vertebrae_hint(scan + ".nii.gz", scan + "_seg.nii.gz"))
  voxel_mm3 = float(np.prod(voxel_mm))
  values, counts = np.unique(levels_cord[cord], return_counts=True)
  if counts.max() * voxel_mm3 < MIN_LEVEL_VOLUME_MM3:
    shown = ", ".join(f"{_sct_level_name(v)}: {n * voxel_mm3:.0f} mm^3"
                      for v, n in zip(values, counts))
    raise errors.LabelError(path, f"sparse labels ({shown}): point labels such as sct_label_utils "
                                  f"or the {SCT_LABELED_SUFFIX}_discs file write, not a cord "
                                  f"labelled by vertebral level; pass sct_label_vertebrae's "
                                  f"<scan>{SCT_LABELED_SUFFIX}.nii.gz")
  labels = np.zeros(levels_cord.shape, np.uint8)
  if canal is not None:
    canal = np.asarray(canal)
    _unknown_values(os.fspath(canal_path), canal, frozenset({0, 1}), "a binary canal mask (0 / 1)")
    labels[(canal > 0) & ~cord] = label_defs.CSF
  labels[cord] = label_defs.CORD
  vertebrae = np.zeros(levels_cord.shape, np.uint8)
  for level, instance in _SCT_TO_INSTANCE.items():
    vertebrae[levels_cord == level] = instance
  return _finish(path, labels, vertebrae, voxel_mm)


def _scan_of(seg_path: PathLike) -> str:
  """The scan name a `<scan>_seg_labeled` (or other `<scan>_...`) file belongs to, for hints."""
  stem = strip_nifti_extension(os.path.basename(os.fspath(seg_path)))
  for suffix in (SCT_LABELED_SUFFIX, "_seg"):
    if stem.endswith(suffix):
      return stem[:-len(suffix)]
  return stem


def _sct_level_name(value: int) -> str:
  value = int(value)
  if value <= 7:
    return f"C{value}"
  return f"T{value - 7}" if value <= 19 else f"L{value - 19}"


def anterior_to(canal: np.ndarray, path: PathLike = "<segmentation>") -> np.ndarray:
  """`[X, Y, Z]` bool: voxels anterior to the canal's most anterior voxel at their axial level z
  (any x), the edge interpolated linearly along z where the canal is not labelled.

  The levels are voxel planes, not world S-I positions: for a straight spine the canal's anterior
  wall and the bodies' posterior walls are parallel lines, so "in front of the wall in the same
  plane" holds at any tilt of the grid below 90 degrees (measured on the phantom with its grid
  rotated 0-75 degrees against the body: the same body voxels, Dice 1.000). What a tilt does
  break is the scoring by row bands (`levels.MAX_TILT_DEGREES`, warned about in `prepare`).
  """
  canal = np.asarray(canal, bool)
  levels_with_canal = canal.any(axis=(0, 1))
  if not levels_with_canal.any():
    raise errors.LabelError(path, "no spinal canal voxel: the vertebral bodies cannot be told "
                                  "from the posterior arches")
  y = np.arange(canal.shape[1])
  edge = np.where(canal.any(axis=0), y[:, None], -1).max(axis=0).astype(np.float64)  # [Z]
  z = np.arange(canal.shape[2])
  edge = np.interp(z, z[levels_with_canal], edge[levels_with_canal])
  return np.broadcast_to(y[None, :, None] > edge[None, None, :], canal.shape)


def partial_levels(vertebrae: np.ndarray, voxel_mm: Sequence[float],
                   margin_mm: float = levels_lib.PARTIAL_LEVEL_MARGIN_MM) -> tuple[str, ...]:
  """Names of C2 ... T1 in a `[X, Y, Z]` vertebra map (canonical: z = S-I) whose voxels come
  within `margin_mm` of the field of view's superior or inferior end: cut by it."""
  margin = int(np.ceil(margin_mm / float(voxel_mm[2]) - 1e-9))
  # levels_lib.partial_levels works on [S, H, W] with rows superior -> inferior; the canonical
  # z axis as "rows" (its direction does not matter for a two-sided margin).
  as_rows = np.moveaxis(np.asarray(vertebrae), 2, 1)
  return levels_lib.partial_levels(as_rows, np.ones(as_rows.shape[1], bool), margin)


def _finish(path: str, labels: np.ndarray, vertebrae: np.ndarray,
            voxel_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> Converted:
  present = tuple(n for n in label_defs.VERTEBRA_NAMES
                  if (vertebrae == label_defs.VERTEBRA_INSTANCE_IDS[n]).any())
  converted = Converted(labels=labels, vertebrae=vertebrae, levels_present=present,
                        levels_partial=partial_levels(vertebrae, voxel_mm),
                        tilt_degrees=levels_lib.tilt_degrees(labels == label_defs.CORD, voxel_mm,
                                                             axis=2))
  if len(converted.segments_missing) == len(label_defs.SEGMENT_NAMES):
    shown = ", ".join(present) if present else "none"
    raise errors.LabelError(path, f"vertebrae in view among C2 ... T1: {shown}; no segment C2-3 "
                                  f"... C7-T1 has both of its levels in view, nothing could be "
                                  f"scored (sagittal cervical T2w with C2 ... T1 needed)")
  return converted


def with_lesions(converted: Converted, lesion: np.ndarray,
                 path: PathLike = "<lesion mask>") -> Converted:
  """`converted` with the voxels of a lesion mask `[X, Y, Z]` (0 = none, any positive integer =
  lesion) inside the cord labelled 6 (T2 hyperintensity). Lesion voxels outside the cord stay
  unlabelled and are counted (`lesion_outside_cord`): the scoring ROI is the cord, and a T2
  hyperintensity of the method lies in it."""
  lesion = np.asarray(lesion)
  if (lesion < 0).any():
    raise errors.LabelError(path, "negative values; a lesion mask is 0 (none) / 1 (lesion)")
  lesion = lesion > 0
  cord = np.isin(converted.labels, label_defs.CORD_LABELS)
  labels = converted.labels.copy()
  labels[lesion & cord] = label_defs.LESION
  return dataclasses.replace(converted, labels=labels,
                             lesion_voxels=int((lesion & cord).sum()),
                             lesion_outside_cord=int((lesion & ~cord).sum()))


def convert_scan(tool: str, image: nifti.Volume, files: dict[str, str | None]) -> Converted:
  """Reads and converts one scan's segmentation files (see `segmentation_paths`; `files` may
  also name a lesion mask, `files["lesion"]`, see `with_lesions`)."""
  seg = read_segmentation(files["seg"], image)
  voxel_mm = tuple(float(v) for v in image.voxel_mm)
  if tool == "totalspineseg":
    converted = convert_totalspineseg(seg, files["seg"], voxel_mm)
  else:
    canal = None if files.get("canal") is None else read_segmentation(files["canal"], image)
    converted = convert_sct(seg, canal, files["seg"], files.get("canal") or "<canal>", voxel_mm)
  if files.get("lesion") is not None:
    converted = with_lesions(converted, read_segmentation(files["lesion"], image),
                             files["lesion"])
  return converted
