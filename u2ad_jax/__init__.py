"""u2ad_jax: U2AD (uncertainty-guided unsupervised anomaly detection of T2 hyperintensity in
sagittal spinal-cord MRI) in JAX.

Layout (one concept per module):
  data/        synthetic cohort (phantom), NIfTI I/O, preprocessing to 2D slices, batching.
  models/      the masked-autoencoder ViT with image and edge heads.
  patches.py   patch grid helpers shared by masking, loss and uncertainty.
  masking.py   ROI-restricted random / EU-guided masking, AU exclusion, the MaskPlan.
  losses.py    Sobel edge target, structure weight, masked ROI reconstruction loss.
  uncertainty.py  Monte-Carlo EU / AU maps of one batch with exact coverage.
  mc_maps.py      the one Monte-Carlo path over a slice set (training refresh, evaluation).
  anomaly.py      residual x - mean reconstruction -> anomaly / AU-candidate map (hyperintense part).
  candidates.py   host-side connected-component anomaly candidates (AU guidance, postprocessing).
  schedules.py    uncertainty-weighting schedules chosen by name from the config (a registry).
  stages.py       the stage names and the ablation methods, defined once.
  config_lib.py   helpers of the config files in configs/ (arguments, ablations, runlocal).
  train/       train state, pmapped / shard_mapped step, checkpoints, the stage driver.
  evaluation/  anomaly maps, curves, segment / patient scores, metrics, figures, reports.
  cli.py       the `u2ad` command.
"""

__version__ = "0.1.0"
