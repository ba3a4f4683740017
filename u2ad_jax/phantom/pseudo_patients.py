"""Real-anatomy benchmark: pseudo-patients built from labelled REAL sagittal T2 slices.

The phantom's normal cord is homogeneous signal plus noise, so a detector can look good there and
fail on real anatomy. This generator follows the field's standard practice for unsupervised
anomaly detection (synthetic anomalies in real scans, as in the MOOD challenge): it takes real
labelled slices (the original release's `.npy` format, or any cohort in our layout) and writes
pseudo-patients in the same cohort layout as the phantom, with per-patient and per-segment truth.

Per pseudo-patient, from one base slice (drawn from the usable bases, round robin with a seeded
start):
1. Geometry: a smooth elastic deformation (Gaussian-filtered random displacement, peak 1-3 mm)
   composed with a small similarity transform (scale +-5 %, rotation +-4 deg, shift +-3 mm). The
   image is warped with cubic interpolation, label and vertebra maps with nearest neighbour, so
   the labels stay exact for the warped anatomy. A draw whose label map no longer shows the seven
   bodies C2 ... T1 (a body pushed out of the field of view) is redrawn.
2. Thin volume: `num_slices` sagittal slices (default 5, 3.3 mm apart), each the subject's warped
   base slice with its OWN small extra deformation (peak 0.3-0.6 mm) and independent noise. The
   source is 2D, so there is no real through-plane anatomy: off-midline slices repeat the midline
   anatomy. Only the lesion has a through-plane extent (an ellipsoid, see 4).
3. Contrast: a per-subject gamma (0.9-1.1) on the source's [0, 1] intensities and a smooth
   multiplicative bias field (peak deviation 4-10 %).
4. Lesions (`lesion` subjects): one lesion, with probability 0.2 a second one at another segment,
   placed in the cord (label 3) of a drawn segment (C5-6 most often, then C4-5, C6-7, C3-4, as in
   the phantom), as an ellipsoid 3-15 mm along the local cord direction, 1.5-4 mm AP (at most 60 %
   of the local cord AP width) and 4-10 mm lateral (so it reaches 1-3 slices), kept inside its
   segment's rows. Grade 1 (faint): lesion / local-cord ratio 1.2-1.5 with a fuzzy border; grade
   2 (sharp): 1.5-2.2 and below the local CSF (as the phantom; a grade-2 lesion without room below
   the CSF becomes grade 1). The ratio is SOLVED on the pre-noise image (bias and contrast in), so
   the recorded ratio is what the image shows; the lesion then shares the added noise.
5. Noise at the SOURCE's own measured level: the source's noise sigma is estimated with a robust
   high-pass estimator (Immerkaer's 3x3 Laplacian-difference kernel, 1.4826 MAD of its response
   over the foreground; `real_slices.noise_sigma`). The warped image has less high-frequency
   noise than the source (interpolation smooths), so Rician noise is added until the same
   estimator reads the target, drawn as 1.0-1.2 x the source's level: never below it, because
   the warp carries the source's own noise along (the same pattern on every slice) and the added
   noise is what decorrelates the slices.

Truth per segment follows the evaluation rule (data/levels.py): segment C{k}-{k+1} spans the
rows from the centroid of vertebral body k to that of body k+1 of the subject's label map; a
segment is positive when a lesion voxel lies in its rows. A base that carries a REAL lesion (label
6) makes a lesion patient (its real lesion segments count as truth); such bases are not used for
`healthy` subjects.

Volumes are written like the phantom's (RAS+, `generator.model_to_volume`) with the model frame's
pixel: the release's slices are 256 px over the standard 200 mm field of view (0.78125 mm), which
is what `preprocess` produces, so preprocessing maps them back onto the same grid.
Realism is measured against the source, not tuned to any detector: `realism.json` beside the
cohort lists per tissue (cord, CSF, disc, vertebral body) mean and sd, and the noise level, of
the source bases and of the generated cohort after the standard normalisation.

Modules: `real_slices` finds the bases (which real slices qualify, their vertebra identities, the
noise estimator, the realism statistics), `pseudo_lesions` draws and contrasts the lesions, this
module deforms, adds noise, records truth and writes the cohort.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import labels as L
from u2ad_jax.data import levels
from u2ad_jax.phantom import cohort_writer
from u2ad_jax.phantom import contrast
from u2ad_jax.phantom import generator
from u2ad_jax.phantom import pseudo_lesions
from u2ad_jax.phantom import real_slices

DEFAULT_NUM_SLICES = 5
DEFAULT_SLICE_SPACING_MM = 3.3
# Relative frequency of the lesion's segment (C2-3 ... C7-T1): the phantom's order.
SEGMENT_WEIGHTS = np.array([0.05, 0.15, 0.25, 0.35, 0.15, 0.05])
SECOND_LESION_PROBABILITY = 0.2
# Target noise sigma as a multiple of the source's measured one (see step 5).
NOISE_FACTOR = (1.0, 1.2)


# ----------------------------------------------------------------------------- deformation


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float,
                  peak_px: float) -> np.ndarray:
  """`[2, H, W]` smooth displacement with the given peak magnitude (pixels)."""
  field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="reflect")
                    for _ in range(2)])
  magnitude = float(np.sqrt((field ** 2).sum(axis=0)).max())
  return field * (peak_px / max(magnitude, 1e-12))


def _similarity_coords(shape, scale, angle, shift) -> np.ndarray:
  """`[2, H, W]` source coordinates of a similarity transform about the image centre."""
  h, w = shape
  rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  y, x = rr - cy - shift[0], cc - cx - shift[1]
  cos, sin = np.cos(angle), np.sin(angle)
  return np.stack([(cos * y - sin * x) / scale + cy, (sin * y + cos * x) / scale + cx])


def _warp(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
  return ndimage.map_coordinates(array, coords, order=order, mode="nearest")


def _rician(clean: np.ndarray, z: np.ndarray, sigma: float) -> np.ndarray:
  return np.sqrt((clean + sigma * z[0]) ** 2 + (sigma * z[1]) ** 2)


def _solve_noise(clean: np.ndarray, z: np.ndarray, mask: np.ndarray, target: float) -> float:
  """Sigma of the added noise (fixed draw `z`) so that `noise_sigma` of the result is `target`.

  The estimator is monotonic in sigma but not exactly additive in quadrature (edges and the
  image's own noise enter the median), so it is solved by bisection on the actual estimate.
  """
  if real_slices.noise_sigma(clean, mask) >= target:
    return 0.0
  lo, hi = 0.0, 2.0 * target
  for _ in range(16):
    mid = 0.5 * (lo + hi)
    if real_slices.noise_sigma(_rician(clean, z, mid), mask) < target:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- subjects


def generate_subject(subject_id: str, base: real_slices.Base, seed: int, lesion: bool, *,
                     num_slices: int = DEFAULT_NUM_SLICES,
                     slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM) -> generator.Subject:
  """One pseudo-patient from `base` (see the module docstring for each step).

  Returns a `generator.Subject` (so the phantom's writer and participants table apply); `clean` is
  the image before the added noise, `noise_sigma` the added noise's sigma (image units).
  """
  rng = np.random.default_rng(seed)
  pixel = base.pixel_mm
  shape = base.image.shape

  # 1. geometry: similarity + elastic; redraw until the seven bodies survive.
  for _ in range(20):
    sim = _similarity_coords(shape, rng.uniform(0.95, 1.05), np.deg2rad(rng.uniform(-4, 4)),
                             rng.uniform(-3, 3, 2) / pixel)
    elastic = _smooth_field(rng, shape, sigma_px=rng.uniform(15, 30) / pixel,
                            peak_px=rng.uniform(1.0, 3.0) / pixel)
    coords = sim + elastic
    labels2d = _warp(base.labels, coords, 0).astype(np.uint8)
    if (len(levels.vertebral_bodies(labels2d)) >= levels.NUM_LEVELS
        and real_slices.usable_cord(labels2d)[0]):
      break
  else:
    raise errors.InputError(base.name, "no deformation kept the seven vertebral bodies in view")
  gamma = rng.uniform(0.9, 1.1)
  bias_peak = rng.uniform(0.04, 0.10)
  bias = _smooth_field(rng, shape, sigma_px=60.0 / pixel, peak_px=1.0)[0]
  bias = 1.0 + bias_peak * bias / max(np.abs(bias).max(), 1e-12)

  images, labs, verts = [], [], []
  for _ in range(num_slices):
    extra = _smooth_field(rng, shape, sigma_px=10.0 / pixel, peak_px=rng.uniform(0.3, 0.6) / pixel)
    c = coords + extra
    img = np.clip(_warp(base.image.astype(np.float64), c, 3), 0.0, None)
    images.append((img ** gamma) * bias)
    labs.append(_warp(base.labels, c, 0).astype(np.uint8))
    verts.append(_warp(base.vertebrae, c, 0).astype(np.uint8) if base.vertebrae is not None
                 else np.zeros(shape, np.uint8))
  clean, lab, vert = np.stack(images), np.stack(labs), np.stack(verts)
  # The evaluation's levels of the whole volume (its reference slice), as the truth uses them.
  centroids = levels.find_levels(lab).centroid_rows

  # 4. lesions.
  lesion_ids = np.zeros(lab.shape, np.uint8)
  lesions_out = []
  if lesion:
    grade = int(rng.integers(1, 3))
    first = int(rng.choice(6, p=SEGMENT_WEIGHTS))
    segments = [first]
    if rng.random() < SECOND_LESION_PROBABILITY:
      w = SEGMENT_WEIGHTS.copy()
      w[first] = 0.0
      segments.append(int(rng.choice(6, p=w / w.sum())))
    drawn_lesions = []
    for segment in segments:
      drawn = pseudo_lesions.draw_lesion_shape(rng, lab, segment, centroids, pixel, grade, slice_spacing_mm)
      if drawn is None:
        continue
      weights, mask, shape_info = drawn
      mask &= lesion_ids == 0
      target = rng.uniform(*contrast.GRADE_RATIO[grade])
      this_grade = grade
      if grade == 2:
        _, csf_ratio = pseudo_lesions.lesion_ratio(clean, lab, mask, pixel)
        cap = contrast.CSF_HEADROOM * csf_ratio
        if cap < contrast.GRADE_RATIO[2][0] + 0.03:
          this_grade, target = 1, float(min(rng.uniform(*contrast.GRADE_RATIO[1]), cap))
        else:
          target = float(min(target, cap))
      lesion_ids[mask] = len(drawn_lesions) + 1
      drawn_lesions.append((weights, mask, target, this_grade, segment, shape_info))
    lab[lesion_ids > 0] = L.LESION
    # Each lesion's contrast, solved with the final label map and the other lesions in (a
    # second lesion's fuzzy border may reach the first's local cord): a few sweeps.
    kappa = np.zeros(len(drawn_lesions))
    for _ in range(3):
      for j, (weights, mask, target, *_rest) in enumerate(drawn_lesions):
        others = clean + sum((np.float32(kappa[m]) * drawn_lesions[m][0]
                              for m in range(len(drawn_lesions)) if m != j), np.zeros_like(clean))
        kappa[j] = pseudo_lesions.solve_kappa(others, lab, weights, mask, target, pixel)
    for j, (weights, *_rest) in enumerate(drawn_lesions):
      clean = clean + np.float32(kappa[j]) * weights
    for j, (weights, mask, target, this_grade, segment, shape_info) in enumerate(drawn_lesions):
      ratio, csf_ratio = pseudo_lesions.lesion_ratio(clean, lab, mask, pixel)
      lesions_out.append(dict(index=j + 1, grade=this_grade, level=L.SEGMENT_NAMES[segment],
                              ratio=ratio, target_ratio=target, csf_ratio=csf_ratio,
                              voxels=int(mask.sum()), **shape_info))

  # 5. noise at the source's level (high-pass estimator), Rician. The warp carries the source's
  # own noise along (the same pattern on every slice), so the target is never below the source's
  # level and the added noise decorrelates the slices.
  target_sigma = base.noise_sigma * rng.uniform(*NOISE_FACTOR)
  image = np.empty_like(clean)
  added = []
  for i in range(num_slices):
    z = rng.standard_normal((2,) + shape)
    mask = real_slices.foreground(clean[i], lab[i])
    sigma = _solve_noise(clean[i], z, mask, target_sigma)
    added.append(sigma)
    image[i] = _rician(clean[i], z, sigma)

  # Truth by the evaluation's rule on the written label map.
  real_rows = np.flatnonzero((base.labels == L.LESION).any(axis=1)) if base.has_real_lesion else []
  seg_of_row = levels.find_levels(lab).row_segments(lab.shape[1])
  segments_truth = {name: 0 for name in L.SEGMENT_NAMES}
  for entry in lesions_out:
    rows = np.flatnonzero((lesion_ids == entry["index"]).any(axis=(0, 2)))
    entry["segments"] = sorted({L.SEGMENT_NAMES[s] for s in seg_of_row[rows] if s >= 0},
                               key=L.SEGMENT_NAMES.index)
  lesion_rows = np.flatnonzero((lab == L.LESION).any(axis=(0, 2)))
  for s in seg_of_row[lesion_rows]:
    if s >= 0:
      segments_truth[L.SEGMENT_NAMES[s]] = 1
  has_lesion = int((lab == L.LESION).any())
  truth = dict(has_lesion=has_lesion,
               grade=max((e["grade"] for e in lesions_out), default=0) if has_lesion else 0,
               segments=segments_truth,
               lesion_levels=[n for n in L.SEGMENT_NAMES if segments_truth[n]],
               compressed_levels=[], num_lesions=len(lesions_out) + int(len(real_rows) > 0),
               real_lesion=int(base.has_real_lesion))
  truth.update(segments_truth)
  if base.has_real_lesion and not lesions_out:
    truth["grade"] = 0  # a real lesion has no synthetic grade

  units = 1000.0  # stored like the phantom's images (arbitrary units)
  spacing = float(slice_spacing_mm)
  rows_n, cols_n = shape
  affine = np.diag([spacing, pixel, pixel, 1.0])
  affine[:3, 3] = [-(num_slices - 1) / 2.0 * spacing, -(cols_n - 1) / 2.0 * pixel,
                   -(rows_n - 1) / 2.0 * pixel]
  meta = dict(base=base.name, pixel_mm=pixel, slice_thickness_mm=spacing, slice_spacing_mm=spacing,
              gamma=gamma, bias_peak=bias_peak, source_noise_sigma=base.noise_sigma,
              target_noise_sigma=target_sigma, added_noise_sigma=added,
              centroid_rows=[float(c) for c in centroids])
  return generator.Subject(
      subject_id=subject_id, profile="real",
      image=generator.model_to_volume((image * units).astype(np.float32)),
      clean=generator.model_to_volume((clean * units).astype(np.float32)),
      labels=generator.model_to_volume(lab), vertebrae=generator.model_to_volume(vert),
      lesion_ids=generator.model_to_volume(lesion_ids), affine=affine,
      noise_sigma=float(target_sigma * units), truth=truth, lesions=lesions_out, meta=meta)


def write_cohort(out_dir: str | os.PathLike, source: str | os.PathLike, num_subjects: int, seed: int,
                 lesion_fraction: float = 0.5, *, num_slices: int = DEFAULT_NUM_SLICES,
                 progress: Callable[[int, generator.Subject, float], None] | None = None,
                 log: Callable[[str], None] | None = None) -> str:
  """Generates a pseudo-patient cohort from `source` and writes it in the phantom's layout.

  Also writes `realism.json` (source vs generated tissue statistics and noise, both after the
  standard normalisation) and a generation record in dataset_description.json.

  Returns:
    The path of participants.tsv.

  Raises:
    InputError: no usable base in the source; only bases with real lesions and a healthy cohort.
  """
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  bases, rejected = real_slices.load_bases(source, log=log)
  flags = cohort_writer.lesion_assignment(num_subjects, float(lesion_fraction), seed)
  healthy_bases = [b for b in bases if not b.has_real_lesion]
  if not healthy_bases and not flags.all():
    raise errors.InputError(source, "every usable base carries a real lesion (label 6): no "
                                    "healthy pseudo-patient can be made")
  root = os.fspath(out_dir)
  os.makedirs(root, exist_ok=True)
  width = max(3, len(str(num_subjects)))
  start_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31337]))
  offset = int(start_rng.integers(len(bases)))
  rows, generated_images, generated_labels = [], [], []
  for i in range(num_subjects):
    t0 = time.perf_counter()
    sid = f"sub-{i + 1:0{width}d}"
    pool = bases if flags[i] else healthy_bases
    base = pool[(offset + i) % len(pool)]
    subject = generate_subject(sid, base, cohort_writer.subject_seed(seed, i, "clinical") ^ 0x5EED,
                               bool(flags[i]), num_slices=num_slices)
    paths = cohort_writer.write_subject(root, subject)
    if base.vertebrae is None:
      os.remove(paths["vertebrae"])  # identities unknown: scoring uses the label rule
    rows.append(cohort_writer.participant_row(subject))
    slices = generator.volume_to_model(subject.image)
    normalised, _ = preprocess.normalize_intensity(slices)
    generated_images.extend(normalised)
    generated_labels.extend(generator.volume_to_model(subject.labels))
    if progress is not None:
      progress(i, subject, time.perf_counter() - t0)
  columns = cohort_writer.PARTICIPANT_COLUMNS
  lines = ["\t".join(columns)] + ["\t".join(row[c] for c in columns) for row in rows]
  tsv = os.path.join(root, "participants.tsv")
  io_utils.write_text(tsv, "\n".join(lines) + "\n")
  io_utils.write_json(os.path.join(root, "participants.json"), cohort_writer.PARTICIPANTS_SIDECAR)
  realism = dict(
      source=os.path.abspath(os.fspath(source)), bases=[b.name for b in bases],
      rejected={n: r for n, r in rejected},
      source_stats=real_slices.tissue_statistics([b.image for b in bases], [b.labels for b in bases]),
      generated_stats=real_slices.tissue_statistics(generated_images, generated_labels),
      note="intensities after the standard normalisation (foreground 0.2 / 99.8 percentile clip, "
           "min-max); lesion pixels (label 6) are not in any tissue; noise_sigma: Immerkaer "
           "high-pass estimator, 1.4826 MAD over the foreground, mean over slices")
  io_utils.write_json(os.path.join(root, "realism.json"), realism)
  description = dict(
      Name="u2ad_jax real-anatomy pseudo-patient cohort", BIDSVersion="1.8.0", DatasetType="raw",
      GeneratedBy=[dict(Name="u2ad_jax.phantom.pseudo_patients",
                        Description="real labelled slices, elastic deformation, contrast / bias / "
                                    "noise at the source's level, graded inserted hyperintensities")],
      Generator=dict(source=os.path.basename(os.path.abspath(os.fspath(source))), seed=int(seed),
                     num_subjects=int(num_subjects), lesion_fraction=float(lesion_fraction),
                     num_slices=int(num_slices), bases=[b.name for b in bases]))
  io_utils.write_json(os.path.join(root, "dataset_description.json"), description)
  io_utils.write_json(os.path.join(root, "derivatives", "labels", "dataset_description.json"),
                      dict(Name="u2ad_jax pseudo-patient labels", BIDSVersion="1.8.0",
                           DatasetType="derivative",
                           GeneratedBy=[dict(Name="u2ad_jax.phantom.pseudo_patients")]))
  return tsv


def read_realism(root: str | os.PathLike) -> dict[str, Any]:
  with open(os.path.join(os.fspath(root), "realism.json"), encoding="utf-8") as f:
    return json.load(f)
