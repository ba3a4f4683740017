"""Rung name -> rung class: the one list of the ways an anomaly map can be made.

The `u2ad evaluate` command and the ladder look rungs up here by name. A new rung is one module
in this package with a class that has a `name` and `maps(prepared, settings) -> base.RungMaps`
(see `base.py`), plus its ONE line below ("name": "module:Class"). Classes are imported when
looked up, so the intensity rung never imports jax or the model.
"""

from __future__ import annotations

import importlib

from u2ad_jax import errors

RUNGS = {
    "intensity": "u2ad_jax.evaluation.rungs.intensity:IntensityRung",
    "model": "u2ad_jax.evaluation.rungs.model:ModelRung",
}


def get(name: str) -> type:
  """The rung class registered as `name`.

  Raises:
    UsageError: no rung of that name (the message lists the known ones).
  """
  if name not in RUNGS:
    raise errors.UsageError(f"unknown rung {name!r}; known rungs: {sorted(RUNGS)}")
  module, cls = RUNGS[name].split(":")
  return getattr(importlib.import_module(module), cls)
