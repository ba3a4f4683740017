"""The train state and the optimizer.

The state is a small pytree `(step, params, opt_state)`; the optimizer itself is static (bound
into the step with `functools.partial`), so the state can be broadcast to devices, donated,
saved by Orbax and compared between runs as plain arrays.

`step` counts optimizer steps over the WHOLE run (all stages). It drives the per-step randomness
(`fold_in(key, step)`), so a resumed run draws exactly the masks an uninterrupted run draws. The
learning-rate schedule has its own counter inside `opt_state`, which starts at 0 whenever a new
optimizer state is created (see `trainer`: at every stage, or only at the start of adaptation).
"""

from __future__ import annotations

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


def learning_rate_schedule(optim_cfg: Any, steps_per_epoch: int) -> optax.Schedule:
  """Step decay: `lr * decay_factor ** floor(count / (decay_every_epochs * steps_per_epoch))`.

  Args:
    optim_cfg: `config.optim` (lr, decay_every_epochs, decay_factor).
    steps_per_epoch: optimizer steps per epoch of the stage's data (>= 1).
  """
  steps_per_epoch = max(1, int(steps_per_epoch))
  every = int(optim_cfg.decay_every_epochs)
  if every <= 0:  # no decay
    return optax.constant_schedule(float(optim_cfg.lr))
  return optax.exponential_decay(init_value=float(optim_cfg.lr),
                                 transition_steps=every * steps_per_epoch,
                                 decay_rate=float(optim_cfg.decay_factor), staircase=True)


def make_optimizer(optim_cfg: Any, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam(b1, b2) with the step-decay schedule.

  `inject_hyperparams` records the learning rate applied at each update in the state
  (`opt_state.hyperparams['learning_rate']`), so the step can report it; the update itself is
  the same as `optax.adam(schedule, b1, b2)`. The state's structure does not depend on
  `steps_per_epoch`, so any value builds a valid restore target.
  """
  schedule = learning_rate_schedule(optim_cfg, steps_per_epoch)
  return optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=float(optim_cfg.b1),
                                              b2=float(optim_cfg.b2))


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


def model_overrides(config: Any) -> dict[str, Any]:
  """`config.model.overrides` without unset (None) fields; `dtype` as a numpy dtype."""
  overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  return overrides


def build_model(config: Any) -> vit_mae.MaskedAutoencoderViT:
  """The model of `config`: the variant's transformer at the data's image and patch size."""
  return vit_mae.build_model(config.model.variant, image_size=int(config.data.image_size),
                             patch_size=int(config.data.patch_size), **model_overrides(config))


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
