"""Validation while training: how well the model reconstructs held-out NORMAL anatomy.

U2AD rests on one premise, that the masked autoencoder reconstructs normal cord; a model that
in-paints a flat grey band makes every later detection number meaningless. So a fixed set of
normal slices that the run never trains on is scored every `validation.every_steps` global steps
and at the end of every stage:

  val_loss   the training loss (10 x image + edge over the masked ROI patches) under masks drawn
             once from the run's seed, so successive values differ only by the parameters;
  val_ssim, val_psnr, val_corr
             the Monte-Carlo mean reconstruction (K = `validation.num_samples` per ROI patch, the
             evaluation's MC path) on normal cord (`recon_quality.normal_cord_quality`).

The slices: every slice with cord of `validation.data_dir` when set (e.g. a held-out healthy
cohort), else the slices of `validation.num_subjects` subjects of the public cohort, chosen by
the run's seed and removed from pretraining (`split_public`); at most `validation.max_slices`
of them (largest cord first). Their subject ids are recorded in the run's config.json.

Cost is bounded: one loss call and one MC call over at most `max_slices` slices; the record
gives its wall time, and the run's training CPU / wall time without validation
(`train_cpu_s`, `train_wall_s`: the x axis of the learning-curve benchmark).

The TensorBoard panel (`Validator.panel`, at every map refresh and stage end): input, MC mean
reconstruction, EU and anomaly map of `validation.panel_slices` of the slices, spread evenly over
the set and fixed for the run, under MC masks fixed for the run (so successive panels differ by
the parameters only). Its anomaly map is the evaluation's (`anomaly.anomaly_maps` with
`config.evaluation.residual`), centred on the panel's own slices of each subject rather than the
subject's whole scan. One more MC call over at most `panel_slices` slices, counted in the
validation time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from u2ad_jax import anomaly
from u2ad_jax import losses
from u2ad_jax import masking
from u2ad_jax import mc_maps
from u2ad_jax import parallel
from u2ad_jax import recon_quality
from u2ad_jax.data import sliceset
from u2ad_jax.train import step as step_lib


# fold_in tag of the validation masks in the run's root key (the trainer's tags are 0-2); the
# mean reconstructions use VALIDATION_TAG + 1, the panel's MC VALIDATION_TAG + 2.
VALIDATION_TAG = 3
# Slices in the TensorBoard panel (`config.validation.panel_slices`).
PANEL_SLICES = 4


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
  """`config.validation`, resolved.

  Attributes:
    every_steps: validate every this many global steps (and at each stage end); 0 = off.
    data_dir: a cohort of normal slices to validate on; '' = hold out public subjects.
    num_subjects: public subjects held out of pretraining when `data_dir` is ''.
    subjects: those subjects, when chosen by the user ((): chosen by the seed).
    max_slices: at most this many slices (largest scoring ROI first).
    num_samples: K of the Monte-Carlo mean reconstruction.
    figures: also write `validation/step_XXXXXXX.png` (inputs over reconstructions).
    panel_slices: slices of the TensorBoard panel (`Validator.panel`); 0 = no panel.
    panel_residual: the panel's anomaly map (`anomaly.RESIDUALS`; the evaluation's).
  """
  every_steps: int = 0
  data_dir: str = ""
  num_subjects: int = 2
  subjects: tuple[str, ...] = ()
  max_slices: int = 16
  num_samples: int = 2
  figures: bool = False
  panel_slices: int = PANEL_SLICES
  panel_residual: str = anomaly.DEFAULT_RESIDUAL

  @property
  def enabled(self) -> bool:
    return self.every_steps > 0


def process_cpu_seconds() -> float:
  """CPU time (user + system, all threads) of this process so far."""
  times = os.times()
  return times.user + times.system


def held_out_subjects(subjects: list[str], num: int, seed: int) -> list[str]:
  """`num` subject ids of `subjects` chosen by `seed` (sorted; all but one at most, so that
  pretraining keeps data)."""
  num = min(int(num), len(subjects) - 1)
  if num <= 0:
    return []
  rng = np.random.default_rng([int(seed), VALIDATION_TAG])
  return sorted(rng.choice(sorted(subjects), size=num, replace=False).tolist())


def split_public(public: sliceset.SliceSet, subjects: list[str]
                 ) -> tuple[sliceset.SliceSet, sliceset.SliceSet]:
  """(training slices without `subjects`, the slices of `subjects`)."""
  held = np.isin(np.asarray(public.subject_ids, dtype=object), list(subjects))
  return public.subset(~held), public.subset(held)


def panel_indices(num_slices: int, num_panel: int) -> np.ndarray:
  """`[min(num_panel, num_slices)]` indices spread evenly over `num_slices` (first and last
  included), increasing."""
  k = max(0, min(int(num_panel), int(num_slices)))
  if k == 0:
    return np.zeros(0, np.int64)
  return np.unique(np.round(np.linspace(0, num_slices - 1, k)).astype(np.int64))


def choose_slices(slices: sliceset.SliceSet, max_slices: int) -> sliceset.SliceSet:
  """The slices with the largest scoring ROI (most cord), at most `max_slices`, in set order;
  slices without cord are never chosen."""
  area = slices.score_roi.sum(axis=(1, 2))
  order = [i for i in np.argsort(-area, kind="stable") if area[i] > 0][:int(max_slices)]
  return slices.subset(sorted(order))


class Validator:
  """Scores parameters on a fixed set of normal slices (see the module docstring).

  Args:
    model: the flax module.
    slices: the validation slices (normal cord; lesion labels, if any, are left out).
    step: the run's step settings (patch size, ratio, loss weights, context band).
    settings: the validation settings.
    key: the run's root key (the masks are drawn from it once).
    mode, devices: the data-parallel layout of the MC maps (every process takes part).
  """

  def __init__(self, model: Any, slices: sliceset.SliceSet, step: step_lib.StepSettings,
               settings: ValidationSettings, key: jax.Array, mode: str, devices: list):
    self.slices = slices
    self.settings = settings
    self.step = step_lib.cohort_settings(step, False, slices.train_roi)
    roi_patches = jnp.asarray(sliceset.roi_patch_mask(slices.train_roi, step.patch_size))
    self.masks = masking.random_mask(jax.random.fold_in(key, VALIDATION_TAG), roi_patches,
                                     step.ratio)

    def apply_fn(params, images, plan):
      return model.apply({"params": params}, images, plan)

    self._loss = _loss_fn(model, self.step)
    self.maps = mc_maps.MonteCarloMaps(
        apply_fn, patch_size=step.patch_size, ratio=step.ratio,
        num_samples=settings.num_samples, slices_per_device=1, mode=mode, devices=devices,
        outputs=("mean",), context_patches=step.context_patches)
    self._key = jax.random.fold_in(key, VALIDATION_TAG + 1)
    self.validation_cpu_s = 0.0  # CPU time spent here so far (excluded from the train time)
    self.validation_wall_s = 0.0
    self.panel_ids = panel_indices(len(slices), settings.panel_slices)
    self._panel_key = jax.random.fold_in(key, VALIDATION_TAG + 2)
    # Built once: the panel's MC compiles on the first panel, not on every one.
    self._panel_maps = mc_maps.MonteCarloMaps(
        apply_fn, patch_size=step.patch_size, ratio=step.ratio,
        num_samples=settings.num_samples, slices_per_device=1, mode=mode, devices=devices,
        outputs=("mean", "eu"), context_patches=step.context_patches) if self.panel_ids.size \
        else None

  def __call__(self, params: Any) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    """(metrics, {slice index: mean reconstruction `[H, W]`} of this process's slices).

    Collective: every process of the run must call it with the same parameters.
    """
    cpu0, wall0 = process_cpu_seconds(), time.monotonic()
    host = parallel.to_host(params)
    images = self.slices.images
    loss = float(self._loss(host, jnp.asarray(images[..., None]),
                            jnp.asarray(self.slices.train_roi), self.masks))
    ids_all, per_slice, means = [], {"ssim": [], "psnr": [], "corr": []}, {}
    for ids, maps in self.maps.local_chunks(host, self._key, images, self.slices.train_roi):
      for i, mean in zip(ids, maps["mean"]):
        quality = recon_quality.normal_cord_quality(
            images[i:i + 1], mean[None], self.slices.score_roi[i:i + 1],
            self.slices.labels[i:i + 1])
        for name in per_slice:
          per_slice[name].append(quality[name])
        means[int(i)] = mean
      ids_all.extend(int(i) for i in ids)
    gathered = self.maps.exchange(
        len(self.slices), np.asarray(ids_all, np.int64),
        {name: np.asarray(v, np.float32) for name, v in per_slice.items()})
    seconds = time.monotonic() - wall0
    self.validation_cpu_s += process_cpu_seconds() - cpu0
    self.validation_wall_s += seconds
    metrics = {"val_loss": loss, "seconds": seconds, "slices": len(self.slices)}
    for name, values in gathered.items():
      values = values[np.isfinite(values)]
      metrics[f"val_{name}"] = float(values.mean()) if values.size else float("nan")
    return metrics, means


  def panel(self, params: Any) -> dict[str, np.ndarray] | None:
    """The TensorBoard panel's maps of the slices `panel_ids` (see the module docstring), or
    None when `panel_slices` is 0.

    Collective: every process of the run must call it with the same parameters; every process
    gets the whole panel.

    Returns:
      `{'image', 'mean', 'eu', 'anomaly'}`, each `[k, H, W]` float32 (k = len(panel_ids)).
    """
    if self._panel_maps is None:
      return None
    cpu0, wall0 = process_cpu_seconds(), time.monotonic()
    ids = self.panel_ids
    images = self.slices.images[ids]
    got_ids, got = [], {"mean": [], "eu": []}
    for chunk_ids, maps in self._panel_maps.local_chunks(
        parallel.to_host(params), self._panel_key, images, self.slices.train_roi[ids]):
      got_ids.extend(int(i) for i in chunk_ids)
      for name in got:
        got[name].extend(maps[name])
    shape = images.shape[1:]
    # Panels are a few small slices: gathered whole to every process (process 0 writes them).
    gathered = self._panel_maps.exchange(
        len(ids), np.asarray(got_ids, np.int64),
        {name: np.asarray(v, np.float32).reshape((-1,) + shape) for name, v in got.items()})
    score_roi = self.slices.score_roi[ids]
    subjects = [self.slices.subject_ids[i] for i in ids]
    out = {"image": images.astype(np.float32), "mean": gathered["mean"], "eu": gathered["eu"],
           "anomaly": anomaly.anomaly_maps(images, gathered["mean"], score_roi, subjects,
                                           self.settings.panel_residual)}
    self.validation_cpu_s += process_cpu_seconds() - cpu0
    self.validation_wall_s += time.monotonic() - wall0
    return out


@functools.lru_cache(maxsize=8)
def _loss_fn(model: Any, step: step_lib.StepSettings):
  """The training loss of a batch under given masks (jitted; cached per model and settings)."""

  def loss(params, images, train_roi, mask):
    plan = step_lib.make_step_plan(mask, train_roi, step)
    recon, edge, _ = model.apply({"params": params}, images, plan)
    total, _ = losses.reconstruction_loss(
        recon, edge, images, train_roi, mask, step.patch_size, image_weight=step.image_weight,
        edge_weight=step.edge_weight, use_structure_weight=step.structure_weight)
    return total

  return jax.jit(loss)


def write_figure(path: str, images: np.ndarray, means: dict[int, np.ndarray],
                 score_roi: np.ndarray, title: str, max_slices: int = 4) -> None:
  """Inputs (top row) over their mean reconstructions (bottom row), cropped to the cord's
  columns with a margin, for up to `max_slices` slices; atomic PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from u2ad_jax import io_utils  # pylint: disable=g-import-not-at-top

  chosen = sorted(means)[:max_slices]
  if not chosen:
    return
  fig, axes = plt.subplots(2, len(chosen), figsize=(2.2 * len(chosen), 5.2), squeeze=False)
  for col, i in enumerate(chosen):
    columns = np.flatnonzero(score_roi[i].any(axis=0))
    w = images.shape[2]
    lo, hi = (max(0, columns.min() - w // 8), min(w, columns.max() + w // 8 + 1)) \
        if columns.size else (0, w)
    for row, picture in enumerate((images[i], means[i])):
      ax = axes[row, col]
      ax.imshow(picture[:, lo:hi], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, col].set_title(f"slice {i}", fontsize=8)
  axes[0, 0].set_ylabel("input", fontsize=8)
  axes[1, 0].set_ylabel("mean reconstruction", fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.subplots_adjust(left=0.06, right=0.99, bottom=0.02, top=0.9, wspace=0.05, hspace=0.05)
  with io_utils.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=80, format="png")
  plt.close(fig)
