"""A generated cohort on disk: the BIDS-like layout, participants table and sidecars.

Every file is written atomically (temporary file in the same directory, then os.replace) and
NIfTI bytes carry mtime 0, so the same seed gives byte-identical files. The real-anatomy
generator (`pseudo_patients`) writes its subjects with the same writer and table.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from typing import Callable

import numpy as np

from u2ad_jax import labels as L
from u2ad_jax.phantom import generator

def _atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
  """Gzipped NIfTI-1 bytes with the affine as qform and sform (mtime 0: byte-deterministic)."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm", "sec")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def subject_paths(out_dir: str | os.PathLike, subject_id: str) -> dict[str, str]:
  """The BIDS-like paths of one subject's image, label map and vertebra map."""
  root = os.fspath(out_dir)
  labels_dir = os.path.join(root, "derivatives", "labels", subject_id, "anat")
  return dict(image=os.path.join(root, subject_id, "anat", f"{subject_id}_T2w.nii.gz"),
              label=os.path.join(labels_dir, f"{subject_id}_T2w_label.nii.gz"),
              vertebrae=os.path.join(labels_dir, f"{subject_id}_T2w_vertebrae.nii.gz"),
              lesions=os.path.join(labels_dir, f"{subject_id}_T2w_lesions.json"))


def write_subject(out_dir: str | os.PathLike, subject: generator.Subject) -> dict[str, str]:
  """Writes one subject's NIfTI files (and per-lesion truth JSON) atomically."""
  paths = subject_paths(out_dir, subject.subject_id)
  _atomic_write_bytes(paths["image"], _nifti_bytes(subject.image.astype(np.float32), subject.affine))
  _atomic_write_bytes(paths["label"], _nifti_bytes(subject.labels.astype(np.uint8), subject.affine))
  _atomic_write_bytes(paths["vertebrae"], _nifti_bytes(subject.vertebrae.astype(np.uint8), subject.affine))
  record = dict(participant_id=subject.subject_id, profile=subject.profile, truth=subject.truth,
                lesions=subject.lesions, noise_sigma=subject.noise_sigma, meta=subject.meta)
  _atomic_write_bytes(paths["lesions"], (json.dumps(record, indent=1, default=_json_default) + "\n").encode())
  return paths


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value)}")


PARTICIPANT_COLUMNS = (("participant_id", "profile", "has_lesion", "grade", "lesion_levels")
                       + L.SEGMENT_NAMES + ("num_lesions", "compressed_levels", "num_slices",
                                            "slice_thickness_mm", "pixel_mm"))


def participant_row(subject: generator.Subject) -> dict[str, str]:
  t = subject.truth
  row = dict(participant_id=subject.subject_id, profile=subject.profile, has_lesion=str(t["has_lesion"]),
             grade=str(t["grade"]), lesion_levels=";".join(t["lesion_levels"]) or "n/a",
             num_lesions=str(t["num_lesions"]),
             compressed_levels=";".join(t["compressed_levels"]) or "n/a",
             num_slices=str(subject.num_slices),
             slice_thickness_mm=f"{subject.meta['slice_thickness_mm']:.3f}",
             pixel_mm=f"{subject.meta['pixel_mm']:.4f}")
  for name in L.SEGMENT_NAMES:
    row[name] = str(t["segments"][name])
  return row


def subject_seed(seed: int, index: int, profile: str) -> int:
  """Independent per-subject seed from (cohort seed, subject index, profile)."""
  code = sorted(generator.PROFILES).index(profile)
  return int(np.random.SeedSequence([int(seed), int(index), code]).generate_state(1)[0])


def lesion_assignment(num_subjects: int, fraction: float, seed: int) -> np.ndarray:
  """`[N]` bool: exactly round(fraction * N) lesion subjects, in a seeded random order."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"lesion fraction must be in [0, 1], got {fraction}")
  count = int(round(fraction * num_subjects))
  flags = np.zeros(num_subjects, bool)
  flags[:count] = True
  return np.random.default_rng(np.random.SeedSequence([int(seed), 7919])).permutation(flags)


def write_cohort(out_dir: str | os.PathLike, num_subjects: int, profile: str, seed: int,
                 lesion_fraction: float | None = None, *, num_slices: int | None = None,
                 progress: Callable[[int, generator.Subject, float], None] | None = None) -> str:
  """Generates and writes a cohort in the BIDS-like layout.

  Layout: out/sub-XXX/anat/sub-XXX_T2w.nii.gz, out/derivatives/labels/sub-XXX/anat/
  sub-XXX_T2w_label.nii.gz and sub-XXX_T2w_vertebrae.nii.gz (+ sub-XXX_T2w_lesions.json),
  out/participants.tsv (+ participants.json), out/dataset_description.json. Every file is
  written atomically (temporary file in the same directory, then os.replace).

  Args:
    out_dir: cohort root (created).
    num_subjects: number of subjects (>= 1).
    profile: "public" or "clinical".
    seed: cohort seed; subject i uses `subject_seed(seed, i, profile)`.
    lesion_fraction: fraction of lesion subjects (exactly rounded); default 0.5 for clinical,
      0.0 for public.
    num_slices: override the profile's number of slices per subject.
    progress: called after each subject with (index, subject, seconds).

  Returns:
    The path of participants.tsv.
  """
  if profile not in generator.PROFILES:
    raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(generator.PROFILES)}")
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  fraction = generator.PROFILES[profile].lesion_fraction if lesion_fraction is None else float(lesion_fraction)
  flags = lesion_assignment(num_subjects, fraction, seed)
  root = os.fspath(out_dir)
  os.makedirs(root, exist_ok=True)
  width = max(3, len(str(num_subjects)))
  rows = []
  for i in range(num_subjects):
    start = time.perf_counter()
    sid = f"sub-{i + 1:0{width}d}"
    subject = generator.generate_subject(sid, profile, subject_seed(seed, i, profile), bool(flags[i]),
                               num_slices=num_slices)
    write_subject(root, subject)
    rows.append(participant_row(subject))
    if progress is not None:
      progress(i, subject, time.perf_counter() - start)
  lines = ["\t".join(PARTICIPANT_COLUMNS)]
  lines += ["\t".join(row[c] for c in PARTICIPANT_COLUMNS) for row in rows]
  tsv = os.path.join(root, "participants.tsv")
  _atomic_write_bytes(tsv, ("\n".join(lines) + "\n").encode())
  _atomic_write_bytes(os.path.join(root, "participants.json"),
                      (json.dumps(PARTICIPANTS_SIDECAR, indent=1) + "\n").encode())
  description = dict(
      Name=f"u2ad_jax synthetic cervical-spine cohort ({profile})", BIDSVersion="1.8.0", DatasetType="raw",
      License="MIT", GeneratedBy=[dict(Name="u2ad_jax.phantom", Description="seeded NumPy phantom")],
      Generator=dict(profile=profile, seed=int(seed), num_subjects=int(num_subjects),
                     lesion_fraction=fraction, num_slices=num_slices))
  _atomic_write_bytes(os.path.join(root, "dataset_description.json"),
                      (json.dumps(description, indent=1) + "\n").encode())
  deriv = dict(Name="u2ad_jax phantom labels", BIDSVersion="1.8.0", DatasetType="derivative",
               GeneratedBy=[dict(Name="u2ad_jax.phantom")])
  _atomic_write_bytes(os.path.join(root, "derivatives", "labels", "dataset_description.json"),
                      (json.dumps(deriv, indent=1) + "\n").encode())
  return tsv


PARTICIPANTS_SIDECAR = {
    "profile": {"Description": "scanner profile of the synthetic acquisition (public or clinical)"},
    "has_lesion": {"Description": "1 when the label map contains T2 hyperintensity (label 6)"},
    "grade": {"Description": "highest lesion grade: 0 none, 1 faint/fuzzy, 2 sharp/bright"},
    "lesion_levels": {"Description": "segments overlapped by lesion voxels, ';'-separated"},
    **{name: {"Description": "1 when a lesion voxel lies in the segment's rows: from the centroid "
                             "row of its upper vertebral body to that of its lower body, on the "
                             "reference slice (largest cord area among slices showing C2 ... T1)"}
       for name in L.SEGMENT_NAMES},
    "num_lesions": {"Description": "number of lesions with at least one labelled voxel"},
    "compressed_levels": {"Description": "segments with degenerative cord compression"},
    "num_slices": {"Description": "number of sagittal slices"},
    "slice_thickness_mm": {"Description": "slice thickness", "Units": "mm"},
    "pixel_mm": {"Description": "in-plane pixel size", "Units": "mm"},
}
