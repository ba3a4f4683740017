"""`u2ad prepare --from totalspineseg|sct --images DIR --segs DIR --out COHORT [--participants TSV]
[--lesions DIR]`.

Turns real sagittal T2w scans (NIfTI, e.g. dcm2niix output) plus the segmentations TotalSpineSeg
or Spinal Cord Toolbox wrote for them into the cohort layout `u2ad train` / `u2ad evaluate` read
(`data/cohort.py`): the scan, our label map (cord, CSF, vertebral bodies, discs) and the vertebra
instance map that names the levels by identity. The conventions are in `data/spine_tools.py`.

Scans pair with segmentations by file name (TotalSpineSeg names its outputs after its inputs:
`images/sub-001_T2w.nii.gz` <-> `segs/sub-001_T2w.nii.gz`; SCT: `segs/<scan>_seg_labeled.nii.gz`
and optionally `segs/<scan>_canal_seg.nii.gz`). The subject id is the BIDS `sub-` entity of the
file name, else `sub-` + the file stem. Every scan is checked before anything is kept: any bad
scan stops the command with one line naming the file, and nothing is written (the cohort is built
in a staging directory beside --out and renamed onto it only when complete). An existing
non-empty --out is refused unless it is an earlier `u2ad prepare` output and --overwrite is given.
The usual mix-ups (a binary cord mask or point labels given as SCT's level-labelled cord, a cord
mask without levels) stop with one line saying which SCT step to run. `--lesions DIR` adds one
lesion mask per scan (truth for pixel metrics). Levels cut by the field of view and a tilted cord
are warned about (stderr, and per scan in derivatives/labels/sources.tsv).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import flags

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import output_guard
from u2ad_jax.data import cohort
from u2ad_jax.data import levels as levels_lib
from u2ad_jax.data import nifti
from u2ad_jax.data import spine_tools

_FROM = flags.DEFINE_enum("from", None, list(spine_tools.TOOLS),
                          "the tool that wrote --segs: totalspineseg (also `sct_deepseg "
                          "totalspineseg`) or sct (sct_label_vertebrae's level-labelled cord)")
_IMAGES = flags.DEFINE_string("images", None, "folder of sagittal T2w scans (.nii.gz / .nii)")
_SEGS = flags.DEFINE_string("segs", None, "folder of the tool's segmentations (TotalSpineSeg: "
                                          "its output folder or step2_output/)")
_OUT = flags.DEFINE_string("out", None, "new cohort directory (missing, empty, or an earlier "
                                        "prepare output with --overwrite)")
_PARTICIPANTS = flags.DEFINE_string("participants", None,
                                    "optional participants.tsv (participant_id + truth columns)")
_LESIONS = flags.DEFINE_string(
    "lesions", None, "optional folder of lesion masks on the scans' grids, one per scan "
    "(<scan>_lesion_seg / _lesionseg / _lesion .nii.gz; all zero = no lesion): lesion voxels "
    "in the cord become label 6, so evaluation has pixel metrics and normal-cord SSIM leaves "
    "the lesion out")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                                "replace --out when it holds an earlier `u2ad prepare` output")
_QUIET = flags.DEFINE_bool("quiet", False, "no progress messages")

flags.mark_flags_as_required(["from", "images", "segs", "out"])


def list_scans(images_dir: str) -> list[str]:
  """The NIfTI files of `images_dir`, sorted (hidden files skipped)."""
  if not os.path.isdir(images_dir):
    raise errors.InputError(images_dir, "--images folder not found")
  scans = [os.path.join(images_dir, n) for n in sorted(os.listdir(images_dir))
           if not n.startswith(".") and n.endswith(spine_tools.NIFTI_EXTENSIONS)]
  if not scans:
    raise errors.InputError(images_dir, "no NIfTI scans (.nii.gz / .nii) in --images")
  return scans


def prepare_cohort(tool: str, images_dir: str, segs_dir: str, out_dir: str,
                   participants: str | None = None, log=None,
                   overwrite: bool = False,
                   lesions_dir: str | None = None) -> list[dict[str, str]]:
  """Converts every scan into a new cohort at `out_dir`; returns one record per subject.

  `lesions_dir`: a folder with one lesion mask per scan (`spine_tools.lesion_path`): lesion
  voxels in the cord become label 6 (truth for pixel metrics; left out of the normal-cord SSIM),
  and, without `participants`, participants.tsv gets `has_lesion` from the masks.

  Warnings (stderr, one line each, also in `derivatives/labels/sources.tsv`): levels out of
  view, levels cut by the field of view, a cord tilted beyond `levels_lib.MAX_TILT_DEGREES`
  against the scan's S-I axis, lesion-mask voxels outside the cord.

  Raises:
    UsageError / InputError (an --out that may not be written: `output_guard`), InputError and
    subclasses naming the first bad file; in every case `out_dir` is left as it was.
  """
  out_dir = output_guard.check_output_dir(
      out_dir, "prepare", overwrite=overwrite,
      protected={"--images": images_dir, "--segs": segs_dir, "--participants": participants,
                 "--lesions": lesions_dir})
  if not os.path.isdir(segs_dir):
    raise errors.InputError(segs_dir, "--segs folder not found")
  if lesions_dir is not None and not os.path.isdir(lesions_dir):
    raise errors.InputError(lesions_dir, "--lesions folder not found")
  scans = list_scans(images_dir)
  ids: dict[str, str] = {}
  for scan in scans:
    sid = spine_tools.subject_id_for(scan)
    if sid in ids:
      raise errors.InputError(scan, f"subject id {sid} also comes from {ids[sid]}")
    ids[sid] = scan

  with output_guard.staged_directory(out_dir, "prepare") as staging:
    records = []
    for i, (sid, scan) in enumerate(ids.items()):
      files = spine_tools.segmentation_paths(tool, scan, segs_dir)
      if lesions_dir is not None:
        files["lesion"] = spine_tools.lesion_path(scan, lesions_dir)
      image = nifti.read_volume(scan, "image")
      converted = spine_tools.convert_scan(tool, image, files)
      _write_subject(staging, sid, scan, image, converted)
      warnings = subject_warnings(converted)
      for warning in warnings:
        print(f"[prepare] warning: {sid} ({scan}): {warning}", file=sys.stderr, flush=True)
      record = {"participant_id": sid, "source_image": os.path.basename(scan),
                "source_segmentation": os.path.basename(files["seg"]),
                "levels_in_view": ";".join(converted.levels_present),
                "levels_cut_by_field_of_view": ";".join(converted.levels_partial) or "n/a",
                "cord_tilt_degrees": f"{converted.tilt_degrees:.1f}"}
      if lesions_dir is not None:
        record.update(source_lesion_mask=os.path.basename(files["lesion"]),
                      lesion_voxels=str(converted.lesion_voxels),
                      has_lesion=str(int(converted.lesion_voxels > 0)))
      records.append(record)
      if log:
        log(f"{i + 1}/{len(ids)} {sid}: levels {converted.levels_present[0]}.."
            f"{converted.levels_present[-1]} by identity")
    _write_tables(staging, tool, records, participants)
  return records


def subject_warnings(converted: spine_tools.Converted) -> list[str]:
  """One line per thing about a converted scan that evaluation cannot fully trust."""
  warnings = []
  if converted.levels_missing:
    warnings.append(f"levels {', '.join(converted.levels_missing)} not in view; segments "
                    f"{', '.join(converted.segments_missing)} will be n/a in evaluation")
  if converted.levels_partial:
    warnings.append(f"levels {', '.join(converted.levels_partial)} are cut by the field of view "
                    f"(within {levels_lib.PARTIAL_LEVEL_MARGIN_MM:g} mm of its superior / "
                    f"inferior end): their centroids, and the segment bounds set by them, are off "
                    f"their true centres")
  if converted.tilt_degrees > levels_lib.MAX_TILT_DEGREES:
    warnings.append(f"the cord runs at {converted.tilt_degrees:.0f} degrees to the scan's S-I "
                    f"axis (more than {levels_lib.MAX_TILT_DEGREES:g}): segments are scored as "
                    f"row bands between level centroids and may be misnamed; reslice the scan "
                    f"along the cord (e.g. sct_resample / a true sagittal reformat)")
  if converted.lesion_outside_cord:
    warnings.append(f"{converted.lesion_outside_cord} lesion-mask voxels lie outside the cord "
                    f"segmentation and were left out (a T2 hyperintensity is scored in the cord)")
  return warnings


def _write_subject(root: str, sid: str, scan: str, image: nifti.Volume,
                   converted: spine_tools.Converted) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  ext = ".nii.gz" if scan.endswith(".nii.gz") else ".nii"
  image_path = os.path.join(root, sid, "anat", f"{sid}_T2w{ext}")
  os.makedirs(os.path.dirname(image_path), exist_ok=True)
  # The scan itself, byte for byte (its header, affine and intensities are the truth).
  with io_utils.atomic_path(image_path) as tmp:
    shutil.copyfile(scan, tmp)
  stem = os.path.join(root, "derivatives", "labels", sid, "anat", f"{sid}_T2w")
  orientation = image.orientation
  nifti.write_like(stem + "_label.nii.gz", orientation.to_original(converted.labels), orientation,
                   dtype=np.uint8)
  nifti.write_like(stem + "_vertebrae.nii.gz", orientation.to_original(converted.vertebrae),
                   orientation, dtype=np.uint8)


def _write_tables(root: str, tool: str, records: list[dict[str, str]],
                  participants: str | None) -> None:
  columns = list(records[0])
  if participants is not None:
    if not os.path.isfile(participants):
      raise errors.InputError(participants, "--participants file not found")
    # Validated by the same reader training and evaluation use.
    shutil.copyfile(participants, os.path.join(root, "participants.tsv"))
    table = cohort.read_participants(root)
    unknown = sorted(set(table) - {r["participant_id"] for r in records})
    if unknown:
      raise errors.CorruptFileError(participants, f"participant ids {unknown[:5]} are not among "
                                                  f"the converted scans")
  else:
    io_utils.write_csv(os.path.join(root, "participants.tsv"),
                       [[r[c] for c in columns] for r in records], columns, delimiter="\t")
  io_utils.write_json(os.path.join(root, "dataset_description.json"), {
      "Name": "u2ad_jax cohort prepared from real scans", "BIDSVersion": "1.8.0",
      "DatasetType": "raw", "GeneratedBy": [{"Name": "u2ad prepare", "Description": f"labels "
                                             f"converted from {tool} (u2ad_jax.data.spine_tools)"}]})
  io_utils.write_csv(os.path.join(root, "derivatives", "labels", "sources.tsv"),
                     [[r[c] for c in columns] for r in records], columns, delimiter="\t")
  io_utils.write_text(os.path.join(root, "derivatives", "labels", "dataset_description.json"),
                      json.dumps({"Name": f"u2ad_jax labels from {tool}", "BIDSVersion": "1.8.0",
                                  "DatasetType": "derivative",
                                  # `cohort.cohort_kind` reads the name and the tool.
                                  "GeneratedBy": [{"Name": "u2ad prepare",
                                                   "Description": f"labels converted from "
                                                                  f"{tool}"}]},
                                 indent=2) + "\n")


def main(argv):
  del argv  # stray arguments are refused by the dispatcher
  log = None if _QUIET.value else (
      lambda msg: print(f"[prepare] {msg}", file=sys.stderr, flush=True))
  records = prepare_cohort(_FROM.value, _IMAGES.value, _SEGS.value, _OUT.value,
                           _PARTICIPANTS.value, log=log, overwrite=_OVERWRITE.value,
                           lesions_dir=_LESIONS.value)
  print(f"prepared {len(records)} subject(s) from {_FROM.value} into {_OUT.value}")

