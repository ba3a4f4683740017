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
   over the foreground; `noise_sigma`). The warped image has less high-frequency noise than the
   source (interpolation smooths), so Rician noise is added until the same estimator reads the
   target, drawn as 1.0-1.2 x the source's level: never below it, because the warp carries the
   source's own noise along (the same pattern on every slice) and the added noise is what
   decorrelates the slices.

Truth per segment follows the evaluation rule (evaluation/levels.py): segment C{k}-{k+1} spans the
rows from the centroid of vertebral body k to that of body k+1 of the subject's label map; a
segment is positive when a lesion voxel lies in its rows. A base that carries a REAL lesion (label
6) makes a lesion patient (its real lesion segments count as truth); such bases are not used for
`healthy` subjects.

Only slices with a usable cord are bases: seven vertebral bodies and cord labelled on at least
80 % of the rows from the C2 to the T1 centroid. Of the release's five sample slices only
`clinical_1` qualifies (`clinical_3` shows 40 rows of cord, the `public_*` slices are
parasagittal with no cord at all), so a benchmark from the samples has ONE base anatomy: the
pseudo-patients differ by deformation, contrast, noise and lesions, not by anatomy.

Vertebra instance maps are written only when the identities are known: from the source cohort's
own vertebra map, or, for a slice, when its top body is clearly C2 (at least 1.3 x the median
area of the others: the dens makes C2 the tallest body, and the top body does not touch the
image's top edge). Otherwise no vertebra map is written and scoring reads the levels from the
label map (the evaluation's rule).

Volumes are written like the phantom's (RAS+, `phantom.model_to_volume`) with the model frame's
pixel: the release's slices are 256 px over the standard 200 mm field of view (0.78125 mm), which
is what `preprocess` produces, so preprocessing maps them back onto the same grid.
Realism is measured against the source, not tuned to any detector: `realism.json` beside the
cohort lists per tissue (cord, CSF, disc, vertebral body) mean and sd, and the noise level, of
the source bases and of the generated cohort after the standard normalisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import labels as L
from u2ad_jax.data import phantom

# Standard model frame of the release's slices: 256 px over a 200 mm field of view.
DEFAULT_PIXEL_MM = 200.0 / 256.0
DEFAULT_NUM_SLICES = 5
DEFAULT_SLICE_SPACING_MM = 3.3
GRADE_RATIO = phantom.GRADE_RATIO
# Relative frequency of the lesion's segment (C2-3 ... C7-T1): the phantom's order.
SEGMENT_WEIGHTS = np.array([0.05, 0.15, 0.25, 0.35, 0.15, 0.05])
SECOND_LESION_PROBABILITY = 0.2
# Target noise sigma as a multiple of the source's measured one (see step 5).
NOISE_FACTOR = (1.0, 1.2)
# Usable base: cord on at least this fraction of the rows from the C2 to the T1 centroid.
MIN_CORD_ROW_FRACTION = 0.8
# The top body is C2 when its area is at least this multiple of the other bodies' median.
C2_AREA_RATIO = 1.3
# Realism: tissues compared between source and generated cohort.
REALISM_TISSUES = {"cord": L.CORD, "csf": L.CSF, "disc": L.DISC, "vertebral_body": L.VERTEBRA}
# Immerkaer's noise-estimation kernel (difference of two Laplacians); its L2 norm is 6.
_NOISE_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_MAD_TO_SIGMA = 1.4826


@dataclasses.dataclass(frozen=True)
class Base:
  """One real slice a pseudo-patient is built from (model frame: rows S->I, cols A->P).

  Attributes:
    name: where it came from (file stem or subject id + slice).
    image: `[H, W]` float32 in [0, 1].
    labels: `[H, W]` uint8 label map.
    vertebrae: `[H, W]` uint8 vertebra instance ids (labels.VERTEBRA_INSTANCE_IDS), or None when
      the identities are unknown.
    pixel_mm: in-plane pixel size.
    noise_sigma: the source's measured noise (`noise_sigma`).
  """
  name: str
  image: np.ndarray
  labels: np.ndarray
  vertebrae: np.ndarray | None
  pixel_mm: float
  noise_sigma: float

  @property
  def has_real_lesion(self) -> bool:
    return bool((self.labels == L.LESION).any())


# ----------------------------------------------------------------------------- measurements


def noise_sigma(image: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Robust noise sigma of a `[H, W]` image (Immerkaer's high-pass kernel, 1.4826 MAD).

  The kernel cancels any locally linear signal, so its response is noise (sigma * 6 for white
  Gaussian noise) except at edges, which the median ignores. `mask`: pixels to use (default
  all but the border).
  """
  image = np.asarray(image, np.float64)
  response = ndimage.convolve(image, _NOISE_KERNEL, mode="nearest")[1:-1, 1:-1]
  use = np.ones_like(response, bool) if mask is None else np.asarray(mask, bool)[1:-1, 1:-1]
  values = response[use]
  if values.size == 0:
    return float("nan")
  return float(_MAD_TO_SIGMA * np.median(np.abs(values - np.median(values))) / 6.0)


def foreground(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Pixels used for the noise estimate: labelled tissue or above 5 % of the image's range.

  Dark air carries Rician (not Gaussian) noise and the zero-filled parts of a field of view
  none; both would bias the estimate low.
  """
  image = np.asarray(image, np.float64)
  lo, hi = np.percentile(image, (0.2, 99.8))
  return (np.asarray(labels) > 0) | (image > lo + 0.05 * (hi - lo))


def tissue_statistics(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict[str, Any]:
  """Mean and sd of each realism tissue and the mean noise sigma over `[H, W]` slices."""
  out: dict[str, Any] = {}
  for name, value in REALISM_TISSUES.items():
    pixels = np.concatenate([np.asarray(i, np.float64)[np.asarray(l) == value]
                             for i, l in zip(images, labels)])
    out[name] = ({"mean": float(pixels.mean()), "sd": float(pixels.std()), "pixels": int(pixels.size)}
                 if pixels.size else None)
  sigmas = [noise_sigma(i, foreground(i, l)) for i, l in zip(images, labels)]
  out["noise_sigma"] = float(np.mean(sigmas))
  return out


# ----------------------------------------------------------------------------- bases


def usable_cord(labels: np.ndarray) -> tuple[bool, str]:
  """(usable, reason): seven bodies and cord on >= 80 % of the rows from C2 to T1."""
  from u2ad_jax.evaluation import levels  # pylint: disable=g-import-not-at-top
  bodies = levels.vertebral_bodies(labels)
  if len(bodies) < levels.NUM_LEVELS:
    return False, f"{len(bodies)} vertebral bodies (label 2), need 7 (C2 ... T1)"
  top, bottom = int(np.ceil(bodies[0][0])), int(np.floor(bodies[levels.NUM_LEVELS - 1][0]))
  cord_rows = np.isin(labels, L.CORD_LABELS).any(axis=1)[top:bottom + 1]
  fraction = float(cord_rows.mean()) if cord_rows.size else 0.0
  if fraction < MIN_CORD_ROW_FRACTION:
    return False, f"cord on {fraction:.0%} of the rows from C2 to T1 (need {MIN_CORD_ROW_FRACTION:.0%})"
  return True, "usable"


def vertebra_identities(labels: np.ndarray) -> np.ndarray | None:
  """Vertebra instance map of a slice whose top body is clearly C2, else None (see module doc)."""
  body = np.asarray(labels) == L.VERTEBRA
  components, count = ndimage.label(body)
  if count < len(L.VERTEBRA_NAMES):
    return None
  index = np.arange(1, count + 1)
  areas = np.asarray(ndimage.sum_labels(body, components, index))
  rows = np.array([c[0] for c in ndimage.center_of_mass(body, components, index)])
  keep = areas >= 0.25 * float(np.median(areas))  # the evaluation's fragment rule
  order = [int(i) for i in index[keep][np.argsort(rows[keep])]]
  if len(order) < len(L.VERTEBRA_NAMES):
    return None
  top_area = areas[order[0] - 1]
  others = float(np.median([areas[i - 1] for i in order[1:]]))
  touches_top = bool((components[0] == order[0]).any())
  if top_area < C2_AREA_RATIO * others or touches_top:
    return None
  names = list(L.VERTEBRA_INSTANCE_IDS)
  out = np.zeros(body.shape, np.uint8)
  for rank, comp in enumerate(order[:len(names)]):
    out[components == comp] = L.VERTEBRA_INSTANCE_IDS[names[rank]]
  return out


def load_bases(source: str | os.PathLike, *, log: Callable[[str], None] | None = None
               ) -> tuple[list[Base], list[tuple[str, str]]]:
  """Usable bases of a source: a folder of `.npy` slices or a cohort in our layout.

  Returns:
    (bases, rejected) where rejected lists (name, reason) of every slice that is not a base.

  Raises:
    InputError: source missing, or no usable base in it (the message lists why per slice).
  """
  source = os.fspath(source)
  if not os.path.isdir(source):
    raise errors.InputError(source, "source folder not found")
  candidates: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None, float]] = []
  if any(n.endswith(".npy") for n in os.listdir(source)):
    from u2ad_jax.data import npy_slices  # pylint: disable=g-import-not-at-top
    for name in sorted(n for n in os.listdir(source) if n.endswith(".npy")):
      image, _, labels = npy_slices.load_npy_slice(os.path.join(source, name))
      candidates.append((name[:-4], image, labels, vertebra_identities(labels),
                         200.0 / image.shape[0]))
  else:
    candidates = _cohort_candidates(source)
  bases, rejected = [], []
  for name, image, labels, vertebrae, pixel in candidates:
    ok, reason = usable_cord(labels)
    if not ok:
      rejected.append((name, reason))
      continue
    sigma = noise_sigma(image, foreground(image, labels))
    bases.append(Base(name=name, image=image.astype(np.float32), labels=labels.astype(np.uint8),
                      vertebrae=vertebrae, pixel_mm=float(pixel), noise_sigma=sigma))
  if log is not None:
    for name, reason in rejected:
      log(f"not a base: {name}: {reason}")
  if not bases:
    why = "; ".join(f"{n}: {r}" for n, r in rejected) or "no slices"
    raise errors.InputError(source, f"no slice with a usable cord ROI ({why})")
  return bases, rejected


def _cohort_candidates(root: str):
  """Model-frame slices of a cohort in our layout, normalised as the pipeline does."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(image_size=256, patch_size=16, fov_mm=200.0, pixel_mm=1.0,
                                       clip_percentiles=(0.2, 99.8), min_roi_patches=1))
  slices = preprocess.load_cohort(root, cfg, progress=False)
  out = []
  for i, sid in enumerate(slices.subject_ids):
    vert = slices.vertebrae[i]
    known = all((vert == L.VERTEBRA_INSTANCE_IDS[n]).any() for n in L.VERTEBRA_NAMES)
    out.append((f"{sid}_slice{int(slices.slice_index[i])}", slices.images[i], slices.labels[i],
                vert.astype(np.uint8) if known else None, 200.0 / slices.images.shape[1]))
  return out


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


# ----------------------------------------------------------------------------- lesions


def _cord_centre(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per row: cord centre column (NaN where no cord) and cord AP width (pixels)."""
  cord = np.isin(labels, L.CORD_LABELS)
  width = cord.sum(axis=1).astype(np.float64)
  cols = np.arange(labels.shape[1], dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    centre = (cord * cols).sum(axis=1) / width
  return centre, width


def _draw_lesion_shape(rng, volume_labels, segment, centroids, pixel, grade, spacing):
  """Weights `[X, H, W]` (1 inside, soft border for grade 1) and the ellipsoid mask, or None.

  Drawn on the middle slice's cord; each slice keeps only its own cord voxels.
  """
  num_slices = volume_labels.shape[0]
  labels = volume_labels[num_slices // 2]
  centre_col, width = _cord_centre(labels)
  top, bottom = centroids[segment], centroids[segment + 1]
  # Centre rows at least 4 px inside the segment, so a lesion of >= 2 px half-extent fits.
  rows = np.arange(int(np.ceil(top + 4)), int(np.floor(bottom - 4)) + 1)
  rows = rows[(rows >= 0) & (rows < labels.shape[0])]
  rows = rows[(width[rows] >= 3) & (labels[rows] == L.CORD).any(axis=1)]
  if rows.size == 0:
    return None
  r0 = float(rng.choice(rows))
  c0 = float(centre_col[int(r0)])
  half_len = rng.uniform(3.0, 15.0) / pixel / 2.0
  half_ap = min(rng.uniform(0.75, 2.0) / pixel, 0.3 * width[int(r0)])
  half_lat = rng.uniform(2.0, 5.0)  # mm
  # Local cord direction from the centreline over +-10 mm.
  span = np.arange(max(int(r0 - 10 / pixel), 0), min(int(r0 + 10 / pixel), labels.shape[0] - 1) + 1)
  good = np.isfinite(centre_col[span])
  slope = np.polyfit(span[good], centre_col[span][good], 1)[0] if good.sum() >= 3 else 0.0
  norm = np.hypot(1.0, slope)
  along = np.array([1.0, slope]) / norm
  across = np.array([-slope, 1.0]) / norm
  # Kept 1 px inside the segment's rows (the ellipse's row extent is sqrt((a along_r)^2 +
  # (b across_r)^2)), so the lesion marks its own segment only.
  room_rows = min(r0 - top - 1.0, bottom - r0 - 2.0)
  half_ap = min(half_ap, 0.7 * room_rows / max(abs(across[0]), 1e-6))
  extent = np.hypot(half_len * along[0], half_ap * across[0])
  if extent > room_rows:
    half_len = np.sqrt(max(room_rows ** 2 - (half_ap * across[0]) ** 2, 1.0)) / along[0]
  rr, cc = np.meshgrid(np.arange(labels.shape[0], dtype=np.float64),
                       np.arange(labels.shape[1], dtype=np.float64), indexing="ij")
  u = (rr - r0) * along[0] + (cc - c0) * along[1]
  v = (rr - r0) * across[0] + (cc - c0) * across[1]
  q2d = (u / half_len) ** 2 + (v / half_ap) ** 2
  positions = (np.arange(num_slices) - (num_slices - 1) / 2.0) * spacing
  weights = np.zeros((num_slices,) + labels.shape, np.float32)
  masks = np.zeros((num_slices,) + labels.shape, bool)
  for i, x in enumerate(positions):
    room = 1.0 - (x / half_lat) ** 2
    if room <= 0.05:
      continue
    q = q2d / room
    if grade == 1:
      w = np.exp(-2.0 * np.maximum(q - 0.5, 0.0)) * (q < 2.5)  # fuzzy border
    else:
      w = ndimage.gaussian_filter((q <= 1.0).astype(np.float64), 0.5)
    cord = volume_labels[i] == L.CORD
    weights[i] = (w * cord).astype(np.float32)
    masks[i] = (q <= 1.0) & cord
  if not masks.any():
    return None
  return weights, masks, dict(row=r0, col=c0, length_mm=2 * half_len * pixel,
                               ap_mm=2 * half_ap * pixel, lateral_mm=2 * half_lat)


def _rician(clean: np.ndarray, z: np.ndarray, sigma: float) -> np.ndarray:
  return np.sqrt((clean + sigma * z[0]) ** 2 + (sigma * z[1]) ** 2)


def _solve_noise(clean: np.ndarray, z: np.ndarray, mask: np.ndarray, target: float) -> float:
  """Sigma of the added noise (fixed draw `z`) so that `noise_sigma` of the result is `target`.

  The estimator is monotonic in sigma but not exactly additive in quadrature (edges and the
  image's own noise enter the median), so it is solved by bisection on the actual estimate.
  """
  if noise_sigma(clean, mask) >= target:
    return 0.0
  lo, hi = 0.0, 2.0 * target
  for _ in range(16):
    mid = 0.5 * (lo + hi)
    if noise_sigma(_rician(clean, z, mid), mask) < target:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def _local_regions(labels: np.ndarray, mask: np.ndarray, pixel: float):
  """(local cord, local CSF) masks of a lesion in `[X, H, W]` slices (phantom's margins)."""
  rows = np.flatnonzero(mask.any(axis=(0, 2)))
  slices = mask.any(axis=(1, 2))
  r = np.arange(labels.shape[1])
  near = (r >= rows[0] - phantom.LOCAL_CORD_MARGIN_MM / pixel) & (r <= rows[-1] + phantom.LOCAL_CORD_MARGIN_MM / pixel)
  wide = (r >= rows[0] - phantom.LOCAL_CSF_MARGIN_MM / pixel) & (r <= rows[-1] + phantom.LOCAL_CSF_MARGIN_MM / pixel)
  cord = (labels == L.CORD) & slices[:, None, None] & near[None, :, None]
  csf = (labels == L.CSF) & slices[:, None, None] & wide[None, :, None]
  if not csf.any():
    csf = labels == L.CSF
  return cord, csf


def lesion_ratio(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, pixel: float
                 ) -> tuple[float, float]:
  """(lesion / local-cord mean ratio, local CSF 95th percentile / local-cord mean) in `[X, H, W]`."""
  cord, csf = _local_regions(labels, mask, pixel)
  cord_mean = float(image[cord].mean())
  csf_ratio = (float(np.percentile(image[csf], phantom.LOCAL_CSF_PERCENTILE)) / cord_mean
               if csf.any() else float("nan"))
  return float(image[mask].mean()) / cord_mean, csf_ratio


def _solve_kappa(image, labels, weights, mask, target, pixel):
  """k such that `image + k * weights` has the lesion / local-cord ratio `target`."""
  cord, _ = _local_regions(labels, mask, pixel)
  # ratio(k) = (a + k b) / (c + k d): linear fractional, solved exactly.
  a, b = float(image[mask].mean()), float(weights[mask].mean())
  c, d = float(image[cord].mean()), float(weights[cord].mean()) if cord.any() else 0.0
  return max((target * c - a) / max(b - target * d, 1e-6), 0.0)


# ----------------------------------------------------------------------------- subjects


def generate_subject(subject_id: str, base: Base, seed: int, lesion: bool, *,
                     num_slices: int = DEFAULT_NUM_SLICES,
                     slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM) -> phantom.Subject:
  """One pseudo-patient from `base` (see the module docstring for each step).

  Returns a `phantom.Subject` (so the phantom's writer and participants table apply); `clean` is
  the image before the added noise, `noise_sigma` the added noise's sigma (image units).
  """
  rng = np.random.default_rng(seed)
  pixel = base.pixel_mm
  shape = base.image.shape
  from u2ad_jax.evaluation import levels  # pylint: disable=g-import-not-at-top

  # 1. geometry: similarity + elastic; redraw until the seven bodies survive.
  for _ in range(20):
    sim = _similarity_coords(shape, rng.uniform(0.95, 1.05), np.deg2rad(rng.uniform(-4, 4)),
                             rng.uniform(-3, 3, 2) / pixel)
    elastic = _smooth_field(rng, shape, sigma_px=rng.uniform(15, 30) / pixel,
                            peak_px=rng.uniform(1.0, 3.0) / pixel)
    coords = sim + elastic
    labels2d = _warp(base.labels, coords, 0).astype(np.uint8)
    if len(levels.vertebral_bodies(labels2d)) >= levels.NUM_LEVELS and usable_cord(labels2d)[0]:
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
      drawn = _draw_lesion_shape(rng, lab, segment, centroids, pixel, grade, slice_spacing_mm)
      if drawn is None:
        continue
      weights, mask, shape_info = drawn
      mask &= lesion_ids == 0
      target = rng.uniform(*GRADE_RATIO[grade])
      this_grade = grade
      if grade == 2:
        _, csf_ratio = lesion_ratio(clean, lab, mask, pixel)
        cap = phantom.CSF_HEADROOM * csf_ratio
        if cap < GRADE_RATIO[2][0] + 0.03:
          this_grade, target = 1, float(min(rng.uniform(*GRADE_RATIO[1]), cap))
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
        kappa[j] = _solve_kappa(others, lab, weights, mask, target, pixel)
    for j, (weights, *_rest) in enumerate(drawn_lesions):
      clean = clean + np.float32(kappa[j]) * weights
    for j, (weights, mask, target, this_grade, segment, shape_info) in enumerate(drawn_lesions):
      ratio, csf_ratio = lesion_ratio(clean, lab, mask, pixel)
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
    mask = foreground(clean[i], lab[i])
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
  return phantom.Subject(
      subject_id=subject_id, profile="real", image=phantom.model_to_volume((image * units).astype(np.float32)),
      clean=phantom.model_to_volume((clean * units).astype(np.float32)),
      labels=phantom.model_to_volume(lab), vertebrae=phantom.model_to_volume(vert),
      lesion_ids=phantom.model_to_volume(lesion_ids), affine=affine,
      noise_sigma=float(target_sigma * units), truth=truth, lesions=lesions_out, meta=meta)


def write_cohort(out_dir: str | os.PathLike, source: str | os.PathLike, num_subjects: int, seed: int,
                 lesion_fraction: float = 0.5, *, num_slices: int = DEFAULT_NUM_SLICES,
                 progress: Callable[[int, phantom.Subject, float], None] | None = None,
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
  bases, rejected = load_bases(source, log=log)
  flags = phantom.lesion_assignment(num_subjects, float(lesion_fraction), seed)
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
    subject = generate_subject(sid, base, phantom.subject_seed(seed, i, "clinical") ^ 0x5EED,
                               bool(flags[i]), num_slices=num_slices)
    paths = phantom.write_subject(root, subject)
    if base.vertebrae is None:
      os.remove(paths["vertebrae"])  # identities unknown: scoring uses the label rule
    rows.append(phantom.participant_row(subject))
    slices = phantom.volume_to_model(subject.image)
    normalised, _ = preprocess.normalize_intensity(slices)
    generated_images.extend(normalised)
    generated_labels.extend(phantom.volume_to_model(subject.labels))
    if progress is not None:
      progress(i, subject, time.perf_counter() - t0)
  columns = phantom.PARTICIPANT_COLUMNS
  lines = ["\t".join(columns)] + ["\t".join(row[c] for c in columns) for row in rows]
  tsv = os.path.join(root, "participants.tsv")
  io_utils.write_text(tsv, "\n".join(lines) + "\n")
  io_utils.write_json(os.path.join(root, "participants.json"), phantom._PARTICIPANTS_SIDECAR)  # pylint: disable=protected-access
  realism = dict(
      source=os.path.abspath(os.fspath(source)), bases=[b.name for b in bases],
      rejected={n: r for n, r in rejected},
      source_stats=tissue_statistics([b.image for b in bases], [b.labels for b in bases]),
      generated_stats=tissue_statistics(generated_images, generated_labels),
      note="intensities after the standard normalisation (foreground 0.2 / 99.8 percentile clip, "
           "min-max); lesion pixels (label 6) are not in any tissue; noise_sigma: Immerkaer "
           "high-pass estimator, 1.4826 MAD over the foreground, mean over slices")
  io_utils.write_json(os.path.join(root, "realism.json"), realism)
  description = dict(
      Name="u2ad_jax real-anatomy pseudo-patient cohort", BIDSVersion="1.8.0", DatasetType="raw",
      GeneratedBy=[dict(Name="u2ad_jax.data.pseudo_patients",
                        Description="real labelled slices, elastic deformation, contrast / bias / "
                                    "noise at the source's level, graded inserted hyperintensities")],
      Generator=dict(source=os.path.basename(os.path.abspath(os.fspath(source))), seed=int(seed),
                     num_subjects=int(num_subjects), lesion_fraction=float(lesion_fraction),
                     num_slices=int(num_slices), bases=[b.name for b in bases]))
  io_utils.write_json(os.path.join(root, "dataset_description.json"), description)
  io_utils.write_json(os.path.join(root, "derivatives", "labels", "dataset_description.json"),
                      dict(Name="u2ad_jax pseudo-patient labels", BIDSVersion="1.8.0",
                           DatasetType="derivative",
                           GeneratedBy=[dict(Name="u2ad_jax.data.pseudo_patients")]))
  return tsv


def read_realism(root: str | os.PathLike) -> dict[str, Any]:
  with open(os.path.join(os.fspath(root), "realism.json"), encoding="utf-8") as f:
    return json.load(f)
