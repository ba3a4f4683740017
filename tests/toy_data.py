"""A tiny in-memory SliceSet for smoke runs of the trainer in tests (test data, not library).

Each slice is a smooth background with a bright vertical "cord" band bordered by a darker
"CSF" band, a few random intensity blobs, and optional bright "lesion" spots inside the cord,
at any image size. It is NOT the phantom (u2ad_jax/phantom/ writes realistic NIfTI cohorts); it
exists so the training loop can run in seconds without reading files. Test modules import it as
`toy_data` (pytest puts tests/ on sys.path; subprocesses get it through
`support.cpu_subprocess_env`).
"""

from __future__ import annotations

import numpy as np

from u2ad_jax import labels as label_defs
from u2ad_jax.data import sliceset


def toy_slice_set(num_slices: int, image_size: int = 32, seed: int = 0,
                  lesion_fraction: float = 0.0, subject_prefix: str = "toy") -> sliceset.SliceSet:
  """`num_slices` slices of `image_size`^2 pixels, 2 slices per subject.

  Returns:
    SliceSet with images in [0, 1], labels (cord 3, CSF 4, lesion 6), train ROI = labels
    {3, 4, 6} dilated, score ROI = {3, 6} eroded (the library's own ROI functions).
  """
  rng = np.random.default_rng(seed)
  size = int(image_size)
  rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
  images = np.zeros((num_slices, size, size), np.float32)
  labels = np.zeros((num_slices, size, size), np.uint8)
  for i in range(num_slices):
    centre = 0.5 + 0.06 * np.sin(2 * np.pi * (rows + rng.uniform())) + rng.uniform(-0.05, 0.05)
    half_cord = rng.uniform(0.06, 0.09)
    distance = np.abs(cols - centre)
    cord = distance < half_cord
    csf = (distance >= half_cord) & (distance < half_cord + 0.06)
    image = 0.3 + 0.1 * np.sin(3 * np.pi * rows + rng.uniform(0, 6)) * np.cos(2 * np.pi * cols)
    image = np.where(cord, 0.55, np.where(csf, 0.9, image))
    for _ in range(3):
      r0, c0 = rng.uniform(0, 1, 2)
      image = image + 0.08 * np.exp(-((rows - r0) ** 2 + (cols - c0) ** 2) / 0.01)
    label = np.where(cord, label_defs.CORD, np.where(csf, label_defs.CSF, 0)).astype(np.uint8)
    if rng.uniform() < lesion_fraction:
      r0 = rng.uniform(0.3, 0.7)
      spot = cord & (np.abs(rows - r0) < 0.06)
      image = np.where(spot, 0.95, image)
      label = np.where(spot, label_defs.LESION, label).astype(np.uint8)
    image = image + rng.normal(0, 0.01, image.shape)
    image = (image - image.min()) / (image.max() - image.min())
    images[i] = image
    labels[i] = label
  subject_ids = [f"{subject_prefix}-{i // 2:03d}" for i in range(num_slices)]
  return sliceset.SliceSet(
      images=images, train_roi=sliceset.train_roi_from_labels(labels),
      score_roi=sliceset.score_roi_from_labels(labels), labels=labels,
      vertebrae=np.zeros_like(labels), subject_ids=subject_ids,
      slice_index=np.arange(num_slices) % 2,
      geometries={s: None for s in subject_ids})
