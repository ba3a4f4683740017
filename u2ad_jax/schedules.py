"""Uncertainty-weighting schedules: which guidance is active when, and how strong.

A schedule is chosen by name from the config (`config.guidance.schedule`) and maps the training
position `(stage, progress)` to a `Guidance(w_eu, tau, au_exclusion)`:
- `w_eu`: weight of the EU term in the masking logits `w_eu * u_norm / tau` (0 = random masking),
- `tau`: its temperature,
- `au_exclusion`: whether AU candidate patches are kept visible.

Stages are `stages.STAGES`; `progress` in [0, 1] is the position inside the current stage. Every
schedule takes `eu_stages` / `au_stages` (the stages that use EU guidance / AU exclusion), so the
ablations (`stages.ABLATIONS`) are configs.

The registry is the one list of schedules and of their parameters. A schedule is a factory
registered with its parameters, `@register("name", W_EU, TAU, ...)` (`Param`: name, kind,
default, config section); it receives every declared parameter, validated by its kind, as a
keyword (plus `stage_epochs`, the run's epochs per stage, if it names that keyword) and returns
`fn(stage, progress) -> Guidance`. The config's guidance block, its validation and the trainer
are all derived from these declarations (`config_lib.guidance_config` / `guidance_schedule`), so
a new schedule is one function and its registration.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from u2ad_jax import stages as stages_lib
from u2ad_jax.stages import STAGES


class Guidance(NamedTuple):
  """Masking guidance at one point of training (python values; fed to the step as scalars)."""
  w_eu: float
  tau: float
  au_exclusion: bool


ScheduleFn = Callable[[str, float], Guidance]


# ---------------------------------------------------------------------------------------------
# Parameter kinds: how a value is checked and normalised.


def _number(value: Any, what: str) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be a number, got {value!r}") from None


def _weight(value: Any, what: str) -> float:
  """A guidance weight: finite and >= 0 (a negative w_eu inverts EU guidance, masking the
  patches the model is SURE about: the original release's defect, never a setting)."""
  value = _number(value, what)
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"{what} must be a finite number >= 0, got {value}")
  return value


def _temperature(value: Any, what: str) -> float:
  """A temperature: finite and > 0 (it divides the masking logits)."""
  value = _number(value, what)
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{what} must be a finite positive number, got {value}")
  return value


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


def _lengths(value: Any, what: str) -> tuple[float, ...]:
  """Relative durations: finite and positive."""
  try:
    lengths = tuple(float(x) for x in value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be a sequence of numbers, got {value!r}") from None
  if any(not (math.isfinite(x) and x > 0) for x in lengths):
    raise ValueError(f"{what} must be finite and positive, got {lengths}")
  return lengths


# kind -> (check(value, what) -> normalised value, the config field's type)
KINDS: dict[str, tuple[Callable[[Any, str], Any], type]] = {
    "weight": (_weight, float),
    "temperature": (_temperature, float),
    "stages": (stage_tuple, tuple),
    "lengths": (_lengths, tuple),
}
# Where a parameter lives in the config's guidance block (`config.guidance.<section>.<name>`).
SECTIONS = ("params", "ramp")


@dataclasses.dataclass(frozen=True)
class Param:
  """One declared parameter of a schedule.

  Attributes:
    name: the keyword the factory receives and the config field's name.
    kind: a key of `KINDS` (validation and the config field's type).
    default: used when the parameter is not given; None = optional (the schedule decides).
    section: the config section holding it (`SECTIONS`).
  """
  name: str
  kind: str
  default: Any = None
  section: str = "params"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"parameter {self.name!r}: unknown kind {self.kind!r}; kinds: "
                       f"{sorted(KINDS)}")
    if self.section not in SECTIONS:
      raise ValueError(f"parameter {self.name!r}: unknown section {self.section!r}; sections: "
                       f"{SECTIONS}")

  def check(self, value: Any, what: str | None = None) -> Any:
    """The validated, normalised value (ValueError naming `what`, default the parameter)."""
    if value is None and self.default is None:
      return None
    return KINDS[self.kind][0](value, what or self.name)


# The parameters of the built-in schedules (a new schedule may reuse them or declare its own).
W_EU = Param("w_eu", "weight", 1.0)
TAU = Param("tau", "temperature", 1.0)
EU_STAGES = Param("eu_stages", "stages", stages_lib.ABLATIONS[stages_lib.PAPER_METHOD]["eu_stages"])
AU_STAGES = Param("au_stages", "stages", stages_lib.ABLATIONS[stages_lib.PAPER_METHOD]["au_stages"])
W_EU_START = Param("w_eu_start", "weight", 0.0, section="ramp")
TAU_START = Param("tau_start", "temperature", None, section="ramp")   # None: tau stays fixed
RAMP_STAGES = Param("ramp_stages", "stages", None, section="ramp")   # None: the eu_stages
RAMP_LENGTHS = Param("ramp_lengths", "lengths", None, section="ramp")  # None: the stages' epochs


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A registered schedule: its factory and its declared parameters."""
  name: str
  factory: Callable[..., ScheduleFn]
  params: tuple[Param, ...]
  takes_epochs: bool  # the factory names the `stage_epochs` keyword


_REGISTRY: dict[str, Schedule] = {}


def register(name: str, *params: Param):
  """Decorator registering a schedule factory under `name` with its parameters.

  A parameter name shared with another schedule must have the same kind and section (one config
  field serves both).
  """
  def wrap(factory: Callable[..., ScheduleFn]) -> Callable[..., ScheduleFn]:
    if name in _REGISTRY:
      raise ValueError(f"schedule {name!r} is already registered")
    names = [p.name for p in params]
    if len(set(names)) != len(names) or "stage_epochs" in names:
      raise ValueError(f"schedule {name!r}: parameter names must be unique and not "
                       f"'stage_epochs', got {names}")
    known = parameters()
    for p in params:
      other = known.get(p.name)
      if other is not None and (other.kind, other.section) != (p.kind, p.section):
        raise ValueError(f"schedule {name!r}: parameter {p.name!r} is a {p.kind} in section "
                         f"{p.section!r}, but a {other.kind} in {other.section!r} elsewhere")
    takes_epochs = "stage_epochs" in inspect.signature(factory).parameters
    _REGISTRY[name] = Schedule(name, factory, tuple(params), takes_epochs)
    return factory
  return wrap


def available() -> tuple[str, ...]:
  """Names of the registered schedules."""
  return tuple(sorted(_REGISTRY))


def parameters(name: str | None = None) -> dict[str, Param]:
  """The declared parameters of schedule `name`, or of all schedules (first declaration wins)."""
  if name is not None:
    return {p.name: p for p in _spec(name).params}
  found: dict[str, Param] = {}
  for schedule in _REGISTRY.values():
    for p in schedule.params:
      found.setdefault(p.name, p)
  return found


def _spec(name: str) -> Schedule:
  if name not in _REGISTRY:
    raise ValueError(f"unknown guidance schedule {name!r}; available: {', '.join(available())}")
  return _REGISTRY[name]


def get_schedule(name: str, *, stage_epochs: Mapping[str, int] | None = None,
                 **params: Any) -> ScheduleFn:
  """Builds the schedule `name` with `params`, each validated by its declaration.

  Args:
    name: a registered schedule.
    stage_epochs: the run's epochs per stage, for schedules that scale with them (the ramps'
      default `ramp_lengths`); None where unknown.
    **params: declared parameters; the missing ones take their defaults.

  Raises:
    ValueError: unknown name, unknown parameter, or an invalid parameter value.
  """
  spec = _spec(name)
  declared = {p.name: p for p in spec.params}
  unknown = sorted(set(params) - set(declared))
  if unknown:
    raise ValueError(f"schedule {name!r} got unknown parameter(s) {unknown}; "
                     f"accepted: {list(declared)}")
  values = {p.name: p.check(params.get(p.name, p.default)) for p in spec.params}
  if spec.takes_epochs:
    values["stage_epochs"] = stage_epochs
  return spec.factory(**values)


def stage_guidance(schedule: ScheduleFn, stage: str, epochs: int) -> list[Guidance]:
  """Guidance of every epoch of a stage, as the trainer applies it: evaluated once per epoch at
  `progress = epoch / max(1, epochs - 1)` (0 at the first epoch, 1 at the last)."""
  return [schedule(stage, e / max(1, epochs - 1)) for e in range(epochs)]


# ---------------------------------------------------------------------------------------------
# Schedules.


def _check_position(stage: str, progress: float) -> float:
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
  progress = float(progress)
  # Tolerate float round-off from step / total computations, nothing more.
  if not -1e-6 <= progress <= 1.0 + 1e-6:
    raise ValueError(f"progress must be in [0, 1], got {progress}")
  return min(max(progress, 0.0), 1.0)


@register("piecewise", W_EU, TAU, EU_STAGES, AU_STAGES)
def piecewise(*, w_eu: float, tau: float, eu_stages: tuple[str, ...],
              au_stages: tuple[str, ...]) -> ScheduleFn:
  """The paper's stages: constant `w_eu`, `tau` in the EU stages, AU exclusion in the AU stages.

  Outside `eu_stages` the weight is 0 (random masking); `tau` is reported unchanged.
  """
  def schedule(stage: str, progress: float) -> Guidance:
    _check_position(stage, progress)
    return Guidance(w_eu=w_eu if stage in eu_stages else 0.0, tau=tau,
                    au_exclusion=stage in au_stages)
  return schedule


def _ramp(shape: Callable[[float], float], *, w_eu: float, w_eu_start: float, tau: float,
          tau_start: float | None, eu_stages: tuple[str, ...], au_stages: tuple[str, ...],
          ramp_stages: tuple[str, ...] | None, ramp_lengths: tuple[float, ...] | None,
          stage_epochs: Mapping[str, int] | None) -> ScheduleFn:
  """Shared ramp: `w_eu_start -> w_eu` (and `tau_start -> tau`) across `ramp_stages`.

  The ramp position `t` in [0, 1] runs through `ramp_stages` in training order, each stage taking
  a share of the ramp proportional to `ramp_lengths` (default: the stages' epochs when
  `stage_epochs` is known, else equal); `shape` maps `t` to the interpolation weight. Before the
  ramp stages the start values hold, after them the end values. Outside `eu_stages`, w_eu = 0.
  """
  tau_start = tau if tau_start is None else tau_start
  ramp_stages = eu_stages if ramp_stages is None else ramp_stages
  # Training order, whatever order the config listed them in.
  ramp_stages = tuple(s for s in STAGES if s in ramp_stages)
  if ramp_lengths is not None:
    lengths = list(ramp_lengths)
    if len(lengths) != len(ramp_stages):
      raise ValueError(f"ramp_lengths {tuple(lengths)} must give one length per ramp stage "
                       f"{ramp_stages}")
  elif stage_epochs is not None:
    lengths = [float(max(1, int(stage_epochs[s]))) for s in ramp_stages]
  else:
    lengths = [1.0] * len(ramp_stages)
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


_RAMP_PARAMS = (W_EU, W_EU_START, TAU, TAU_START, EU_STAGES, AU_STAGES, RAMP_STAGES, RAMP_LENGTHS)


@register("linear", *_RAMP_PARAMS)
def linear(*, stage_epochs: Mapping[str, int] | None, **params) -> ScheduleFn:
  """Linear ramp of `w_eu` from `w_eu_start` to `w_eu` over `ramp_stages` (default: eu_stages).

  `tau_start=None` keeps `tau` fixed; otherwise it ramps from `tau_start` to `tau` with the same
  shape. `ramp_lengths` gives the relative durations of the ramp stages (default: their epochs).
  """
  return _ramp(lambda t: t, stage_epochs=stage_epochs, **params)


@register("cosine", *_RAMP_PARAMS)
def cosine(*, stage_epochs: Mapping[str, int] | None, **params) -> ScheduleFn:
  """Half-cosine ramp `(1 - cos(pi t)) / 2` (flat at both ends); parameters as `linear`."""
  return _ramp(lambda t: 0.5 * (1.0 - math.cos(math.pi * t)), stage_epochs=stage_epochs,
               **params)
