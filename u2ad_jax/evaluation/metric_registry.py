"""Evaluator metrics by name, and the levels (patient, segment, pixel) each is reported at.

`analysis.compute_metrics` asks `level_metrics` for each level; every metric registered for that
level adds its entries to the level's section of metrics.json, in registration order. A metric is
a function `(scores, flags, truth) -> {key: value}`: `scores` real-valued (higher = more
anomalous), `flags` the unsupervised threshold's decisions (None at pixel level, where nothing
is decided), `truth` bool, all of one shape. Adding a metric is its function (in `metrics.py`, or
a module of its own) plus ONE line in `METRICS`; a metric in a module of its own is registered by
its import path, `"name": (levels, "package.module:function")`, imported when first used.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from u2ad_jax.evaluation import metrics

LEVELS = ("patient", "segment", "pixel")
MetricFn = Callable[[np.ndarray, "np.ndarray | None", np.ndarray], dict[str, float]]


def _decision(scores: np.ndarray, flags: np.ndarray | None,
              truth: np.ndarray) -> dict[str, float]:
  del scores  # the decision is made; only its agreement with the truth counts
  return metrics.binary_metrics(flags, truth)


def _ranking(scores: np.ndarray, flags: np.ndarray | None,
             truth: np.ndarray) -> dict[str, float]:
  del flags  # threshold-free
  return metrics.ranking_metrics(scores, truth)


def _best_dice(scores: np.ndarray, flags: np.ndarray | None,
               truth: np.ndarray) -> dict[str, float]:
  del flags  # the best threshold is searched, not the decided one
  value, threshold = metrics.best_dice(scores, truth)
  return {"best_dice": value, "best_dice_threshold": threshold}


# name -> (levels it is reported at, function or its "module:function" path).
METRICS: dict[str, tuple[tuple[str, ...], "MetricFn | str"]] = {
    "decision": (("patient", "segment"), _decision),    # precision, recall, specificity, F1, ...
    "ranking": (("patient", "segment", "pixel"), _ranking),  # AUROC, AP, class counts
    "best_dice": (("pixel",), _best_dice),
}


def _resolve(fn: "MetricFn | str") -> MetricFn:
  if isinstance(fn, str):
    module, name = fn.split(":")
    return getattr(importlib.import_module(module), name)
  return fn


def level_metrics(level: str, scores: np.ndarray, truth: np.ndarray,
                  flags: np.ndarray | None = None) -> dict[str, float]:
  """Every metric registered for `level`, merged in registration order.

  Args:
    level: one of LEVELS.
    scores: `[N]` float scores; truth: `[N]` bool; flags: `[N]` bool decisions (patient and
      segment levels) or None (pixel level).
  """
  if level not in LEVELS:
    raise ValueError(f"unknown metric level {level!r}; expected one of {LEVELS}")
  out: dict[str, float] = {}
  for levels, fn in METRICS.values():
    if level in levels:
      out.update(_resolve(fn)(scores, flags, truth))
  return out
