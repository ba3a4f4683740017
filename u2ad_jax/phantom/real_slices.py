"""The real slices a pseudo-patient is built from (`pseudo_patients`), and their measurements.

A base is one labelled REAL sagittal slice in the model frame (rows S->I, cols A->P): a slice of
the original release's `.npy` format, or a slice of a cohort in our layout after the standard
preprocessing.

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

The noise level of a slice is measured with a robust high-pass estimator (Immerkaer's 3x3
Laplacian-difference kernel, 1.4826 MAD of its response over the foreground), so generated
pseudo-patients can carry the source's own noise level; `tissue_statistics` gives the per-tissue
means and sds that `realism.json` compares between the source and a generated cohort.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import labels as L
from u2ad_jax.data import levels

# Standard model frame of the release's slices: 256 px over a 200 mm field of view.
DEFAULT_PIXEL_MM = 200.0 / 256.0
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

