"""Anomaly maps inside the scoring ROI, and their postprocessing.

The anomaly map of a slice (`u2ad_jax.anomaly`: by default the hyperintense part of the residual
x - mean of K masked reconstructions, centred per subject) is restricted to the scoring ROI (cord,
eroded once). Postprocessing is the AU-candidate operator of
`u2ad_jax.candidates` with the evaluation's own parameters (config.postprocess): keep the pixels
at or above a percentile of the slice's non-zero values, group them into 8-connected components,
drop components smaller than `min_size` and keep the `top_k` strongest (all when None; 0 is
rejected, as everywhere `top_k` is read: `u2ad_jax.candidates`). The
postprocessed map holds the anomaly values inside the kept components and 0 elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from u2ad_jax import candidates
from u2ad_jax import errors


@dataclasses.dataclass(frozen=True)
class PostprocessParams:
  """Percentile threshold and component filter (see the module docstring)."""
  percentile: float = 90.0
  min_size: int = 2
  top_k: int | None = None

  @classmethod
  def from_config(cls, cfg: Any | None) -> "PostprocessParams":
    """From `config.postprocess` (missing fields keep the defaults above, which are those of
    configs/base.py; top_k None = keep all).

    Raises:
      ConfigValueError: a value `candidates.kept_components` would reject (names the key).
    """
    if cfg is None:
      return cls()
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    values = {"percentile": get("percentile", cls.percentile),
              "min_size": get("min_size", cls.min_size), "top_k": get("top_k", cls.top_k)}
    try:
      candidates.check_params(**values)
    except (TypeError, ValueError) as e:
      raise errors.ConfigValueError(f"config.postprocess: {e}") from e
    top_k = values["top_k"]
    return cls(percentile=float(values["percentile"]), min_size=int(values["min_size"]),
               top_k=None if top_k is None else int(top_k))


def restrict_to_roi(maps: np.ndarray, roi: np.ndarray) -> np.ndarray:
  """`[S, H, W]` map, `[S, H, W]` bool ROI -> float32 map, 0 outside the ROI."""
  maps = np.asarray(maps, dtype=np.float32)
  return np.where(np.asarray(roi, dtype=bool), maps, np.float32(0.0))


def postprocess(maps: np.ndarray, roi: np.ndarray,
                params: PostprocessParams = PostprocessParams()) -> np.ndarray:
  """`[S, H, W]` anomaly maps -> `[S, H, W]` float32 postprocessed maps (slice by slice)."""
  maps = np.asarray(maps, dtype=np.float32)
  roi = np.asarray(roi, dtype=bool)
  if maps.shape != roi.shape or maps.ndim != 3:
    raise ValueError(f"maps {maps.shape} and roi {roi.shape} must be the same [S, H, W]")
  out = np.zeros_like(maps)
  for i in range(maps.shape[0]):
    out[i] = candidates.threshold_components(maps[i], roi[i], params.percentile, params.min_size,
                                             params.top_k)
  return out
