"""Rung name -> rung class: the one list of the ways an anomaly map can be made.

The `u2ad evaluate` command and the ladder look rungs up here by name. A new rung is one module
in this package with a class that has a `name` and `maps(prepared, settings) -> base.RungMaps`
(see `base.py`), plus its line below.
"""

from __future__ import annotations

from u2ad_jax import errors
from u2ad_jax.evaluation.rungs import intensity
from u2ad_jax.evaluation.rungs import model

RUNGS = {
    "intensity": intensity.IntensityRung,
    "model": model.ModelRung,
}


def get(name: str) -> type:
  """The rung class registered as `name`.

  Raises:
    UsageError: no rung of that name (the message lists the known ones).
  """
  if name not in RUNGS:
    raise errors.UsageError(f"unknown rung {name!r}; known rungs: {sorted(RUNGS)}")
  return RUNGS[name]
