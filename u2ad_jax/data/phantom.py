"""Synthetic sagittal T2-weighted cervical-spine cohort: the project's embedded test bed.

NumPy / SciPy only and deterministic per seed. One subject is drawn in three stages:
- anatomy (`phantom_anatomy`): C1-T2 centreline with lordosis, vertebral bodies, discs with
  per-level degeneration and stenosis that compresses the cord, canal, posterior elements, soft
  tissue, a brainstem cap, and lesions at compressed levels;
- object (`phantom_render`): tissue signal S = PD (1 - exp(-TR/T1)) exp(-TE/T2) with texture,
  per sagittal slice with through-plane partial volume, plus label / vertebra / lesion maps;
- acquisition (`phantom_acquire`): ghosts, k-space truncation (Gibbs), coil bias, intensity
  non-linearity and Rician noise, for the "public" or "clinical" scanner profile.

Lesions enter the object as raised T2 before acquisition; each lesion's contrast is then solved
so that its measured lesion / local-cord ratio in the noise-free image (`lesion_contrast`) hits
the drawn target (grade 1: 1.2-1.5, faint and fuzzy; grade 2: 1.5-2.2, sharp, below the local
CSF). Where the CSF around a grade-2 lesion is too effaced to leave room for that contrast (a
few percent of lesions: long ones across several compressed levels), the lesion is recorded and
contrasted as grade 1.

Volumes are stored in RAS+ (axis0 = x right, axis1 = y anterior, axis2 = z superior) with the
voxel sizes in the affine, so `nib.as_closest_canonical` is the identity. The model's slice frame
(rows superior -> inferior, columns anterior -> posterior) of slice i is `volume[i][::-1, ::-1].T`.

Truth per segment follows the evaluation rule (evaluation/levels.py): on the slice with the
largest cord area among those showing C2 ... T1, segment C{k}-{k+1} spans the rows from the
centroid of vertebral body k to that of body k+1 (half-open); a segment is positive when a lesion
voxel of any slice lies in its rows.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np

from u2ad_jax import labels as L
from u2ad_jax.data import phantom_acquire as acq
from u2ad_jax.data import phantom_anatomy as pa
from u2ad_jax.data import phantom_render as pr

PROFILES = acq.PROFILES
# Intensity units of the stored images: the CSF tissue signal at the cord's depth maps to this.
CSF_UNITS = 1000.0
# Lesion contrast windows (phantom.md): lesion / local-cord ratio per grade.
GRADE_RATIO = {1: (1.2, 1.5), 2: (1.5, 2.2)}
# The local cord of a lesion: cord voxels of the lesion's slices within this margin (mm) of its
# superior-inferior extent; the local CSF reference uses a wider margin.
LOCAL_CORD_MARGIN_MM = 10.0
LOCAL_CSF_MARGIN_MM = 20.0
LOCAL_CSF_PERCENTILE = 95.0
# Grade-2 lesions stay below this fraction of the local CSF reference.
CSF_HEADROOM = 0.95


@dataclasses.dataclass
class Subject:
  """One synthetic subject.

  Attributes:
    subject_id: e.g. "sub-001".
    profile: "public" or "clinical".
    image: `[X, Y, Z]` float32 magnitude image (RAS+, arbitrary units: CSF ~ 1000).
    clean: `[X, Y, Z]` float32 the same image before noise (all other acquisition effects in).
    labels: `[X, Y, Z]` uint8 label map (u2ad_jax.labels values).
    vertebrae: `[X, Y, Z]` uint8 vertebral-body instance ids (labels.VERTEBRA_INSTANCE_IDS).
    lesion_ids: `[X, Y, Z]` uint8, 1 + index into `lesions` for lesion voxels, else 0.
    affine: `[4, 4]` voxel -> RAS mm.
    noise_sigma: the Gaussian sigma of each complex channel (image units).
    truth: has_lesion (0/1), grade (0/1/2), segments {"C2-3": 0/1, ...} (the same flags also as
      top-level keys "C2-3" ...), lesion_levels (list of segment names), compressed_levels,
      num_lesions.
    lesions: per lesion: grade, level, ratio (measured in `clean`), csf_ratio (local CSF /
      local cord), voxels, segments, length_mm, pencil.
    meta: acquisition and anatomy parameters (for the record).
  """
  subject_id: str
  profile: str
  image: np.ndarray
  clean: np.ndarray
  labels: np.ndarray
  vertebrae: np.ndarray
  lesion_ids: np.ndarray
  affine: np.ndarray
  noise_sigma: float
  truth: dict[str, Any]
  lesions: list[dict[str, Any]]
  meta: dict[str, Any]

  @property
  def num_slices(self) -> int:
    return int(self.image.shape[0])


def model_to_volume(slices: np.ndarray) -> np.ndarray:
  """`[X, H, W]` model-frame slices (rows S->I, cols A->P) -> `[X, Y, Z]` RAS+ volume."""
  return np.ascontiguousarray(np.transpose(slices[:, ::-1, ::-1], (0, 2, 1)))


def volume_to_model(volume: np.ndarray) -> np.ndarray:
  """`[X, Y, Z]` RAS+ volume -> `[X, H, W]` model-frame slices (inverse of model_to_volume)."""
  return np.ascontiguousarray(np.transpose(volume, (0, 2, 1))[:, ::-1, ::-1])


def generate_subject(subject_id: str, profile: str, seed: int, lesion: bool | None = None, *,
                     grade: int | None = None, num_slices: int | None = None) -> Subject:
  """Draws one subject.

  Args:
    subject_id: the participant id written with it.
    profile: "public" or "clinical" (`PROFILES`).
    seed: the subject's own seed; the same seed gives identical arrays.
    lesion: whether the subject has lesions; None draws it with the profile's lesion fraction.
    grade: force the lesion grade (1 or 2); None draws it (grades in similar numbers).
    num_slices: override the profile's number of sagittal slices (centred on the midline).

  Returns:
    The Subject.
  """
  if profile not in PROFILES:
    raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
  if grade is not None and grade not in (1, 2):
    raise ValueError(f"grade must be 1 or 2, got {grade}")
  prof = PROFILES[profile]
  rng = np.random.default_rng(seed)
  drawn = bool(rng.random() < prof.lesion_fraction)  # drawn always: `lesion` changes nothing else
  lesion = drawn if lesion is None else bool(lesion)

  # ---- acquisition geometry.
  pixel = acq.draw(rng, prof.pixel_mm)
  rows = int(round(acq.draw(rng, prof.fov_si) / pixel))
  cols = int(round(acq.draw(rng, prof.fov_ap) / pixel))
  thickness = acq.draw(rng, prof.thickness)
  spacing = thickness * (1.0 + prof.gap)
  n_slices = int(num_slices) if num_slices is not None else prof.num_slices
  if n_slices < 1:
    raise ValueError(f"num_slices must be >= 1, got {n_slices}")
  positions = (np.arange(n_slices) - (n_slices - 1) / 2.0) * spacing
  k = prof.sub_slices
  sub_offsets = ((np.arange(k) + 0.5) / k - 0.5) * thickness if k > 1 else np.zeros(1)
  tr, te = acq.draw(rng, prof.tr), acq.draw(rng, prof.te)
  fat_t2, fat_pd = acq.draw(rng, prof.fat_t2), acq.draw(rng, prof.fat_pd)
  marrow_fat, muscle_fat = acq.draw(rng, prof.marrow_fat), acq.draw(rng, prof.muscle_fat)

  # ---- anatomy and object.
  anatomy = pa.sample_anatomy(rng, fov_si=rows * pixel, fov_ap=cols * pixel, lesion=lesion,
                              healthy_profile=prof.healthy, grade=grade, slice_positions=positions)
  # Central grey matter, slightly brighter; prominent in some subjects (a faint normal mimic).
  anatomy.misc["gm_boost"] = float(rng.uniform(1.03, 1.15))
  anatomy.misc["csf_patchiness"] = acq.draw(rng, prof.csf_patchiness)
  frame = pr.make_frame(anatomy, rows, cols, pixel)
  signals = pr.tissue_signals(rng, tr, te, fat_t2, fat_pd, marrow_fat, muscle_fat)
  renderer = pr.Renderer(anatomy, frame, signals, rng)
  tex_low, tex_fine = pr.texture_fields(rng, (rows, cols), pixel, n_slices, spacing)

  # ---- acquisition parameters.
  window = acq.kspace_window((rows, cols), acq.draw(rng, prof.kspace_pe), acq.draw(rng, prof.kspace_ro),
                             acq.draw(rng, prof.apodization))
  strength, length = acq.draw(rng, prof.bias_strength), acq.draw(rng, prof.bias_length)
  cord_depth = float(np.median(anatomy.profiles["skin_post"]))
  bias = acq.coil_sensitivity(frame.s, frame.t, renderer.G["skin_post"], frame.z, strength, length,
                              rng.uniform(-0.08, 0.08, 2), cord_depth)
  lateral_falloff = rng.uniform(0.0006, 0.0015)  # per mm^2 off the coil's centre
  ghosting = rng.random() < prof.ghost_probability
  ghost_params = (float(rng.uniform(0.03, 0.08)), int(rng.integers(cols // 12, cols // 3)),
                  int(rng.integers(1, 3)))
  motion_ghost = float(rng.uniform(0.005, 0.015)) if ghosting and rng.random() < 0.4 else 0.0
  gamma = acq.draw(rng, prof.gamma)
  snr = acq.draw(rng, prof.snr)

  # ---- render and acquire every slice (linear part); lesion deltas acquired separately.
  n_les = len(anatomy.lesions)
  base = np.zeros((n_slices, rows, cols), np.float32)
  deltas = [[None] * n_slices for _ in range(n_les)]
  lab = np.zeros((n_slices, rows, cols), np.uint8)
  vert = np.zeros_like(lab)
  les_ids = np.zeros_like(lab)
  for i, x in enumerate(positions):
    obj = renderer.render_slice(float(x), sub_offsets, tex_low[i], tex_fine[i])
    gain = bias * np.float32(max(1.0 - lateral_falloff * float(x) ** 2, 0.5))
    signal = obj.signal
    if ghosting:
      signal = signal + acq.csf_ghosts(obj.csf, ghost_params)
      if motion_ghost:
        signal = signal + motion_ghost * np.roll(obj.signal, cols // 2, axis=1)
    base[i] = acq.truncate(signal, window) * gain
    for j, d in enumerate(obj.lesion_delta):
      if d is not None:
        deltas[j][i] = acq.truncate(d, window) * gain
    lab[i], vert[i], les_ids[i] = obj.labels, obj.vertebrae, obj.lesion_ids

  # ---- lesion contrast: solve each lesion's kappa so its measured ratio hits the target.
  reference = signals["csf"]
  kappa, lesion_info = _solve_lesion_contrast(base, deltas, lab, les_ids, anatomy, signals, gamma,
                                              reference, pixel)
  linear = base.copy()
  for j in range(n_les):
    for i in range(n_slices):
      if deltas[j][i] is not None and kappa[j] > 0:
        linear[i] += np.float32(kappa[j]) * deltas[j][i]
  scale = np.float32(CSF_UNITS / reference)
  clean = np.abs(acq.nonlinearity(linear, gamma, reference)) * scale
  sigma = CSF_UNITS / snr
  image = acq.rician(clean, np.float32(sigma), rng)

  # ---- truth from the maps (the evaluation's rule), per lesion and per segment.
  lesions_out = []
  for j, les in enumerate(anatomy.lesions):
    stats = lesion_contrast(clean, lab, les_ids, j + 1, pixel)
    if stats is None:
      continue
    lesions_out.append(dict(index=j + 1, grade=les.grade, level=les.level, ratio=stats["ratio"],
                            target_ratio=lesion_info[j]["target"], csf_ratio=stats["csf_ratio"],
                            voxels=stats["voxels"], length_mm=2.0 * les.half_length, pencil=les.pencil))
  centroids = reference_centroids(lab, vert)
  segments = {name: 0 for name in L.SEGMENT_NAMES}
  for entry in lesions_out:
    rows_j = np.flatnonzero((les_ids == entry["index"]).any(axis=(0, 2)))
    entry["segments"] = sorted({L.SEGMENT_NAMES[g] for g in segment_of_rows(rows_j, centroids) if g >= 0},
                               key=L.SEGMENT_NAMES.index)
    for name in entry["segments"]:
      segments[name] = 1
  has_lesion = int(bool((lab == L.LESION).any()))
  grade_out = max((e["grade"] for e in lesions_out), default=0) if has_lesion else 0
  truth = dict(has_lesion=has_lesion, grade=int(grade_out), segments=segments,
               lesion_levels=[n for n in L.SEGMENT_NAMES if segments[n]],
               compressed_levels=sorted(anatomy.compression, key=pa.DISC_NAMES.index),
               num_lesions=len(lesions_out))
  truth.update(segments)  # the per-segment flags also at the top level, as in participants.tsv
  affine = np.diag([spacing, pixel, pixel, 1.0])
  affine[:3, 3] = [-(n_slices - 1) / 2.0 * spacing, -(cols - 1) / 2.0 * pixel, -(rows - 1) / 2.0 * pixel]
  meta = dict(pixel_mm=pixel, slice_thickness_mm=thickness, slice_spacing_mm=spacing, tr_ms=tr, te_ms=te,
              snr=snr, gamma=gamma, ghosting=bool(ghosting), curvature=anatomy.curvature,
              scale=anatomy.scale, compression={k2: round(v, 3) for k2, v in anatomy.compression.items()},
              slice_positions_mm=[float(p) for p in positions], tissue_signals=signals,
              # Model-frame rows (superior -> inferior) of the C2 ... T1 centroids.
              centroid_rows=[float(c) for c in centroids] if centroids is not None else None)
  return Subject(subject_id=subject_id, profile=profile, image=model_to_volume(image),
                 clean=model_to_volume(clean.astype(np.float32)), labels=model_to_volume(lab),
                 vertebrae=model_to_volume(vert), lesion_ids=model_to_volume(les_ids), affine=affine,
                 noise_sigma=float(sigma), truth=truth, lesions=lesions_out, meta=meta)


# ----------------------------------------------------------------------------- lesion contrast


def _lesion_regions(labels: np.ndarray, lesion_ids: np.ndarray, index: int, pixel: float):
  """Boolean masks (lesion, local cord, local CSF) of one lesion in `[X, H, W]` model slices."""
  lesion = lesion_ids == index
  if not lesion.any():
    return None
  slices = lesion.any(axis=(1, 2))
  rows = np.flatnonzero(lesion.any(axis=(0, 2)))
  r = np.arange(labels.shape[1])
  near = (r >= rows[0] - LOCAL_CORD_MARGIN_MM / pixel) & (r <= rows[-1] + LOCAL_CORD_MARGIN_MM / pixel)
  wide = (r >= rows[0] - LOCAL_CSF_MARGIN_MM / pixel) & (r <= rows[-1] + LOCAL_CSF_MARGIN_MM / pixel)
  cord = (labels == L.CORD) & slices[:, None, None] & near[None, :, None]
  csf = (labels == L.CSF) & slices[:, None, None] & wide[None, :, None]
  if not csf.any():
    csf = labels == L.CSF
  return lesion, cord, csf


def lesion_contrast(clean: np.ndarray, labels: np.ndarray, lesion_ids: np.ndarray, index: int,
                    pixel: float) -> dict[str, float] | None:
  """Measured contrast of one lesion in a noise-free `[X, H, W]` model-frame volume.

  ratio = mean(clean over the lesion's voxels) / mean(clean over the local cord), where the local
  cord is the cord-labelled (3) voxels of the slices containing the lesion whose rows lie within
  LOCAL_CORD_MARGIN_MM of the lesion's rows. csf_ratio = LOCAL_CSF_PERCENTILE-th percentile of
  the CSF-labelled voxels of those slices within LOCAL_CSF_MARGIN_MM, over the same local cord
  mean. Returns None when the lesion has no voxel.
  """
  regions = _lesion_regions(labels, lesion_ids, index, pixel)
  if regions is None:
    return None
  lesion, cord, csf = regions
  cord_mean = float(clean[cord].mean()) if cord.any() else float("nan")
  return dict(ratio=float(clean[lesion].mean()) / cord_mean,
              csf_ratio=float(np.percentile(clean[csf], LOCAL_CSF_PERCENTILE)) / cord_mean
              if csf.any() else float("nan"),
              voxels=int(lesion.sum()))


def _solve_lesion_contrast(base, deltas, labels, lesion_ids, anatomy, signals, gamma, reference, pixel):
  """kappa per lesion such that the lesion's ratio in the noise-free image equals its target.

  The acquired image is linear in the lesion contrast up to the (monotonic) non-linearity, so
  each ratio is a cheap function of the kappas evaluated on the few voxels involved; a few
  secant steps per lesion, swept twice so that neighbouring lesions settle together.
  """
  n = len(anatomy.lesions)
  kappa = np.zeros(n)
  info = [dict(target=float(les.target_ratio)) for les in anatomy.lesions]
  if n == 0:
    return kappa, info
  # Tissue-level cap: about as bright as CSF (oedema / cystic change); the image-level target
  # keeps grade 2 below the local CSF.
  kappa_max = 1.1 * signals["csf"] / signals["cord"] - 1.0
  regions = [_lesion_regions(labels, lesion_ids, j + 1, pixel) for j in range(n)]
  zero = np.zeros_like(base[0])

  def values(mask):
    b = base[mask]
    d = []
    for j in range(n):
      per_slice = [deltas[j][i] if deltas[j][i] is not None else zero for i in range(base.shape[0])]
      d.append(np.stack(per_slice)[mask])
    return b, d

  cache = []
  for j in range(n):
    if regions[j] is None:
      cache.append(None)
      continue
    lesion, cord, csf = regions[j]
    cache.append((values(lesion), values(cord), values(csf)))

  def measure(j, kap):
    (bl, dl), (bc, dc), (bs, ds) = cache[j]
    def img(b, d):
      lin = b.copy()
      for m in range(n):
        if kap[m] > 0:
          lin += np.float32(kap[m]) * d[m]
      return np.abs(acq.nonlinearity(lin, gamma, reference))
    lesion_v, cord_v, csf_v = img(bl, dl), img(bc, dc), img(bs, ds)
    cord_mean = float(cord_v.mean()) if cord_v.size else 1.0
    return float(lesion_v.mean()) / cord_mean, float(np.percentile(csf_v, LOCAL_CSF_PERCENTILE)) / cord_mean

  for sweep in range(2):
    for j, les in enumerate(anatomy.lesions):
      if cache[j] is None:
        continue
      target = les.target_ratio
      if les.grade == 2:
        # Always below the local CSF: cap the target under the measured local CSF level. Where
        # the CSF around the lesion is too effaced to leave room for a grade-2 contrast (long
        # lesions over several compressed levels), the lesion is made a faint grade-1 one.
        _, csf_ratio = measure(j, kappa)
        cap = CSF_HEADROOM * csf_ratio
        if cap < GRADE_RATIO[2][0] + 0.03:
          les.grade = 1
          target = min(1.25 + 0.2 * (target - 1.6) / 0.5, cap)
          les.target_ratio = target
        else:
          target = float(np.clip(min(target, cap), GRADE_RATIO[2][0] + 0.03, GRADE_RATIO[2][1]))
      info[j]["target"] = target
      k = kappa[j] if kappa[j] > 0 else target - 1.0
      for _ in range(8):
        trial = kappa.copy()
        trial[j] = k
        ratio, _ = measure(j, trial)
        if abs(ratio - target) < 2e-3:
          break
        k = float(np.clip(k * (target - 1.0) / max(ratio - 1.0, 1e-3), 0.0, kappa_max))
      kappa[j] = k
  return kappa, info


# ----------------------------------------------------------------------------- segments


def reference_centroids(labels: np.ndarray, vertebrae: np.ndarray) -> np.ndarray | None:
  """`[7]` centroid rows of C2 ... T1 on the reference slice of `[X, H, W]` model maps.

  The reference slice is the one with the largest cord area (labels 3 and 6) among the slices
  showing all seven bodies C2 ... T1 (evaluation/levels.py). None when no slice shows them.
  """
  ids = [L.VERTEBRA_INSTANCE_IDS[name] for name in L.VERTEBRA_NAMES]
  best, best_area = None, -1
  for i in range(labels.shape[0]):
    present = all((vertebrae[i] == v).any() for v in ids)
    if not present:
      continue
    area = int(np.isin(labels[i], L.CORD_LABELS).sum())
    if area > best_area:
      best, best_area = i, area
  if best is None:
    return None
  rows = np.arange(labels.shape[1], dtype=np.float64)
  return np.array([float((rows[:, None] * (vertebrae[best] == v)).sum() / (vertebrae[best] == v).sum())
                   for v in ids])


def segment_of_rows(rows: np.ndarray, centroids: np.ndarray | None) -> np.ndarray:
  """Segment index (0 = C2-3 ... 5 = C7-T1) of each row, -1 above C2 / below T1 centroids."""
  rows = np.asarray(rows, dtype=np.float64)
  if centroids is None:
    return np.full(rows.shape, -1, np.int64)
  index = np.searchsorted(centroids, rows, side="right") - 1
  index[(index < 0) | (index >= len(L.SEGMENT_NAMES))] = -1
  return index


# ----------------------------------------------------------------------------- cohort on disk


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


def write_subject(out_dir: str | os.PathLike, subject: Subject) -> dict[str, str]:
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


def participant_row(subject: Subject) -> dict[str, str]:
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
  code = sorted(PROFILES).index(profile)
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
                 progress: Callable[[int, Subject, float], None] | None = None) -> str:
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
  if profile not in PROFILES:
    raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  fraction = PROFILES[profile].lesion_fraction if lesion_fraction is None else float(lesion_fraction)
  flags = lesion_assignment(num_subjects, fraction, seed)
  root = os.fspath(out_dir)
  os.makedirs(root, exist_ok=True)
  width = max(3, len(str(num_subjects)))
  rows = []
  for i in range(num_subjects):
    start = time.perf_counter()
    sid = f"sub-{i + 1:0{width}d}"
    subject = generate_subject(sid, profile, subject_seed(seed, i, profile), bool(flags[i]),
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
                      (json.dumps(_PARTICIPANTS_SIDECAR, indent=1) + "\n").encode())
  description = dict(
      Name=f"u2ad_jax synthetic cervical-spine cohort ({profile})", BIDSVersion="1.8.0", DatasetType="raw",
      License="MIT", GeneratedBy=[dict(Name="u2ad_jax.data.phantom", Description="seeded NumPy phantom")],
      Generator=dict(profile=profile, seed=int(seed), num_subjects=int(num_subjects),
                     lesion_fraction=fraction, num_slices=num_slices))
  _atomic_write_bytes(os.path.join(root, "dataset_description.json"),
                      (json.dumps(description, indent=1) + "\n").encode())
  deriv = dict(Name="u2ad_jax phantom labels", BIDSVersion="1.8.0", DatasetType="derivative",
               GeneratedBy=[dict(Name="u2ad_jax.data.phantom")])
  _atomic_write_bytes(os.path.join(root, "derivatives", "labels", "dataset_description.json"),
                      (json.dumps(deriv, indent=1) + "\n").encode())
  return tsv


_PARTICIPANTS_SIDECAR = {
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
