"""The run config resolved once, at the trainer's door, into small typed settings.

`resolve(config)` checks everything that would otherwise fail (or silently misbehave) mid-run,
before any data is read, and returns a `RunSettings` of frozen dataclasses: the optimizer
(`state.OptimizerSettings`), the step (`step.StepSettings`), the data, the checkpoints, the
schedule. Below the door the lower modules (state, step, checkpoint, resume, stage) take these
explicit arguments and never read the ConfigDict; the one exception is the Monte-Carlo maps'
training adapter (`maps.MapGenerator`), which reads its own settings from the config.

Also here: what a config says about the model (`build_model`) and its identity for checkpoints
(`shape_fields`, `fingerprint`): configs recorded in a workdir are read through these too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections

from u2ad_jax import anomaly
from u2ad_jax import candidates
from u2ad_jax import config_lib
from u2ad_jax import errors
from u2ad_jax import parallel
from u2ad_jax import schedules
from u2ad_jax.models import vit_mae
from u2ad_jax.stages import STAGES
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib
from u2ad_jax.train import validation as validation_lib


# Which cohort each stage trains on: the key of config.data holding its directory.
STAGE_DATA = {"pretrain": "public_dir", "adapt_eu": "clinical_dir", "adapt_eu_au": "clinical_dir"}
# Config fields that fix the shapes of the parameters or of the inputs the parameters expect;
# a workdir (or an init_from run) trained with other values cannot be resumed from.
SHAPE_FIELDS = ("model.variant", "model.overrides", "data.image_size", "data.patch_size")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """How batches are built (the cohorts themselves are loaded at the door; augmentation runs in
  the step: `StepSettings.augment`).

  Attributes:
    batch_size: the global batch, split over all devices of all processes.
    prefetch: host batches built ahead of the device step.
  """
  batch_size: int
  prefetch: int


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """every_steps: periodic save (0 = only at stage ends); max_to_keep: newest kept (None: all);
  keep_every_steps: also keep every checkpoint whose step is a multiple of it, for a later
  `u2ad evaluate --steps all` sweep (0 = none; a multiple of every_steps)."""
  every_steps: int
  max_to_keep: int | None
  keep_every_steps: int = 0


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Everything the trainer reads from the config, checked.

  Attributes:
    seed: the run's root seed (data order, masks, maps, fresh parameters).
    stages: the stages to run, in training order.
    stage_epochs: epochs of every stage (of `stages.STAGES`).
    parallel: 'pmap' or 'shard_map'.
    optimizer: the optimizer (one object per settings, shared by the state and the step).
    step: the step's static settings (`guided` False; each stage sets it).
    data: batching.
    checkpoint: checkpoint cadence.
    schedule: the guidance schedule.
    refresh_epochs: the maps are regenerated every this many epochs of a guided stage.
    log_every_steps: the progress line's cadence.
    debug_stop_after_steps: stop as if killed after this many global steps (0 = off).
    fingerprint: the model / input identity saved with every checkpoint (`fingerprint`).
    validation: validation while training (off unless `validation.every_steps` > 0).
    tensorboard: also write TensorBoard event files into the workdir (`summaries`).
  """
  seed: int
  stages: tuple[str, ...]
  stage_epochs: dict[str, int]
  parallel: str
  optimizer: state_lib.OptimizerSettings
  step: step_lib.StepSettings
  data: DataSettings
  checkpoint: CheckpointSettings
  schedule: schedules.ScheduleFn
  refresh_epochs: int
  log_every_steps: int
  debug_stop_after_steps: int
  fingerprint: str
  validation: validation_lib.ValidationSettings = validation_lib.ValidationSettings()
  tensorboard: bool = True


def resolve(config: Any) -> RunSettings:
  """Checks `config` and resolves it into `RunSettings`.

  Checked: stages, epochs, parallel mode, optimizer, map refresh, batch size, the guidance fields
  against the schedule registry (finite; weights >= 0, temperatures > 0), the AU-candidate and
  postprocessing parameters, and that pretraining gets no guidance.

  Raises:
    ConfigValueError (a ValueError): one line naming the field and the problem.
  """
  stages = tuple(config.stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise errors.ConfigValueError(
        f"config.stages must be a non-empty subset of {STAGES}, got {stages}")
  if list(stages) != sorted(stages, key=STAGES.index) or len(set(stages)) != len(stages):
    raise errors.ConfigValueError(
        f"config.stages must follow the order {STAGES} without repeats: {stages}")
  stage_epochs = {s: int(config.stage_epochs[s]) for s in STAGES}
  for s in stages:
    if stage_epochs[s] < 0:
      raise errors.ConfigValueError(f"config.stage_epochs.{s} must be >= 0")
  if config.parallel not in parallel.MODES:
    raise errors.ConfigValueError(
        f"config.parallel must be one of {parallel.MODES}, got {config.parallel!r}")
  optimizer = optimizer_settings(config.optim)
  if int(config.uncertainty.refresh_epochs) < 1:
    raise errors.ConfigValueError("config.uncertainty.refresh_epochs must be >= 1")
  if int(config.batch_size) < 1:
    raise errors.ConfigValueError("config.batch_size must be >= 1")
  schedule = config_lib.guidance_schedule(config)
  _check_candidates(config)
  pretrain_epochs = max(1, stage_epochs["pretrain"])
  if any(g.w_eu != 0 or g.au_exclusion
         for g in schedules.stage_guidance(schedule, "pretrain", pretrain_epochs)):
    raise errors.ConfigValueError(
        "config.guidance puts EU / AU guidance in 'pretrain', which has no uncertainty maps "
        "(pretraining uses random masking); use eu_stages / au_stages within the adaptation "
        "stages")
  return RunSettings(
      seed=int(config.seed), stages=stages, stage_epochs=stage_epochs,
      parallel=str(config.parallel), optimizer=optimizer, step=step_settings(config),
      data=DataSettings(batch_size=int(config.batch_size), prefetch=int(config.data.prefetch)),
      checkpoint=checkpoint_settings(config.checkpoint),
      schedule=schedule, refresh_epochs=int(config.uncertainty.refresh_epochs),
      log_every_steps=int(config.log_every_steps),
      debug_stop_after_steps=int(config.debug_stop_after_steps),
      fingerprint=fingerprint(shape_fields(config)),
      validation=validation_settings(config),
      tensorboard=bool(config.get("tensorboard", True)))


def _check_candidates(config: Any) -> None:
  c = config.candidates
  residual = c.get("residual")
  if residual not in anomaly.RESIDUALS:
    # No silent default: a config without the key would otherwise train on another map.
    raise errors.ConfigValueError(f"config.candidates.residual must be one of "
                                  f"{anomaly.RESIDUALS}, got {residual!r}")
  try:
    candidates.check_params(c.percentile, c.min_size, c.top_k)
  except (TypeError, ValueError) as e:
    raise errors.ConfigValueError(f"config.candidates: {e}") from e
  # The evaluation's postprocessing uses the same operator: a run whose checkpoints could never
  # be evaluated is refused before it trains.
  post = config.get("postprocess")
  if post is not None:
    try:
      candidates.check_params(post.percentile, post.min_size, post.top_k)
    except (TypeError, ValueError) as e:
      raise errors.ConfigValueError(f"config.postprocess: {e}") from e


def checkpoint_settings(checkpoint: Any) -> CheckpointSettings:
  """`config.checkpoint` (`keep_every_steps` absent in configs recorded before it: 0).

  Raises:
    ConfigValueError: a negative `keep_every_steps`, or one that the periodic saves miss.
  """
  settings = CheckpointSettings(every_steps=int(checkpoint.every_steps),
                                max_to_keep=checkpoint.max_to_keep,
                                keep_every_steps=int(checkpoint.get("keep_every_steps") or 0))
  if settings.keep_every_steps < 0:
    raise errors.ConfigValueError("config.checkpoint.keep_every_steps must be >= 0")
  if settings.keep_every_steps and (settings.every_steps <= 0
                                    or settings.keep_every_steps % settings.every_steps):
    # Kept checkpoints are chosen among the saved ones: keeping every 300 steps of saves made
    # every 200 would keep only each 600th.
    raise errors.ConfigValueError(
        f"config.checkpoint.keep_every_steps={settings.keep_every_steps} must be a multiple of "
        f"config.checkpoint.every_steps={settings.every_steps} (> 0): only saved steps are kept")
  return settings


def _section_get(config: Any, section: str, key: str) -> Any:
  """`config.<section>.<key>`, None when either is absent (configs recorded before it)."""
  part = config.get(section) if hasattr(config, "get") else None
  return part.get(key) if part is not None and hasattr(part, "get") else None


def validation_settings(config: Any) -> validation_lib.ValidationSettings:
  """`config.validation` (absent in configs recorded before it existed: off)."""
  v = config.get("validation") if hasattr(config, "get") else None
  if v is None:
    return validation_lib.ValidationSettings()
  settings = validation_lib.ValidationSettings(
      every_steps=int(v.every_steps), data_dir=str(v.data_dir or ""),
      num_subjects=int(v.num_subjects), subjects=tuple(str(x) for x in (v.subjects or ())),
      max_slices=int(v.max_slices),
      num_samples=int(v.num_samples), figures=bool(v.figures),
      panel_slices=int(v.get("panel_slices", validation_lib.PANEL_SLICES)),
      panel_residual=str(_section_get(config, "evaluation", "residual")
                         or anomaly.DEFAULT_RESIDUAL))
  if settings.panel_residual not in anomaly.RESIDUALS:
    raise errors.ConfigValueError(f"config.evaluation.residual must be one of "
                                  f"{anomaly.RESIDUALS}, got {settings.panel_residual!r}")
  for name in ("every_steps", "num_subjects", "panel_slices"):
    if getattr(settings, name) < 0:
      raise errors.ConfigValueError(f"config.validation.{name} must be >= 0")
  for name in ("max_slices", "num_samples"):
    if getattr(settings, name) < 1:
      raise errors.ConfigValueError(f"config.validation.{name} must be >= 1")
  return settings


def optimizer_settings(optim: Any) -> state_lib.OptimizerSettings:
  """`config.optim` -> OptimizerSettings (a config recorded before schedule / warmup_epochs /
  restart existed means the step decay, no warmup, restart per stage).

  Raises:
    ConfigValueError: an unknown schedule or restart.
  """
  values = dict(lr=float(optim.lr), b1=float(optim.b1), b2=float(optim.b2),
                decay_every_epochs=int(optim.decay_every_epochs),
                decay_factor=float(optim.decay_factor),
                schedule=str(optim.get("schedule") or "step"),
                warmup_epochs=float(optim.get("warmup_epochs") or 0.0),
                restart=str(optim.get("restart") or "stage"))
  try:
    return state_lib.OptimizerSettings(**values)
  except ValueError as e:  # the message starts with the field, `optim.<name>`
    raise errors.ConfigValueError(f"config.{e}") from e


def step_settings(config: Any, guided: bool = False) -> step_lib.StepSettings:
  """The step's static settings of `config` (masking ratio, patch size, loss weights, whether
  the step augments its examples, context band; the band's lengths are set per stage from its
  cohort)."""
  return step_lib.StepSettings(
      patch_size=int(config.data.patch_size), ratio=float(config.masking.ratio),
      image_weight=float(config.loss.image_weight), edge_weight=float(config.loss.edge_weight),
      structure_weight=bool(config.loss.structure_weight), guided=bool(guided),
      augment=bool(config.data.augment), context_patches=step_lib.context_patches(config))


def model_overrides(config: Any) -> dict[str, Any]:
  """`config.model.overrides` without unset (None) fields; `dtype` as a numpy dtype."""
  overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
  if "dtype" in overrides:
    overrides["dtype"] = state_lib.resolve_compute_dtype(overrides["dtype"])
  return overrides


def build_model(config: Any) -> vit_mae.MaskedAutoencoderViT:
  """The model of `config`: the variant's transformer at the data's image and patch size.

  With `attention` 'auto' (the default) the platform's fused kernel is checked here, once per
  process, for the model's shapes, and replaced by 'dot_product' (one warning line) if it does
  not compile or run (`vit_mae.with_checked_attention`): a run never dies on it hours in.
  """
  model = vit_mae.build_model(config.model.variant, image_size=int(config.data.image_size),
                              patch_size=int(config.data.patch_size), **model_overrides(config))
  return vit_mae.with_checked_attention(model)


def _get(config: Any, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part] if isinstance(value, dict) else getattr(value, part)
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return value


def shape_fields(config: Any) -> dict[str, Any]:
  """The shape-relevant part of a config (ConfigDict or dict) as `{dotted name: value}`, JSON
  normalised (tuples as lists, keys sorted)."""
  return {name: json.loads(json.dumps(_get(config, name), sort_keys=True, default=str))
          for name in SHAPE_FIELDS}


def fingerprint(fields: dict[str, Any]) -> str:
  """Short hash of `shape_fields(...)`; equal fingerprints = interchangeable parameters."""
  text = json.dumps(fields, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
