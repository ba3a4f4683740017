"""The synthetic cohorts: the NumPy phantom and the real-anatomy pseudo-patients.

Phantom (`u2ad synth`), deterministic per seed, one subject in three stages:
  anatomy.py        random cervical-spine geometry (profiles along the cord), lesions at
                    compressed levels.
  cord_frame.py     cord coordinates (s, t) of every pixel of the in-plane grid.
  tissue.py         tissue signals (PD / T1 / T2) and textures.
  render.py         the object of each sagittal slice: signal, labels, vertebrae, lesion maps.
  acquire.py        scanner profiles and acquisition effects (ghosts, Gibbs, bias, Rician noise).
  contrast.py       lesion / local-cord ratio and the contrast solver (shared by both cohorts).
  generator.py      `generate_subject`: the three stages, lesion contrast and per-segment truth.
  cohort_writer.py  the BIDS-like cohort on disk and its participants table.

Real-anatomy pseudo-patients (`u2ad synth --from-slices`), built FROM labelled real slices:
  real_slices.py     which real slices can be bases, noise and tissue measurements.
  pseudo_lesions.py  ellipsoid lesions in the real cord, contrast solved exactly.
  pseudo_patients.py deformation, contrast, noise, truth, and the cohort writer.

Nothing here imports jax; real-data reading and preprocessing live in `u2ad_jax.data`.
"""
