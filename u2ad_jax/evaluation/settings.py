"""Scoring settings of an evaluation, read from a run's config once.

A checkpoint fixes the model and its data geometry; how its maps are scored (residual, curve,
segment normalisation, postprocessing, threshold rule, K at evaluation) may change without
retraining. `EvalSettings.from_config` reads those sections once, over configs/base.py's defaults
(the one source of defaults, so a run recorded before a setting existed gets today's value),
refuses keys these sections do not define, and resolves what depends on other sections (the
curve window in rows from the pixel size, K from the training K): the scoring code then takes
the settings object and never reads a scoring key from the config itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from u2ad_jax import anomaly as anomaly_lib
from u2ad_jax import errors
from u2ad_jax.evaluation import curves
from u2ad_jax.evaluation import postprocess as postprocess_lib
from u2ad_jax.evaluation import scoring
from u2ad_jax.evaluation import thresholds


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Scoring settings read from `config.postprocess` and `config.evaluation`."""
  postprocess: postprocess_lib.PostprocessParams
  rule: thresholds.ThresholdRule
  reduction: str = "sum"
  residual: str = anomaly_lib.DEFAULT_RESIDUAL
  curve_window: int = 1           # rows (odd), from config.evaluation.curve_window_mm
  num_samples: int | None = None  # config.evaluation.num_samples; None = the training K
  segment_norm: str = "none"      # 'none' | 'level_z' (scoring.normalise_levels)
  # K, MC reconstructions per ROI patch at evaluation: num_samples, else the training K
  # (config.uncertainty.num_samples); None only in settings built by hand for rungs without MC.
  mc_samples: int | None = None

  @classmethod
  def from_config(cls, config: Any) -> "EvalSettings":
    """Reads the settings; a key missing from an older run's recorded config takes today's
    default from configs/base.py (the one source of defaults).

    Args:
      config: a run's config (ConfigDict or mapping) with `evaluation`, `postprocess`, `data`
        and `uncertainty` sections, each optional.

    Raises:
      ValueError: a key these sections do not define (e.g. a misspelt or retired name).
    """
    ev = _with_defaults(config, "evaluation")
    return cls(
        postprocess=postprocess_lib.PostprocessParams.from_config(
            _with_defaults(config, "postprocess")),
        rule=thresholds.ThresholdRule(name=str(ev["threshold"]), k=float(ev["mad_k"]),
                                      **({"pool": str(ev["threshold_pool"])}
                                         if ev.get("threshold_pool") is not None else {})),
        reduction=str(ev["curve_reduction"]),
        residual=str(ev["residual"]),
        curve_window=curves.window_rows(float(ev["curve_window_mm"] or 0.0), pixel_mm(config)),
        num_samples=None if ev["num_samples"] is None else int(ev["num_samples"]),
        segment_norm=str(ev["segment_norm"]),
        mc_samples=int(ev["num_samples"] if ev["num_samples"] is not None
                       else recorded(config, "uncertainty")["num_samples"]))

  def describe_curve(self) -> str:
    """How the curve is made, for reports and sidecars."""
    text = f"{self.reduction} across the cord width"
    if self.curve_window > 1:
      text += f", summed over {self.curve_window} rows along the cord"
    return text

  def describe_segments(self) -> str:
    """How segment scores are made, for reports and sidecars."""
    text = "max of the curve over the segment's rows"
    if self.segment_norm == "level_z":
      text += (", as a robust z per level: (score - median) / (1.4826 MAD) over the cohort's "
               "patients at that level")
    return text

  def __post_init__(self):
    if self.segment_norm not in scoring.SEGMENT_NORMS:
      raise ValueError(f"config.evaluation.segment_norm={self.segment_norm!r}; expected one of "
                       f"{scoring.SEGMENT_NORMS}")
    if self.residual not in anomaly_lib.RESIDUALS:
      raise ValueError(f"config.evaluation.residual={self.residual!r}; expected one of "
                       f"{anomaly_lib.RESIDUALS}")
    if self.num_samples is not None and self.num_samples < 1:
      raise ValueError(f"config.evaluation.num_samples must be >= 1, got {self.num_samples}")


def pixel_mm(config: Any) -> float:
  """Row spacing of the model frame in mm (field of view / image size)."""
  data = recorded(config, "data")
  return float(data["fov_mm"]) / float(data["image_size"])


def recorded(config: Any, name: str) -> dict[str, Any]:
  """Section `name` of `config` over configs/base.py's defaults (a plain dict)."""
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top

  return {**config_files.default_section(name), **section(config, name)}


def _with_defaults(config: Any, name: str) -> dict[str, Any]:
  """Scoring section `name` of `config` over configs/base.py's defaults; unknown keys fail."""
  known = set(SCORING_KEYS[name])
  unknown = sorted(set(section(config, name)) - known)
  if unknown:
    raise ValueError(f"config.{name} has unknown setting(s) {unknown}; known: {sorted(known)}")
  return recorded(config, name)


def section(config: Any, name: str) -> dict[str, Any]:
  """A config section as a plain dict ({} when absent)."""
  if config is None:
    return {}
  value = config.get(name) if hasattr(config, "get") else getattr(config, name, None)
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


# Config sections an evaluation may override without retraining (scoring only: the model and
# its data geometry are fixed by the checkpoint).
SCORING_KEYS = {
    "evaluation": ("threshold", "mad_k", "threshold_pool", "curve_reduction", "curve_window_mm",
                   "residual", "num_samples", "segment_norm"),
    "postprocess": ("percentile", "min_size", "top_k"),
}


def apply_scoring_overrides(config: Any, overrides: Sequence[str]) -> Any:
  """`config` with `section.key=value` overrides of its scoring settings (SCORING_KEYS) applied
  in place (`config_lib.apply_overrides`), checked by building the EvalSettings.

  Raises:
    UsageError: a malformed override, a setting outside SCORING_KEYS, or a bad value.
  """
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top

  config_lib.apply_overrides(config, overrides, allowed=SCORING_KEYS)
  try:
    EvalSettings.from_config(config)
  except (TypeError, ValueError) as e:
    raise errors.UsageError(f"overrides {list(overrides)}: {e}") from e
  return config
