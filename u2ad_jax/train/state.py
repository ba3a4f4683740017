"""The train state, the optimizer and fresh parameters.

The state is a small pytree `(step, params, opt_state)`; the optimizer itself is static (bound
into the step with `functools.partial`), so the state can be broadcast to devices, donated,
saved by Orbax and compared between runs as plain arrays.

`step` counts optimizer steps over the WHOLE run (all stages). It drives the per-step randomness
(`fold_in(key, step)`), so a resumed run draws exactly the masks an uninterrupted run draws. The
learning-rate schedule has its own counter inside `opt_state`, which starts at 0 whenever a new
optimizer state is created (`OptimizerSettings.restart`: at every stage, or only at the start of
adaptation).

Nothing here reads the config: `train/settings.py` resolves it into `OptimizerSettings` and the
model once, at the trainer's door.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from u2ad_jax import masking
from u2ad_jax.models import vit_mae


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, optimizer steps taken since the start of the run (all stages).
    params: model parameters (flax `params` collection).
    opt_state: optax state of `make_optimizer(...)`; its internal count is the schedule position.
  """
  step: jax.Array
  params: Any
  opt_state: Any


# The learning-rate decays and the points where a new optimizer state starts (see
# `OptimizerSettings`).
LR_SCHEDULES = ("step", "cosine", "cosine_stage")
RESTARTS = ("stage", "adaptation")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """The optimizer of a run (hashable: it keys the cached optimizer and train step).

  Attributes:
    lr: peak learning rate.
    b1, b2: Adam's moment decays.
    decay_every_epochs: the decay's unit in epochs of the stage's data (<= 0: constant lr).
    decay_factor: lr x this per unit ('step'), or the cosine's final fraction ('cosine').
    schedule: 'step' (the paper: lr x decay_factor every decay_every_epochs), 'cosine' (lr ->
      lr x decay_factor over decay_every_epochs, then flat) or 'cosine_stage' (lr ->
      lr x decay_factor over the whole stage, whatever its length; decay_every_epochs unused).
    warmup_epochs: a linear warmup before either decay (fractional allowed; 0 = none).
    restart: when a new optimizer state (moments and schedule counter) starts: 'stage' = at
      every stage; 'adaptation' = only where pretraining hands over to adaptation.
  """
  lr: float
  b1: float
  b2: float
  decay_every_epochs: int
  decay_factor: float
  schedule: str = "step"
  warmup_epochs: float = 0.0
  restart: str = "stage"

  def __post_init__(self):
    if self.schedule not in LR_SCHEDULES:
      raise ValueError(f"optim.schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
    if self.restart not in RESTARTS:
      raise ValueError(f"optim.restart must be one of {RESTARTS}, got {self.restart!r}")


def learning_rate_schedule(optim: OptimizerSettings, steps_per_epoch: int,
                           stage_epochs: int = 0) -> optax.Schedule:
  """The learning rate per optimizer step of a stage (the count restarts with the optimizer).

  `optim.schedule`:
    'step':   `lr * decay_factor ** floor(count / (decay_every_epochs * steps_per_epoch))`
              (the paper's step decay; decay_every_epochs <= 0 = constant lr).
    'cosine': cosine decay from `lr` to `lr * decay_factor` over `decay_every_epochs` epochs,
              then constant at `lr * decay_factor` (decay_every_epochs <= 0 = constant lr).
    'cosine_stage': cosine decay from `lr` to `lr * decay_factor` over the stage's
              `stage_epochs` (after the warmup): one shape whatever a stage's length.
  `optim.warmup_epochs`: a linear warmup from 0 to `lr` over this many epochs precedes either
  decay; the decay's epochs count from the end of the warmup.

  Args:
    optim: the optimizer settings.
    steps_per_epoch: optimizer steps per epoch of the stage's data (>= 1).
    stage_epochs: the stage's epochs ('cosine_stage' only; <= 0 = constant lr).
  """
  steps_per_epoch = max(1, int(steps_per_epoch))
  lr = float(optim.lr)
  every = int(optim.decay_every_epochs)
  factor = float(optim.decay_factor)
  warmup_steps = int(round(float(optim.warmup_epochs) * steps_per_epoch))
  if optim.schedule == "cosine_stage":
    decay_steps = int(stage_epochs) * steps_per_epoch - warmup_steps
    decay = (optax.cosine_decay_schedule(init_value=lr, decay_steps=decay_steps, alpha=factor)
             if decay_steps > 0 else optax.constant_schedule(lr))
  elif every <= 0:  # no decay
    decay = optax.constant_schedule(lr)
  elif optim.schedule == "step":
    decay = optax.exponential_decay(init_value=lr, transition_steps=every * steps_per_epoch,
                                    decay_rate=factor, staircase=True)
  else:
    decay = optax.cosine_decay_schedule(init_value=lr, decay_steps=every * steps_per_epoch,
                                        alpha=factor)
  if warmup_steps <= 0:
    return decay
  # Starts at lr / warmup_steps (not 0) so the first update is not wasted.
  warmup = optax.linear_schedule(init_value=lr / (warmup_steps + 1), end_value=lr,
                                 transition_steps=warmup_steps)
  return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


@functools.lru_cache(maxsize=32)
def make_optimizer(optim: OptimizerSettings, steps_per_epoch: int,
                   stage_epochs: int = 0) -> optax.GradientTransformation:
  """Adam(b1, b2) with `learning_rate_schedule` (step or cosine decay, optional warmup).

  `inject_hyperparams` records the learning rate applied at each update in the state
  (`opt_state.hyperparams['learning_rate']`), so the step can report it; the update itself is
  the same as `optax.adam(schedule, b1, b2)`. The state's structure does not depend on
  `steps_per_epoch`, so any value builds a valid restore target.

  Cached: the same settings give the SAME optimizer object, the one the trainer initialises the
  state with and the one the train step (cached on it) updates with.
  """
  schedule = learning_rate_schedule(optim, steps_per_epoch, stage_epochs)
  return optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=float(optim.b1),
                                              b2=float(optim.b2))


def create_state(params: Any, optimizer: optax.GradientTransformation,
                 step: int | jax.Array = 0) -> TrainState:
  """A fresh optimizer state for `params`, at global step `step`."""
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def current_learning_rate(state: TrainState) -> jax.Array | None:
  """Learning rate used by the last update (the schedule's initial value before any step);
  None for an optimizer without injected hyperparameters (e.g. a plain optax.sgd in tests)."""
  hyperparams = getattr(state.opt_state, "hyperparams", None)
  if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
    return None
  return hyperparams["learning_rate"]


# Compute dtype of `dtype='auto'`: bfloat16 where the matrix units run it natively (GPU tensor
# cores, TPU MXUs), float32 on CPU, where bfloat16 matmuls are emulated and slower.
AUTO_COMPUTE_DTYPE = {"gpu": jnp.bfloat16, "tpu": jnp.bfloat16}


def resolve_compute_dtype(name: str, platform: str | None = None) -> jnp.dtype:
  """'auto' -> the compute dtype for `platform` (default: JAX's default backend); any other
  name (e.g. 'float32', 'bfloat16') as given. Parameters and optimizer state stay float32."""
  if name == "auto":
    return jnp.dtype(AUTO_COMPUTE_DTYPE.get(platform or jax.default_backend(), jnp.float32))
  return jnp.dtype(name)


def init_params(model: vit_mae.MaskedAutoencoderViT, key: jax.Array) -> Any:
  """Fresh parameters (flax `params` collection) of `model`."""
  images = jnp.zeros((1, model.image_size, model.image_size, 1), jnp.float32)
  plan = masking.make_plan(jnp.zeros((1, model.num_patches), bool))
  return _jitted_init(model)(key, images, plan)["params"]


@functools.lru_cache(maxsize=8)
def _jitted_init(model: vit_mae.MaskedAutoencoderViT):
  # jit: one compilation instead of op-by-op dispatch of every initializer; cached per model
  # (modules hash by their fields) so repeated runs in one process compile once.
  return jax.jit(model.init)
