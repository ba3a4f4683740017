"""The per-device train step: masks drawn inside, masked ROI reconstruction loss, Adam update.

ONE body, written with named-axis collectives over `parallel.AXIS`, wrapped by
`parallel.DataParallel` as `jax.pmap` (state broadcast, out_axes=None, donated) or
`jax.jit(jax.shard_map(...))`. Every output is reduced inside the step, so it leaves unstacked.

Inputs. The examples come either from a device-resident cohort (`cohort`: every slice's image
and train ROI, replicated on each device; the batch then holds only the slice `index` of each
row), which is what the trainer feeds, or as host images in the batch (tests, benchmarks).
With `settings.augment` the step augments them itself (`data/augment.py`, the law of
`pipeline.augment_batch`), so the host does no per-pixel work and never bounds the step.

Randomness. The step key is `fold_in(key, state.step)`: reproducible from (seed, step), so a
resumed run draws the same masks and the same augmentation. Each example then folds in its
position in the GLOBAL batch, `axis_index * b + i` (the mesh slot of the device, whose rows the
pipeline builds from the same slot, `parallel.mesh_positions`, so the index is right wherever a
process's devices sit in the mesh): examples on different devices (and different examples on
one device) get different masks, as with the usual `fold_in(step_key, axis_index)`, but the draw
does not depend on how the global batch is split, so 1 device, 2 devices and 2 processes train
identically.

Loss reduction. `losses.reconstruction_loss` is a pooled mean over the masked patches of its
batch. To get the pooled mean over the GLOBAL batch whatever the split, each device scales its
loss by `n_d / mean_d(n_d)` (n_d = its valid masked patches) before the gradient `pmean`:
`pmean(grad(loss_d * n_d / mean(n))) = grad(sum_d loss_d * n_d / sum_d n_d)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from u2ad_jax import errors
from u2ad_jax import losses
from u2ad_jax import masking
from u2ad_jax import parallel
from u2ad_jax import patches
from u2ad_jax.data import augment
from u2ad_jax.data import sliceset
from u2ad_jax.train import state as state_lib


AXIS = parallel.AXIS


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the step (hashable; part of the compiled function).

  Attributes:
    patch_size: p.
    ratio: masking ratio of the ROI patches.
    image_weight, edge_weight, structure_weight: loss settings (`config.loss`).
    guided: False = random ROI masking (pretraining); True = `masking.guided_mask` with the
      batch's per-patch EU and AU-candidate exclusion, weighted by the step's `guidance`.
    augment: brightness / contrast / noise on the examples, inside the step (`data/augment.py`).
    context_patches: None = the model sees the whole image (the paper); r >= 0 = only the
      ROI patches and their neighbours within r patches (`masking.context_band`).
    num_keep, num_active: the band plan's static encoder / decoder lengths
      (`masking.band_lengths` of the stage's cohort); None without a band.
  """
  patch_size: int
  ratio: float
  image_weight: float = 10.0
  edge_weight: float = 1.0
  structure_weight: bool = True
  guided: bool = False
  augment: bool = False
  context_patches: int | None = None
  num_keep: int | None = None
  num_active: int | None = None


def context_patches(config: Any) -> int | None:
  """`config.model.context_patches`: None (the whole image; also for configs recorded before
  the field existed) or the context radius in patches (>= 0)."""
  value = config.model.get("context_patches") if hasattr(config.model, "get") else None
  if value is None:
    return None
  if isinstance(value, bool) or int(value) != value or int(value) < 0:
    raise errors.ConfigValueError(
        f"config.model.context_patches must be None or a count >= 0, got {value!r}")
  return int(value)


def guidance_arrays(w_eu: float = 0.0, tau: float = 1.0,
                    au_exclusion: bool = False) -> dict[str, jax.Array]:
  """The step's `guidance` argument: traced scalars, so schedule changes never recompile."""
  return {"w_eu": jnp.asarray(w_eu, jnp.float32), "tau": jnp.asarray(tau, jnp.float32),
          "au_exclusion": jnp.asarray(bool(au_exclusion))}


def draw_masks(key: jax.Array, batch: dict[str, jax.Array], guidance: dict[str, jax.Array],
               settings: StepSettings, first_example: jax.Array) -> jax.Array:
  """This device's masks `[b, N]` bool.

  Args:
    key: the step key (`fold_in(run_key, step)`).
    batch: this device's rows: train_roi `[b, H, W]` bool, and when guided patch_eu / exclude
      (see `train_step`).
    guidance: `guidance_arrays(...)`.
    settings: static settings.
    first_example: position of this device's first row in the global batch.
  """
  b = batch["train_roi"].shape[0]
  roi_patches = patches.patch_any(batch["train_roi"], settings.patch_size)  # [b, N]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_example + jnp.arange(b))
  if not settings.guided:
    def one(k, roi):
      return masking.random_mask(k, roi[None], settings.ratio)[0]
    return jax.vmap(one)(keys, roi_patches)
  # AU exclusion is switched by the schedule at run time (a traced bool), not by recompiling.
  exclude = batch["exclude"] & guidance["au_exclusion"]

  def one_guided(k, roi, u, ex):
    return masking.guided_mask(k, roi[None], settings.ratio, u[None], guidance["w_eu"],
                               guidance["tau"], ex[None])[0]
  return jax.vmap(one_guided)(keys, roi_patches, batch["patch_eu"], exclude)


def cohort_settings(step: StepSettings, guided: bool, train_roi: np.ndarray) -> StepSettings:
  """The step settings for training on slices with train ROIs `[S, H, W]`: the masking policy,
  and with a context band the static lengths that fit every slice (one compilation for them)."""
  step = dataclasses.replace(step, guided=guided)
  if step.context_patches is None:
    return step
  roi_patches = sliceset.roi_patch_mask(train_roi, step.patch_size)
  grid = patches.grid_shape(train_roi.shape[1:], step.patch_size)
  # Guided masking may mask fewer than the exact count (AU exclusion): the encoder then keeps
  # every active slot.
  num_keep, num_active = masking.band_lengths(roi_patches, grid, step.context_patches,
                                              step.ratio, exact_count=not guided)
  return dataclasses.replace(step, num_keep=num_keep, num_active=num_active)


def make_step_plan(mask: jax.Array, train_roi: jax.Array, settings: StepSettings
                   ) -> masking.MaskPlan:
  """The model's plan for masks `[b, N]` of images with train ROIs `[b, H, W]`: every patch, or
  the context band around the ROI (`settings.context_patches`) at the static lengths."""
  if settings.context_patches is None:
    return masking.make_plan(mask)
  grid = patches.grid_shape(train_roi.shape[1:], settings.patch_size)
  active = masking.context_band(patches.patch_any(train_roi, settings.patch_size), grid,
                                settings.context_patches)
  return masking.make_plan(mask, settings.num_keep, active=active,
                           num_active=settings.num_active)


def examples(batch: dict[str, jax.Array], cohort: dict[str, jax.Array] | None,
             step_key: jax.Array, settings: StepSettings, first_example: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """This device's images `[b, H, W, 1]` float32 and train ROIs `[b, H, W]` bool.

  From `batch['image']` / `batch['train_roi']` when the batch carries them, else gathered from
  the device-resident `cohort` by `batch['index']` (padding rows, index -1, get a zero image and
  an empty ROI, as the host pipeline pads). With `settings.augment` the valid rows are augmented
  with the keys of their global positions (`augment.example_keys`); padding rows stay zero.
  """
  valid = batch["valid"]
  if "image" in batch:
    images, roi = batch["image"][..., 0], batch["train_roi"]
  else:
    index = batch["index"]
    safe = jnp.clip(index, 0, cohort["images"].shape[0] - 1)
    images = jnp.where(valid[:, None, None], cohort["images"][safe], 0.0)
    roi = cohort["train_roi"][safe] & valid[:, None, None]
  if settings.augment:
    positions = first_example + jnp.arange(valid.shape[0])
    augmented = augment.augment(augment.example_keys(step_key, positions), images, roi)
    images = jnp.where(valid[:, None, None], augmented, images)
  return images[..., None].astype(jnp.float32), roi


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], key: jax.Array,
               guidance: dict[str, jax.Array], cohort: dict[str, jax.Array] | None = None, *,
               apply_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
               settings: StepSettings) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step on this device's rows of the global batch (run under `AXIS`).

  Args:
    state: the replicated TrainState (donated by the wrappers).
    batch: this device's rows: valid `[b]` bool (False rows are padding and weigh 0) and either
      index `[b]` int32 (the rows' slices in `cohort`, -1 = padding) or the examples themselves,
      image `[b, H, W, 1]` float32 and train_roi `[b, H, W]` bool; when `settings.guided`:
      patch_eu `[b, N]` float32 (per-patch EU of each example) and exclude `[b, N]` bool (its
      AU-candidate patches).
    key: the run's training key (replicated); combined with `state.step` inside.
    guidance: `guidance_arrays(w_eu, tau, au_exclusion)` (replicated).
    cohort: the replicated training slices, images `[S, H, W]` float32 and train_roi
      `[S, H, W]` bool (`device_cohort`); None when the batch carries its images.
    apply_fn: `model.apply`.
    optimizer: the stage's optimizer (static).
    settings: static step settings.

  Returns:
    (new state, metrics): every metric is reduced over the devices (scalars): loss, image, edge
    (pooled over the global batch), grad_norm, update_norm, param_norm, lr (the rate applied),
    masked_patches and examples (global counts).
  """
  b = batch["valid"].shape[0]
  device = jax.lax.axis_index(AXIS)
  step_key = jax.random.fold_in(key, state.step)
  images, train_roi = examples(batch, cohort, step_key, settings, device * b)
  mask = draw_masks(step_key, {**batch, "train_roi": train_roi}, guidance, settings, device * b)
  plan = make_step_plan(mask, train_roi, settings)

  example_weight = batch["valid"].astype(jnp.float32)
  local_count = (mask.astype(jnp.float32) * example_weight[:, None]).sum()
  mean_count = jax.lax.pmean(local_count, AXIS)
  # Share of this device in the global pooled mean (0 when nothing is masked anywhere).
  share = jnp.where(mean_count > 0, local_count / jnp.where(mean_count > 0, mean_count, 1.0), 0.0)

  def loss_fn(params):
    recon, edge, _ = apply_fn({"params": params}, images, plan)
    total, terms = losses.reconstruction_loss(
        recon, edge, images, train_roi, mask, settings.patch_size,
        image_weight=settings.image_weight, edge_weight=settings.edge_weight,
        use_structure_weight=settings.structure_weight, example_weight=example_weight)
    return total * share, terms

  # Differentiate w.r.t. a device-varying copy of the (replicated) parameters: under
  # shard_map's type system the gradient of an invariant input comes back already summed over
  # the axis, under pmap it does not. Varying in both, the explicit pmean is the one reduction.
  local_params = jax.lax.pcast(state.params, AXIS, to="varying")
  (scaled_loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state)

  metrics = {
      "loss": jax.lax.pmean(scaled_loss, AXIS),
      "image": jax.lax.pmean(terms["image"] * share, AXIS),
      "edge": jax.lax.pmean(terms["edge"] * share, AXIS),
      "grad_norm": optax.tree.norm(grads),
      "update_norm": optax.tree.norm(updates),
      "param_norm": optax.tree.norm(params),
      "masked_patches": jax.lax.psum(local_count, AXIS),
      "examples": jax.lax.psum(example_weight.sum(), AXIS),
  }
  lr = state_lib.current_learning_rate(new_state)
  if lr is not None:
    metrics["lr"] = jnp.asarray(lr, jnp.float32)
  return new_state, metrics


def make_train_step(model: Any, optimizer: optax.GradientTransformation, settings: StepSettings,
                    mode: str, devices=None) -> parallel.DataParallel:
  """The wrapped step: `fn(state, batch [D_local, b, ...] host arrays, key, guidance, cohort)`,
  with `cohort` from `device_cohort` (or None when the batch carries its images).

  Args:
    model: the flax module (hashable).
    optimizer: the stage's optimizer, the one the state was created with
      (`state.make_optimizer`, which returns one object per settings).
    settings: static step settings.
    mode: 'pmap' or 'shard_map'.
    devices: devices of all processes (default all).

  Wrappers are cached on these (hashable) arguments, so a process that trains several times
  with the same settings (resume tests, notebooks, the ablation ladder) traces and compiles
  each step once.
  """
  devices = tuple(jax.devices() if devices is None else devices)
  return _cached_train_step(model, optimizer, settings, mode, devices)


@functools.lru_cache(maxsize=16)
def _cached_train_step(model, optimizer: optax.GradientTransformation, settings: StepSettings,
                       mode: str, devices: tuple) -> parallel.DataParallel:
  body = functools.partial(train_step, apply_fn=model.apply, optimizer=optimizer,
                           settings=settings)
  return parallel.DataParallel(body, mode, num_args=5, sharded=(1,), donate=(0,),
                               devices=list(devices))


def device_cohort(step: parallel.DataParallel, images: Any, train_roi: Any
                  ) -> dict[str, jax.Array]:
  """The training slices, images `[S, H, W]` float32 and train ROIs `[S, H, W]` bool, placed
  once on every device as the step's replicated `cohort` argument (never donated).

  A few thousand paper-size slices are ~1.3 GB per device at float32; every process passes the
  same slices (the whole cohort is loaded in each)."""
  return step.replicate({"images": np.asarray(images, np.float32),
                         "train_roi": np.asarray(train_roi, bool)})
