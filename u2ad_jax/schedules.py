"""Uncertainty-weighting schedules: which guidance is active when, and how strong.

A schedule is chosen by name from the config (`config.guidance`) and maps the training position
`(stage, progress)` to a `Guidance(w_eu, tau, au_exclusion)`:
- `w_eu`: weight of the EU term in the masking logits `w_eu * u_norm / tau` (0 = random masking),
- `tau`: its temperature,
- `au_exclusion`: whether AU candidate patches are kept visible.

Stages are 'pretrain', 'adapt_eu', 'adapt_eu_au'; `progress` in [0, 1] is the position inside the
current stage. Every schedule takes `eu_stages` / `au_stages` (the stages that use EU guidance /
AU exclusion), so the ablations are configs:
  baseline: eu_stages=(), au_stages=()
  eu:       eu_stages=('adapt_eu', 'adapt_eu_au'), au_stages=()
  au:       eu_stages=(), au_stages=('adapt_eu_au',)
  eu_au:    the defaults (the paper).

A new schedule is a new function decorated with `@register("name")`: keyword-only parameters with
defaults, returning `fn(stage, progress) -> Guidance`.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple, Sequence

STAGES = ("pretrain", "adapt_eu", "adapt_eu_au")
DEFAULT_EU_STAGES = ("adapt_eu", "adapt_eu_au")
DEFAULT_AU_STAGES = ("adapt_eu_au",)


class Guidance(NamedTuple):
  """Masking guidance at one point of training (python values; fed to the step as scalars)."""
  w_eu: float
  tau: float
  au_exclusion: bool


ScheduleFn = Callable[[str, float], Guidance]
_REGISTRY: dict[str, Callable[..., ScheduleFn]] = {}


def register(name: str):
  """Decorator registering a schedule factory under `name`."""
  def wrap(factory: Callable[..., ScheduleFn]) -> Callable[..., ScheduleFn]:
    if name in _REGISTRY:
      raise ValueError(f"schedule {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory
  return wrap


def available() -> tuple[str, ...]:
  """Names of the registered schedules."""
  return tuple(sorted(_REGISTRY))


def get_schedule(name: str, **params) -> ScheduleFn:
  """Builds the schedule `name` with `params` (validated against the factory's keywords).

  Raises:
    ValueError: unknown name, unknown parameter, or an invalid parameter value.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown guidance schedule {name!r}; available: {', '.join(available())}")
  factory = _REGISTRY[name]
  accepted = [p for p in inspect.signature(factory).parameters]
  unknown = sorted(set(params) - set(accepted))
  if unknown:
    raise ValueError(f"schedule {name!r} got unknown parameter(s) {unknown}; "
                     f"accepted: {accepted}")
  return factory(**params)


# ---------------------------------------------------------------------------------------------
# Validation helpers.


def stage_tuple(stages: Sequence[str] | str | None, what: str) -> tuple[str, ...]:
  """Normalises a stage list; a string may hold comma-separated names (command-line friendly)."""
  if stages is None:
    return ()
  if isinstance(stages, str):
    stages = [s.strip() for s in stages.split(",") if s.strip()]
  stages = tuple(stages)
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise ValueError(f"{what} has unknown stage(s) {bad}; stages are {STAGES}")
  return stages


def _positive(value: float, what: str) -> float:
  value = float(value)
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{what} must be a finite positive number, got {value}")
  return value


def _weight(value: float, what: str) -> float:
  """A guidance weight: finite and >= 0 (a negative w_eu inverts EU guidance, masking the
  patches the model is SURE about: the original release's defect, never a setting)."""
  value = float(value)
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"{what} must be a finite number >= 0, got {value}")
  return value


def _check_position(stage: str, progress: float) -> float:
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
  progress = float(progress)
  # Tolerate float round-off from step / total computations, nothing more.
  if not -1e-6 <= progress <= 1.0 + 1e-6:
    raise ValueError(f"progress must be in [0, 1], got {progress}")
  return min(max(progress, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------
# Schedules.


@register("piecewise")
def piecewise(*, w_eu: float = 1.0, tau: float = 1.0,
              eu_stages: Sequence[str] | str = DEFAULT_EU_STAGES,
              au_stages: Sequence[str] | str = DEFAULT_AU_STAGES) -> ScheduleFn:
  """The paper's stages: constant `w_eu`, `tau` in the EU stages, AU exclusion in the AU stages.

  Outside `eu_stages` the weight is 0 (random masking); `tau` is reported unchanged.
  """
  w_eu = _weight(w_eu, "w_eu")
  tau = _positive(tau, "tau")
  eu_stages = stage_tuple(eu_stages, "eu_stages")
  au_stages = stage_tuple(au_stages, "au_stages")

  def schedule(stage: str, progress: float) -> Guidance:
    _check_position(stage, progress)
    return Guidance(w_eu=w_eu if stage in eu_stages else 0.0, tau=tau,
                    au_exclusion=stage in au_stages)
  return schedule


def _ramp(shape: Callable[[float], float], *, w_eu: float, w_eu_start: float, tau: float,
          tau_start: float | None, eu_stages, au_stages, ramp_stages,
          ramp_lengths) -> ScheduleFn:
  """Shared ramp: `w_eu_start -> w_eu` (and `tau_start -> tau`) across `ramp_stages`.

  The ramp position `t` in [0, 1] runs through `ramp_stages` in training order, each stage taking
  a share of the ramp proportional to `ramp_lengths` (e.g. their epochs; default equal); `shape`
  maps `t` to the interpolation weight. Before the ramp stages the start values hold, after them
  the end values. Outside `eu_stages`, w_eu = 0.
  """
  w_eu = _weight(w_eu, "w_eu")
  w_eu_start = _weight(w_eu_start, "w_eu_start")
  tau = _positive(tau, "tau")
  tau_start = tau if tau_start is None else _positive(tau_start, "tau_start")
  eu_stages = stage_tuple(eu_stages, "eu_stages")
  au_stages = stage_tuple(au_stages, "au_stages")
  ramp_stages = eu_stages if ramp_stages is None else stage_tuple(ramp_stages, "ramp_stages")
  # Training order, whatever order the config listed them in.
  ramp_stages = tuple(s for s in STAGES if s in ramp_stages)
  if ramp_lengths is None:
    lengths = [1.0] * len(ramp_stages)
  else:
    lengths = [float(x) for x in ramp_lengths]
    if len(lengths) != len(ramp_stages):
      raise ValueError(f"ramp_lengths {tuple(lengths)} must give one length per ramp stage "
                       f"{ramp_stages}")
    if any(not (math.isfinite(x) and x > 0) for x in lengths):
      raise ValueError(f"ramp_lengths must be finite and positive, got {tuple(lengths)}")
  total = sum(lengths)
  begin = {}
  acc = 0.0
  for stage, length in zip(ramp_stages, lengths):
    begin[stage] = acc
    acc += length
  share = dict(zip(ramp_stages, lengths))

  def position(stage: str, progress: float) -> float:
    if not ramp_stages:
      return 1.0
    if stage in begin:
      return (begin[stage] + progress * share[stage]) / total
    first = STAGES.index(ramp_stages[0])
    return 0.0 if STAGES.index(stage) < first else 1.0

  def schedule(stage: str, progress: float) -> Guidance:
    progress = _check_position(stage, progress)
    a = min(max(shape(position(stage, progress)), 0.0), 1.0)
    # This form returns the end points exactly at a = 0 and a = 1.
    w = (1.0 - a) * w_eu_start + a * w_eu
    t = (1.0 - a) * tau_start + a * tau
    return Guidance(w_eu=w if stage in eu_stages else 0.0, tau=t,
                    au_exclusion=stage in au_stages)
  return schedule


@register("linear")
def linear(*, w_eu: float = 1.0, w_eu_start: float = 0.0, tau: float = 1.0,
           tau_start: float | None = None,
           eu_stages: Sequence[str] | str = DEFAULT_EU_STAGES,
           au_stages: Sequence[str] | str = DEFAULT_AU_STAGES,
           ramp_stages: Sequence[str] | str | None = None,
           ramp_lengths: Sequence[float] | None = None) -> ScheduleFn:
  """Linear ramp of `w_eu` from `w_eu_start` to `w_eu` over `ramp_stages` (default: eu_stages).

  `tau_start=None` keeps `tau` fixed; otherwise it ramps from `tau_start` to `tau` with the same
  shape. `ramp_lengths` gives the relative durations of the ramp stages (e.g. their epochs).
  """
  return _ramp(lambda t: t, w_eu=w_eu, w_eu_start=w_eu_start, tau=tau, tau_start=tau_start,
               eu_stages=eu_stages, au_stages=au_stages, ramp_stages=ramp_stages,
               ramp_lengths=ramp_lengths)


@register("cosine")
def cosine(*, w_eu: float = 1.0, w_eu_start: float = 0.0, tau: float = 1.0,
           tau_start: float | None = None,
           eu_stages: Sequence[str] | str = DEFAULT_EU_STAGES,
           au_stages: Sequence[str] | str = DEFAULT_AU_STAGES,
           ramp_stages: Sequence[str] | str | None = None,
           ramp_lengths: Sequence[float] | None = None) -> ScheduleFn:
  """Half-cosine ramp `(1 - cos(pi t)) / 2` (flat at both ends); parameters as `linear`."""
  return _ramp(lambda t: 0.5 * (1.0 - math.cos(math.pi * t)), w_eu=w_eu,
               w_eu_start=w_eu_start, tau=tau, tau_start=tau_start, eu_stages=eu_stages,
               au_stages=au_stages, ramp_stages=ramp_stages, ramp_lengths=ramp_lengths)
