"""The config schema, with the method's defaults.

Every other config file starts from `make_config()` and overrides a few fields; the values set
here are what a config holds unless a variant or an argument changes them. Usage:

  u2ad train --config configs/base.py[:runlocal,ablation=eu,schedule=linear] --workdir DIR \
      [--config.optim.lr=1e-3 ...]

Arguments after the colon (u2ad_jax/config_lib.py): ablation=baseline|eu|au|eu_au,
schedule=NAME (schedules.available()), runlocal. `config.ablation` is set from the final stage
lists (config_lib.finalize).
"""

import ml_collections
from ml_collections import config_dict

from u2ad_jax import anomaly
from u2ad_jax import config_lib
from u2ad_jax import stages


def make_config() -> ml_collections.ConfigDict:
  """All fields, at the paper's values; model sizes as in the paper configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Inputs (preprocess.load_cohort reads this block).
  config.data = ml_collections.ConfigDict()
  config.data.image_size = 256          # model input size (pixels)
  config.data.patch_size = 8            # must equal the model's patch size
  config.data.fov_mm = 200.0            # centre crop / zero pad of the in-plane field of view
  config.data.pixel_mm = 1.0            # in-plane resampling
  config.data.clip_percentiles = (0.2, 99.8)
  config.data.min_roi_patches = 4       # slices whose train ROI touches fewer patches are skipped
  config.data.public_dir = ""           # healthy public cohort (pretraining)
  config.data.clinical_dir = ""         # the clinical cohort (adaptation, then evaluation)
  config.data.augment = True            # brightness / contrast / noise, inside the train step
  config.data.prefetch = 2              # host batches built ahead of the device step

  # The model: a variant of models/vit_mae.VARIANTS (transformer widths / depths) at the input
  # geometry of `data` (image_size, patch_size), plus performance overrides (None = default).
  config.model = ml_collections.ConfigDict()
  config.model.variant = "paper"
  # The model's field of view: None = every patch of the image (the paper); r = only the ROI
  # patches and their neighbours within r patches (masking.context_band), in training, the map
  # refreshes and the evaluation alike. The loss and the maps only ever read ROI patches.
  config.model.context_patches = config_dict.placeholder(int)
  config.model.overrides = ml_collections.ConfigDict()
  # attention: auto (per platform: blockwise CPU, cudnn GPU, tpu_flash TPU) or one of them,
  # dense, dot_product, per_head_remat. dtype: compute dtype, e.g. bfloat16, or auto (bfloat16 on
  # GPU / TPU, float32 on CPU); parameters, optimizer state, softmax and the loss stay float32.
  config.model.overrides.attention = config_dict.placeholder(str)
  config.model.overrides.dtype = config_dict.placeholder(str)
  config.model.overrides.remat = config_dict.placeholder(bool)     # rematerialise the blocks
  config.model.overrides.remat_policy = config_dict.placeholder(str)
  config.model.overrides.scan_layers = config_dict.placeholder(bool)  # changes the param tree

  config.masking = ml_collections.ConfigDict()
  config.masking.ratio = 0.75           # fraction of each image's ROI patches masked

  config.loss = ml_collections.ConfigDict()
  config.loss.image_weight = 10.0
  config.loss.edge_weight = 1.0
  config.loss.structure_weight = True   # W = 1 + avgpool3x3(mask grid)

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 3e-3
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.decay_every_epochs = 50  # step decay: lr x decay_factor every this many epochs
  config.optim.decay_factor = 0.1
  # 'step' (the paper: lr x decay_factor every decay_every_epochs) or 'cosine' (lr -> lr x
  # decay_factor over decay_every_epochs, then flat); either after a linear warmup of
  # warmup_epochs (0 = none). The schedule restarts with the optimizer state (see `restart`).
  config.optim.schedule = "step"
  config.optim.warmup_epochs = 0.0
  # When a new optimizer state (Adam moments and schedule counter) starts: 'stage' = at every
  # stage; 'adaptation' = at pretrain -> adaptation only (adapt_eu_au continues adapt_eu's).
  config.optim.restart = "stage"

  config.batch_size = 10                # global batch, split over all devices of all processes

  config.stages = stages.STAGES
  config.stage_epochs = ml_collections.ConfigDict()
  config.stage_epochs.pretrain = 200
  config.stage_epochs.adapt_eu = 150
  config.stage_epochs.adapt_eu_au = 50

  # Uncertainty weighting: the schedule (schedules.available()) and one field per parameter of
  # the registered schedules, at its declared default (config_lib.guidance_config); the ramp
  # section is read only by the schedules that declare its fields (linear, cosine).
  # None = the schedule's default (ramp_lengths: the ramp stages' epochs).
  config.guidance = config_lib.guidance_config("piecewise")
  config.guidance.params.w_eu = 1.0
  config.guidance.params.tau = 1.0
  # The paper's method (eu_au): EU guidance in both adaptation stages, AU exclusion in the last.
  config.guidance.params.eu_stages = ("adapt_eu", "adapt_eu_au")
  config.guidance.params.au_stages = ("adapt_eu_au",)
  config.guidance.ramp.w_eu_start = 0.0

  # Monte-Carlo maps (uncertainty.mc_uncertainty), regenerated during adaptation.
  config.uncertainty = ml_collections.ConfigDict()
  config.uncertainty.num_samples = 10   # K reconstructions per ROI patch
  config.uncertainty.refresh_epochs = 10
  config.uncertainty.slices_per_device = 2  # slices per device per map call (x passes each)
  config.uncertainty.pass_chunk = config_dict.placeholder(int)  # bound activation memory

  # AU candidates excluded from masking (candidates.select_candidates).
  config.candidates = ml_collections.ConfigDict()
  config.candidates.percentile = 90.0
  config.candidates.min_size = 2
  config.candidates.top_k = 3          # a count >= 1, or None = every component (0 is rejected)
  # The AU map the candidates come from (u2ad_jax/anomaly.py): 'centered_positive' (hyperintense
  # part of x - mean after removing the slice's median cord residual), 'positive', 'absolute'.
  # Required: the trainer has no fallback of its own.
  config.candidates.residual = anomaly.DEFAULT_RESIDUAL

  # Evaluation's own thresholding of the anomaly maps (candidates.threshold_components).
  config.postprocess = ml_collections.ConfigDict()
  config.postprocess.percentile = 90.0
  config.postprocess.min_size = 2
  config.postprocess.top_k = config_dict.placeholder(int)  # None keeps every component; 0 rejected

  config.evaluation = ml_collections.ConfigDict()
  # Unsupervised decision threshold: median + k * robust sigma of the pooled segment scores.
  # k = 2.5 was chosen on development phantom cohorts (seeds 1-4, never the demo's seed 0):
  # mean patient / segment F1 0.913 / 0.813 at k = 3, 0.927 / 0.844 at 2.5, 0.908 / 0.813 at 2.
  config.evaluation.threshold = "mad"
  config.evaluation.mad_k = 2.5
  config.evaluation.curve_reduction = "sum"  # across the cord width: 'sum' | 'max'
  # Then summed over this length of cord (mm; 0 = per row): lesion extent x intensity
  # (evaluation/curves.py).
  config.evaluation.curve_window_mm = 8.0
  # Anomaly map from the residual x - mean reconstruction (u2ad_jax/anomaly.py):
  # 'centered_positive' (hyperintense part after removing the subject's median cord residual),
  # 'positive', or 'absolute' (|x - mean|, the method as written).
  config.evaluation.residual = anomaly.DEFAULT_RESIDUAL
  # K at evaluation (MC reconstructions per ROI patch); None = uncertainty.num_samples.
  config.evaluation.num_samples = config_dict.placeholder(int)
  # Segment scores: 'none' (the curve's maximum) or 'level_z' (robust z per vertebral level across
  # the cohort's patients, before the threshold and the patient maximum; evaluation/scoring.py).
  config.evaluation.segment_norm = "none"

  # Validation while training (train/validation.py): held-out NORMAL slices scored every
  # `every_steps` global steps and at each stage end (masked loss; SSIM, PSNR and correlation of
  # the MC mean reconstruction on normal cord), into metrics.jsonl and the curves figure.
  # Slices: `data_dir` (a cohort of normal slices) or else `num_subjects` public subjects held
  # out of pretraining, chosen by the seed (`subjects` records them; set it to choose them).
  config.validation = ml_collections.ConfigDict()
  config.validation.every_steps = 0     # 0 = off
  config.validation.data_dir = ""
  config.validation.num_subjects = 2
  config.validation.subjects = ()
  config.validation.max_slices = 16
  config.validation.num_samples = 2     # K of the MC mean reconstruction
  config.validation.figures = False     # also write validation/step_XXXXXXX.png
  # TensorBoard image panel (input, mean reconstruction, EU, anomaly) of this many validation
  # slices at every map refresh and stage end; 0 = none.
  config.validation.panel_slices = 4

  config.parallel = "pmap"              # 'pmap' (default) | 'shard_map'
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500   # plus a save at the end of every stage
  config.checkpoint.max_to_keep = 3
  # Also keep every checkpoint at a multiple of this step (0 = none; a multiple of every_steps),
  # so that `u2ad evaluate --steps all` can score the run along its training.
  config.checkpoint.keep_every_steps = 0
  config.log_every_steps = 50
  # TensorBoard event files in the workdir (`tensorboard --logdir WORKDIR`), beside metrics.jsonl.
  config.tensorboard = True
  # Testing aid: stop (as if killed, no save) once this many global steps are done; 0 = off.
  config.debug_stop_after_steps = 0
  config.runlocal = False
  return config


def get_config(arg=None):
  args = config_lib.parse_arg(arg, **config_lib.COMMON_ARGS)
  return config_lib.finalize(make_config(), args)
