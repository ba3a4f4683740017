"""Synthetic sagittal T2-weighted cervical-spine cohort: the project's embedded test bed.

NumPy / SciPy only and deterministic per seed. One subject is drawn in three stages:
- anatomy (`anatomy`): C1-T2 centreline with lordosis, vertebral bodies, discs with
  per-level degeneration and stenosis that compresses the cord, canal, posterior elements, soft
  tissue, a brainstem cap, and lesions at compressed levels;
- object (`render`, with `cord_frame` and `tissue`): tissue signal
  S = PD (1 - exp(-TR/T1)) exp(-TE/T2) with texture,
  per sagittal slice with through-plane partial volume, plus label / vertebra / lesion maps;
- acquisition (`acquire`): ghosts, k-space truncation (Gibbs), coil bias, intensity
  non-linearity and Rician noise, for the "public" or "clinical" scanner profile.

Lesions enter the object as raised T2 before acquisition; each lesion's contrast is then solved
so that its measured lesion / local-cord ratio in the noise-free image (`contrast`) hits
the drawn target (grade 1: 1.2-1.5, faint and fuzzy; grade 2: 1.5-2.2, sharp, below the local
CSF). Where the CSF around a grade-2 lesion is too effaced to leave room for that contrast (a
few percent of lesions: long ones across several compressed levels), the lesion is recorded and
contrasted as grade 1.

Volumes are stored in RAS+ (axis0 = x right, axis1 = y anterior, axis2 = z superior) with the
voxel sizes in the affine, so `nib.as_closest_canonical` is the identity. The model's slice frame
(rows superior -> inferior, columns anterior -> posterior) of slice i is `volume[i][::-1, ::-1].T`.

Truth per segment follows the evaluation rule (data/levels.py): on the slice with the
largest cord area among those showing C2 ... T1, segment C{k}-{k+1} spans the rows from the
centroid of vertebral body k to that of body k+1 (half-open); a segment is positive when a lesion
voxel of any slice lies in its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from u2ad_jax import labels as L
from u2ad_jax.phantom import acquire as acq
from u2ad_jax.phantom import anatomy as pa
from u2ad_jax.phantom import contrast
from u2ad_jax.phantom import cord_frame
from u2ad_jax.phantom import render as pr
from u2ad_jax.phantom import tissue

PROFILES = acq.PROFILES
# Intensity units of the stored images: the CSF tissue signal at the cord's depth maps to this.
CSF_UNITS = 1000.0


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
  frame = cord_frame.make_frame(anatomy, rows, cols, pixel)
  signals = tissue.tissue_signals(rng, tr, te, fat_t2, fat_pd, marrow_fat, muscle_fat)
  renderer = pr.Renderer(anatomy, frame, signals, rng)
  tex_low, tex_fine = tissue.texture_fields(rng, (rows, cols), pixel, n_slices, spacing)

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
  kappa, lesion_info = contrast.solve_lesion_contrast(base, deltas, lab, les_ids, anatomy, signals, gamma,
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
    stats = contrast.lesion_contrast(clean, lab, les_ids, j + 1, pixel)
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



# ----------------------------------------------------------------------------- segments


def reference_centroids(labels: np.ndarray, vertebrae: np.ndarray) -> np.ndarray | None:
  """`[7]` centroid rows of C2 ... T1 on the reference slice of `[X, H, W]` model maps.

  The reference slice is the one with the largest cord area (labels 3 and 6) among the slices
  showing all seven bodies C2 ... T1 (data/levels.py). None when no slice shows them.
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

