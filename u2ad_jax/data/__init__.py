"""Real-data I/O: reading and validating scans, the cohort layout, and preprocessing to slices.

  nifti.py           validated NIfTI reading (canonical RAS+) and aligned writing of output maps.
  cohort.py          the BIDS-like cohort layout and its participants table.
  preprocess.py      loading: a subject's volumes -> its normalised model slices; whole cohorts.
  slice_geometry.py  the model grid (1 mm, 200 mm field of view) and the exact way back.
  sliceset.py        SliceSet (slices, ROIs, provenance) and the train / scoring ROI rules.
  levels.py          vertebral levels C2 ... T1 of a label map and the six segments' rows (the
                     phantom writes its truth by them, the evaluation scores by them).
  npy_slices.py      the original release's `.npy` slices.
  pipeline.py        seeded training batches and the augmentation law (NumPy reference).
  augment.py         the same augmentation in JAX, run inside the train step from its key.
  spine_tools.py     TotalSpineSeg / SCT segmentations -> our label maps (`u2ad prepare`).

The synthetic cohorts that produce data in this layout live in `u2ad_jax.phantom`.
"""
