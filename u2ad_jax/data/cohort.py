"""Discovery of a cohort on disk (BIDS-like layout) and its participants table.

Layout (what `u2ad synth` writes; real data arranged the same way loads the same way):

  root/sub-XXX/anat/sub-XXX_T2w.nii.gz                                  image
  root/derivatives/labels/sub-XXX/anat/sub-XXX_T2w_label.nii.gz        label map (required)
  root/derivatives/labels/sub-XXX/anat/sub-XXX_T2w_vertebrae.nii.gz    vertebra instances (optional)
  root/participants.tsv                                                 truth (optional)

Uncompressed `.nii` files are accepted wherever `.nii.gz` is.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Any, Sequence

from u2ad_jax import errors
from u2ad_jax import labels as label_defs

PathLike = str | os.PathLike

_NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# participants.tsv columns holding integers (0/1 truth flags and the grade).
_INT_COLUMNS = frozenset({"has_lesion", "grade", *label_defs.SEGMENT_NAMES})
_MISSING = frozenset({"", "n/a", "na", "nan", "none"})


@dataclasses.dataclass(frozen=True)
class SubjectFiles:
  """The files of one subject.

  Attributes:
    subject_id: e.g. "sub-001".
    image: T2-weighted volume.
    label: label map on the image grid.
    vertebrae: vertebra instance map (ids of `labels.VERTEBRA_INSTANCE_IDS`), or None.
  """
  subject_id: str
  image: str
  label: str
  vertebrae: str | None = None


def list_subjects(root: PathLike, subjects: Sequence[str] | None = None) -> list[SubjectFiles]:
  """Finds the subjects of a cohort, sorted by id.

  Args:
    root: cohort directory.
    subjects: optional ids to keep (in the given order); an id not found is an error.

  Raises:
    InputError: root missing, no subject found, a requested subject missing, or a subject
      without its label map (the message names the expected label file).
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise errors.InputError(root, "cohort directory not found")
  found = {}
  for name in sorted(os.listdir(root)):
    if not name.startswith("sub-") or not os.path.isdir(os.path.join(root, name)):
      continue
    image = _find_nifti(os.path.join(root, name, "anat", f"{name}_T2w"))
    if image is None:
      continue
    found[name] = image
  if not found:
    raise errors.InputError(root, "no subjects found (expected sub-XXX/anat/sub-XXX_T2w.nii.gz)")

  if subjects is None:
    wanted = list(found)
  else:
    wanted = list(subjects)
    missing = [s for s in wanted if s not in found]
    if missing:
      raise errors.InputError(root, f"requested subjects not found: {missing}")

  result = []
  for subject_id in wanted:
    derivative = os.path.join(root, "derivatives", "labels", subject_id, "anat", f"{subject_id}_T2w")
    label = _find_nifti(derivative + "_label")
    if label is None:
      raise errors.InputError(derivative + "_label.nii.gz", f"label map of {subject_id} not found")
    vertebrae = _find_nifti(derivative + "_vertebrae")
    result.append(SubjectFiles(subject_id, found[subject_id], label, vertebrae))
  return result


def read_participants(root: PathLike) -> dict[str, dict[str, Any]]:
  """Reads `root/participants.tsv` into `{participant_id: {column: value}}`.

  Values become Python values: integer columns (has_lesion, grade, one 0/1 column per segment
  C2-3 ... C7-T1) -> int; `lesion_levels` -> list of segment names (empty when none); other
  columns -> int or float when numeric, else str; "n/a" / empty -> None. Returns {} when the
  file does not exist (a cohort without truth is valid input; only scoring needs it).

  Raises:
    CorruptFileError: no `participant_id` column, or a value that does not parse.
  """
  path = os.path.join(os.fspath(root), "participants.tsv")
  if not os.path.isfile(path):
    return {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    if reader.fieldnames is None or "participant_id" not in reader.fieldnames:
      raise errors.CorruptFileError(path, "no participant_id column")
    table = {}
    for line, row in enumerate(reader, start=2):
      if None in row or any(v is None for v in row.values()):
        raise errors.CorruptFileError(path, f"line {line}: wrong number of columns")
      participant = row["participant_id"].strip()
      table[participant] = {key: _parse_value(path, line, key, value) for key, value in row.items()}
  return table


def check_participants(root: PathLike, subject_ids: Sequence[str],
                       participants: dict[str, dict[str, Any]]) -> None:
  """A cohort's folders and its participants.tsv must list the same subjects (when the table
  exists): a table left from another cohort would otherwise score some subjects without truth
  or pair truth with the wrong images.

  Raises:
    InputError: naming participants.tsv and the first subject found in one but not the other.
  """
  if not participants:
    return
  path = os.path.join(os.fspath(root), "participants.tsv")
  folders, listed = set(subject_ids), set(participants)
  for sid in sorted(folders - listed):
    raise errors.InputError(path, f"{sid} has a folder but no row ({len(folders - listed)} "
                                  "subject(s) missing from the table)")
  for sid in sorted(listed - folders):
    raise errors.InputError(path, f"{sid} is listed but has no {sid}/anat/{sid}_T2w image "
                                  f"({len(listed - folders)} listed subject(s) without one)")


# What generated a cohort (`derivatives/labels/dataset_description.json`, GeneratedBy[0].Name)
# -> its kind. A model or threshold of one kind means little on another.
_GENERATORS = {"u2ad_jax.phantom": "phantom",
               "u2ad_jax.phantom.pseudo_patients": "real-anatomy pseudo-patients",
               "u2ad prepare": "real scans"}


def cohort_kind(root: PathLike) -> str:
  """The kind of a cohort: "phantom", "real-anatomy pseudo-patients", "real scans (<tool>)"
  (`u2ad prepare`), or "unknown" (no generation record, e.g. a hand-made cohort)."""
  path = os.path.join(os.fspath(root), "derivatives", "labels", "dataset_description.json")
  try:
    with open(path, encoding="utf-8") as f:
      generated = json.load(f)["GeneratedBy"][0]
  except (OSError, ValueError, KeyError, IndexError, TypeError):
    return "unknown"
  kind = _GENERATORS.get(str(generated.get("Name")), "unknown")
  description = str(generated.get("Description", ""))
  if kind == "real scans" and description.startswith("labels converted from "):
    kind += f" ({description[len('labels converted from '):]})"
  return kind


def same_kind(a: str, b: str) -> bool:
  """Whether two `cohort_kind`s are the same kind of image (real scans of either tool are; an
  unknown kind is not compared)."""
  if "unknown" in (a, b):
    return True
  return a.split(" (")[0] == b.split(" (")[0]


def roi_definition(has_csf: bool) -> str:
  """The masking ROI a cohort's labels give (`sliceset.train_roi_from_labels`)."""
  return ("cord + CSF, dilated" if has_csf
          else "cord only, dilated (no CSF label: e.g. SCT without a canal mask)")


def first_subject_has_csf(root: PathLike) -> bool | None:
  """Whether the first subject's label map of a cohort has CSF (label 4); None when the cohort
  cannot be read (e.g. a training cohort moved away since). One file: cohorts are made by one
  tool, so their subjects share the label set."""
  try:
    import nibabel as nib  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    first = list_subjects(root)[0]
    return bool((np.asarray(nib.load(first.label).dataobj) == label_defs.CSF).any())
  except Exception:  # pylint: disable=broad-except  (a provenance note, never a failure)
    return None


def _find_nifti(stem: str) -> str | None:
  for ext in _NIFTI_EXTENSIONS:
    if os.path.isfile(stem + ext):
      return stem + ext
  return None


def _parse_value(path: str, line: int, key: str, value: str) -> Any:
  text = value.strip()
  if key == "participant_id":
    return text
  if key == "lesion_levels":
    if text.lower() in _MISSING:
      return []
    return [level for level in re.split(r"[,;| ]+", text) if level]
  if text.lower() in _MISSING:
    return None
  if key in _INT_COLUMNS:
    try:
      number = float(text)
    except ValueError:
      raise errors.CorruptFileError(path, f"line {line}: column {key} is not a number: {text!r}") from None
    if number != int(number):
      raise errors.CorruptFileError(path, f"line {line}: column {key} is not an integer: {text!r}")
    return int(number)
  for convert in (int, float):
    try:
      return convert(text)
    except ValueError:
      pass
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  return text
