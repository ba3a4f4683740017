"""Uncertainty-weighting schedules: boundary values, monotonicity, ablations, validation."""

import numpy as np
import pytest

from u2ad_jax import schedules
from u2ad_jax import stages
from u2ad_jax.schedules import Guidance

ADAPT = ("adapt_eu", "adapt_eu_au")


def _sweep(schedule, stages=stages.STAGES, steps=41):
  """Guidance along the whole training in order: [(stage, progress, Guidance)]."""
  return [(s, p, schedule(s, p)) for s in stages for p in np.linspace(0.0, 1.0, steps)]


def test_piecewise_is_the_paper_schedule():
  sched = schedules.get_schedule("piecewise", w_eu=2.0, tau=0.5)
  for p in (0.0, 0.3, 1.0):
    assert sched("pretrain", p) == Guidance(0.0, 0.5, False)
    assert sched("adapt_eu", p) == Guidance(2.0, 0.5, False)
    assert sched("adapt_eu_au", p) == Guidance(2.0, 0.5, True)
  g = sched("adapt_eu_au", 0.5)
  assert type(g.w_eu) is float and type(g.tau) is float and type(g.au_exclusion) is bool


@pytest.mark.parametrize("name", ["piecewise", "linear", "cosine"])
@pytest.mark.parametrize("ablation,eu_stages,au_stages", [
    ("baseline", (), ()),
    ("eu", ADAPT, ()),
    ("au", (), ("adapt_eu_au",)),
    ("eu_au", ADAPT, ("adapt_eu_au",)),
])
def test_ablations_are_expressible(name, ablation, eu_stages, au_stages):
  sched = schedules.get_schedule(name, w_eu=1.5, eu_stages=eu_stages, au_stages=au_stages)
  for stage, _, g in _sweep(sched, steps=5):
    if stage not in eu_stages:
      assert g.w_eu == 0.0, (ablation, stage)
    assert g.au_exclusion == (stage in au_stages), (ablation, stage)
  if ablation == "baseline":
    assert all(g.w_eu == 0.0 and not g.au_exclusion for _, _, g in _sweep(sched, steps=5))
  if "eu" in ablation:
    assert sched("adapt_eu_au", 1.0).w_eu == 1.5  # every schedule ends at the target weight


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ramps_hit_boundaries_and_are_monotone(name):
  sched = schedules.get_schedule(name, w_eu_start=0.2, w_eu=3.0, tau=0.5, tau_start=2.0)
  assert sched("pretrain", 0.7).w_eu == 0.0
  assert sched("adapt_eu", 0.0) == Guidance(0.2, 2.0, False)
  assert sched("adapt_eu_au", 1.0) == Guidance(3.0, 0.5, True)
  # Equal shares by default: the ramp is half-way at the stage boundary.
  mid = sched("adapt_eu", 1.0)
  assert mid.w_eu == pytest.approx(1.6) and mid.tau == pytest.approx(1.25)
  assert sched("adapt_eu_au", 0.0)[:2] == mid[:2]  # weights continuous across the boundary
  ramp = [g for s, _, g in _sweep(sched, ADAPT)]
  w = np.array([g.w_eu for g in ramp])
  tau = np.array([g.tau for g in ramp])
  assert (np.diff(w) >= -1e-12).all() and w[-1] > w[0]
  assert (np.diff(tau) <= 1e-12).all() and tau[-1] < tau[0]


def test_cosine_shape_and_ramp_lengths():
  lin = schedules.get_schedule("linear", w_eu=1.0, ramp_lengths=(150, 50))
  cos = schedules.get_schedule("cosine", w_eu=1.0, ramp_lengths=(150, 50))
  # 150 of 200 epochs done at the end of adapt_eu.
  assert lin("adapt_eu", 1.0).w_eu == pytest.approx(0.75)
  assert lin("adapt_eu", 0.5).w_eu == pytest.approx(0.375)
  assert cos("adapt_eu", 1.0).w_eu == pytest.approx(0.5 * (1 - np.cos(0.75 * np.pi)))
  # Cosine is flat near the ends: below the linear ramp early, above it late.
  assert cos("adapt_eu", 0.05).w_eu < lin("adapt_eu", 0.05).w_eu
  assert cos("adapt_eu_au", 0.9).w_eu > lin("adapt_eu_au", 0.9).w_eu
  # Fixed tau when tau_start is not given.
  assert {g.tau for _, _, g in _sweep(lin)} == {1.0}


def test_ramp_over_one_stage_then_hold():
  sched = schedules.get_schedule("linear", w_eu=2.0, ramp_stages=("adapt_eu",))
  assert sched("adapt_eu", 0.0).w_eu == 0.0
  assert sched("adapt_eu", 0.5).w_eu == pytest.approx(1.0)
  assert sched("adapt_eu", 1.0).w_eu == 2.0
  assert all(sched("adapt_eu_au", p).w_eu == 2.0 for p in (0.0, 0.5, 1.0))


def test_stage_lists_from_strings():
  sched = schedules.get_schedule("piecewise", eu_stages="adapt_eu_au", au_stages="")
  assert sched("adapt_eu", 0.5).w_eu == 0.0 and sched("adapt_eu_au", 0.5).w_eu == 1.0
  assert not sched("adapt_eu_au", 0.5).au_exclusion
  sched = schedules.get_schedule("piecewise", eu_stages="adapt_eu, adapt_eu_au")
  assert sched("adapt_eu", 0.5).w_eu == 1.0


def test_validation_errors():
  with pytest.raises(ValueError, match="unknown guidance schedule 'nope'.*cosine.*linear"):
    schedules.get_schedule("nope")
  with pytest.raises(ValueError, match="unknown parameter.*w_au"):
    schedules.get_schedule("piecewise", w_au=1.0)
  with pytest.raises(ValueError, match="unknown stage"):
    schedules.get_schedule("piecewise", eu_stages=("adapt",))
  with pytest.raises(ValueError, match="tau"):
    schedules.get_schedule("linear", tau=0.0)
  # A negative weight would invert EU guidance (mask the patches the model is sure about).
  for name in ("piecewise", "linear", "cosine"):
    with pytest.raises(ValueError, match="w_eu must be a finite number >= 0"):
      schedules.get_schedule(name, w_eu=-1.0)
    with pytest.raises(ValueError, match="w_eu must be a finite number >= 0"):
      schedules.get_schedule(name, w_eu=float("nan"))
    with pytest.raises(ValueError, match="tau must be a finite positive number"):
      schedules.get_schedule(name, tau=float("inf"))
  with pytest.raises(ValueError, match="w_eu_start"):
    schedules.get_schedule("cosine", w_eu_start=-0.5)
  assert schedules.get_schedule("piecewise", w_eu=0.0)("adapt_eu", 0.0).w_eu == 0.0
  with pytest.raises(ValueError, match="ramp_lengths"):
    schedules.get_schedule("cosine", ramp_lengths=(1.0,))
  sched = schedules.get_schedule("linear")
  with pytest.raises(ValueError, match="unknown stage"):
    sched("finetune", 0.5)
  with pytest.raises(ValueError, match="progress"):
    sched("adapt_eu", 1.5)
  # Tiny round-off beyond the end is tolerated and clamped.
  assert sched("adapt_eu_au", 1.0 + 1e-9).w_eu == 1.0


def test_registering_a_new_schedule():
  @schedules.register("test_constant", schedules.Param("w_eu", "weight", 0.5))
  def constant(*, w_eu: float):
    return lambda stage, progress: Guidance(float(w_eu), 1.0, False)

  try:
    assert "test_constant" in schedules.available()
    assert schedules.get_schedule("test_constant", w_eu=0.25)("adapt_eu", 0.0).w_eu == 0.25
    with pytest.raises(ValueError, match="already registered"):
      schedules.register("test_constant")(constant)
  finally:
    schedules._REGISTRY.pop("test_constant")
