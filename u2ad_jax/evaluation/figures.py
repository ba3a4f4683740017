"""PNG figures of an evaluation (matplotlib, Agg backend, written atomically).

- `slice_panels`: image / mean reconstruction / EU / anomaly overlay of one slice, and the
  canal close up.
- `curve_plot`: the anomaly curve along the cord with the C2 ... T1 levels, the mean-error
  reference line and the decision threshold.
- `score_distributions`: patient and segment scores by truth, with the threshold.
- `roc_plot`: ROC curves of one or several detectors.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from u2ad_jax import io_utils  # noqa: E402
from u2ad_jax import labels as label_values  # noqa: E402
from u2ad_jax.data import levels as levels_lib  # noqa: E402
from u2ad_jax.evaluation import metrics  # noqa: E402
from u2ad_jax.evaluation import scoring  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
  with io_utils.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
  plt.close(fig)


Crop = tuple[int, int, int, int]  # (first row, end row, first column, end column), end exclusive


def slice_panels(path: str | os.PathLike, image: np.ndarray, anomaly: np.ndarray,
                 levels: levels_lib.VertebralLevels, *, recon: np.ndarray | None = None,
                 eu: np.ndarray | None = None, title: str = "",
                 peak_row: int | None = None, crop: Crop | None = None) -> None:
  """Panels of one `[H, W]` slice: image (with levels), reconstruction, EU, anomaly overlay,
  and, with a reconstruction and EU, the canal close up (image and reconstruction).

  `crop`: the model-grid box to show (the scan's field of view: a cropped scan fills a few
  tenths of the 200 mm model grid); levels and the peak row are drawn in the cropped frame.
  """
  r0, r1, c0, c1 = crop if crop is not None else (0, image.shape[0], 0, image.shape[1])

  def cut(data):
    return None if data is None else np.asarray(data)[r0:r1, c0:c1]

  image, anomaly, recon, eu = cut(image), cut(anomaly), cut(recon), cut(eu)
  panels = [("image", image, "gray")]
  if recon is not None:
    panels.append(("mean reconstruction", recon, "gray"))
  if eu is not None:
    panels.append(("epistemic uncertainty", eu, "magma"))
  # The canal at full resolution beside the whole slice: at the whole slice's scale a flat band
  # and a reconstruction of the cord look alike. Its box: where the Monte-Carlo passes
  # disagree (EU > 0), i.e. the ROI patches the model reconstructs.
  closeup = None
  if recon is not None and eu is not None and np.any(eu > 0):
    rows, cols = np.nonzero(eu > 0)
    margin = 6
    closeup = (max(0, rows.min() - margin), min(image.shape[0], rows.max() + margin + 1),
               max(0, cols.min() - margin), min(image.shape[1], cols.max() + margin + 1))
  # Panel width follows the crop's aspect, so a tall cropped scan is not squeezed.
  aspect = (r1 - r0) / max(1, c1 - c0)
  width = float(np.clip(3.2 / max(aspect, 1e-3), 1.6, 4.0))
  extra = 2 if closeup is not None else 0
  fig, axes = plt.subplots(1, len(panels) + 1 + extra,
                           figsize=(width * (len(panels) + 1) + 1.4 * extra, 3.6),
                           gridspec_kw={"width_ratios": [width] * (len(panels) + 1)
                                        + [1.4] * extra})
  axes, extra_axes = axes[:len(axes) - extra], axes[len(axes) - extra:]
  if closeup is not None:
    a0, a1, b0, b1 = closeup
    for ax, (name, data) in zip(extra_axes, (("canal: image", image),
                                             ("canal: reconstruction", recon))):
      ax.imshow(data[a0:a1, b0:b1], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
      ax.set_title(name, fontsize=8)
  for ax, (name, data, cmap) in zip(axes, panels):
    vmax = 1.0 if cmap == "gray" else max(float(np.max(data)), 1e-12)
    ax.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax)
    ax.set_title(name, fontsize=9)
  ax = axes[-1]
  ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
  shown = np.ma.masked_where(anomaly <= 0, anomaly)
  ax.imshow(shown, cmap="hot", alpha=0.8, vmin=0.0, vmax=max(float(np.max(anomaly)), 1e-12))
  ax.set_title("postprocessed anomaly", fontsize=9)
  for name, row, col in zip(label_values.VERTEBRA_NAMES, levels.centroid_rows,
                            levels.centroid_cols):
    if not (np.isfinite(row) and np.isfinite(col)):
      continue  # a level outside the field of view
    axes[0].plot(col - c0, row - r0, "c+", markersize=6)
    axes[0].text(col - c0 + 3, row - r0, name, color="c", fontsize=6, va="center")
  if peak_row is not None:
    ax.axhline(peak_row - r0, color="c", lw=0.6, ls=":")
  for a in list(axes) + list(extra_axes):
    a.set_xticks([])
    a.set_yticks([])
  fig.suptitle(title, fontsize=10)
  _save(fig, path)


def curve_plot(path: str | os.PathLike, scores: scoring.SubjectScores, threshold: float | None, *,
               truth_segments: np.ndarray | None = None, title: str = "",
               segment_flags: np.ndarray | None = None,
               rows: tuple[int, int] | None = None) -> None:
  """The subject's anomaly curve against the image row (superior left), levels, each segment's
  score (a bar across its rows, red when flagged; none for a segment out of view) and the
  threshold (None: no threshold line, e.g. when segment scores are per-level z, not curve
  units).

  `rows`: (first, end) rows to show (the scan's field of view), default the whole grid.
  """
  fig, ax = plt.subplots(figsize=(7.5, 3.0))
  all_rows = np.arange(scores.curve.shape[0])
  for curve in scores.slice_curves:
    ax.plot(all_rows, curve, color="0.75", lw=0.6)
  ax.plot(all_rows, scores.curve, color="k", lw=1.2, label="anomaly curve (max over slices)")
  ax.axhline(scores.reference, color="tab:blue", ls="--", lw=0.9, label="mean error C2..T1")
  if threshold is not None:
    ax.axhline(threshold, color="tab:red", ls="-", lw=0.9, label="threshold")
  bounds = scores.levels.segment_bounds()
  if truth_segments is not None:
    for (start, stop), positive in zip(bounds, truth_segments):
      if positive and np.isfinite(start) and np.isfinite(stop):
        ax.axvspan(start, stop, color="tab:orange", alpha=0.18, lw=0)
  # Segment scores are in curve units only without per-level normalisation.
  if not scores.level_normalised:
    flags = (np.zeros(len(bounds), bool) if segment_flags is None
             else np.asarray(segment_flags, bool))
    for k, ((start, stop), value) in enumerate(zip(bounds, scores.segment_scores)):
      if not (np.isfinite(start) and np.isfinite(stop)):
        continue
      ax.hlines(value, start, stop, colors="tab:red" if flags[k] else "tab:green", lw=2.0,
                label="segment score (red: flagged)" if k == int(np.argmax(np.isfinite(
                    scores.segment_scores))) else None)
  for name, row in zip(label_values.VERTEBRA_NAMES, scores.levels.centroid_rows):
    if not np.isfinite(row):
      continue  # out of view
    ax.axvline(row, color="0.5", lw=0.5, ls=":")
    ax.text(row, 1.0, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
            fontsize=7)
  ax.set_xlabel("image row (superior -> inferior)")
  ax.set_ylabel("anomaly")
  first, end = rows if rows is not None else (0, int(all_rows[-1]) + 1)
  ax.set_xlim(first, max(first + 1, end - 1))
  ax.legend(fontsize=7, loc="upper right")
  ax.set_title(title, fontsize=9, pad=14)
  _save(fig, path)


def score_distributions(path: str | os.PathLike, patient_scores: np.ndarray,
                        segment_scores: np.ndarray, threshold: float, *,
                        patient_truth: np.ndarray | None = None,
                        segment_truth: np.ndarray | None = None, title: str = "") -> None:
  """Strip plots of patient and segment scores, split by truth when known."""
  fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2))
  rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
  for ax, values, truth, name in ((axes[0], patient_scores, patient_truth, "patients"),
                                  (axes[1], segment_scores, segment_truth, "segments")):
    values = np.asarray(values, dtype=np.float64).ravel()
    groups = [("all", values)] if truth is None else [
        ("no lesion", values[~np.asarray(truth, bool).ravel()]),
        ("lesion", values[np.asarray(truth, bool).ravel()])]
    for x, (label, v) in enumerate(groups):
      ax.scatter(x + rng.uniform(-0.15, 0.15, v.size), v, s=12, alpha=0.7,
                 color=("tab:green", "tab:red")[x] if truth is not None else "k")
    ax.set_xticks(range(len(groups)), [f"{g} (n={v.size})" for g, v in groups], fontsize=8)
    ax.axhline(threshold, color="tab:red", lw=0.9, ls="--")
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("score")
  fig.suptitle(title, fontsize=10, y=1.03)
  _save(fig, path)


def roc_plot(path: str | os.PathLike,
             series: Mapping[str, tuple[np.ndarray, np.ndarray]] | Sequence, *,
             title: str = "") -> None:
  """ROC curves. `series`: name -> (scores, truth), or a list of panels, each (panel title,
  {name: (scores, truth)})."""
  panels = [(title, series)] if isinstance(series, Mapping) else list(series)
  fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
  for ax, (panel_title, named) in zip(axes[0], panels):
    for name, (scores, truth) in named.items():
      truth = np.asarray(truth, bool).ravel()
      if truth.all() or not truth.any():
        continue
      fpr, tpr, _ = metrics.roc_curve(np.asarray(scores).ravel(), truth)
      auc = metrics.roc_auc(np.asarray(scores).ravel(), truth)
      ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(panel_title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
  _save(fig, path)
