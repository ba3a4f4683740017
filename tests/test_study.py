"""`u2ad study` smoke: one real-anatomy ladder at the smoke size, then the multi-cohort summary.

One seed is trained (tiny model, one adaptation rung) and also scored with the method's own
|x - mean| map; a second cohort is the first's per-patient tables copied under another seed, which
exercises the resume path and the over-cohort statistics without a second training run.
"""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from u2ad_jax import config_files
from u2ad_jax import errors
from u2ad_jax.data import cohort
from u2ad_jax.evaluation import stats
from u2ad_jax.phantom import cohort_writer
from u2ad_jax.workflows import study


def _config():
  # The smoke config without pretraining: one training compile instead of two (the ladder code
  # path is the same; run_ablation skips the shared pretraining when the stages do not list it).
  config = config_files.load("smoke.py")
  config.stages = ("adapt_eu_au",)
  return config


def test_study_smoke(tmp_path):
  source = tmp_path / "source"
  cohort_writer.write_cohort(source, 2, "clinical", seed=11, lesion_fraction=0.0, num_slices=3)
  out = tmp_path / "study"
  first = study.run_study(out, [0], source=str(source), smoke=True, config=_config(), methods=["eu_au"],
                          also_residuals=["absolute"], num_resamples=200, verbose=False)
  assert set(first["rungs"]) == {"intensity", "eu_au"}
  # Pixel metrics: one value per cohort, read from the rung's own evaluation.
  for rung in ("intensity", "eu_au"):
    evaluated = json.load(open(out / "seed-0" / "ladder" / rung / "metrics.json"))["pixel"]
    assert first["pixel"]["rungs"][rung]["pixel_ap"]["per_cohort"] == [evaluated["ap"]]
    assert first["pixel"]["rungs"][rung]["pixel_best_dice"]["mean"] == evaluated["best_dice"]
  # The same trained rung scored with the method's own |x - mean| map: evaluated again into
  # rescored/absolute/ (scoring only: same reconstructions, so the same SSIM, other scores); the
  # intensity rung is kept as the reference.
  absolute = first["rescored"]["absolute"]
  rescored = json.load(open(out / "seed-0" / "rescored" / "absolute" / "eu_au" / "metrics.json"))
  assert absolute["pixel"]["rungs"]["eu_au"]["pixel_ap"]["mean"] == rescored["pixel"]["ap"]
  assert absolute["rungs"]["intensity"] == first["rungs"]["intensity"]
  assert absolute["rungs"]["eu_au"]["ssim_normal_cord"]["mean"] == pytest.approx(
      first["rungs"]["eu_au"]["ssim_normal_cord"]["mean"], abs=1e-6)
  default_scores = json.load(open(out / "seed-0" / study.TABLES_FILE))["rungs"]["eu_au"]
  absolute_scores = json.load(open(out / "seed-0" / "tables-absolute.json"))["rungs"]["eu_au"]
  assert absolute_scores["patient_scores"] != default_scores["patient_scores"]
  assert rescored["info"]["anomaly_map"].startswith("anomaly = |x - mean")
  assert first["num_cohorts"] == 1 and first["patients_per_cohort"] == [5]
  tables = json.load(open(out / "seed-0" / study.TABLES_FILE))
  truth = cohort.read_participants(out / "seed-0" / "data" / "real")
  assert [truth[s]["has_lesion"] for s in tables["subject_ids"]] == [
      int(v) for v in tables["rungs"]["eu_au"]["patient_truth"]]
  assert sum(tables["rungs"]["eu_au"]["ssim_count"]) > 0  # reconstructions were scored
  assert sum(tables["rungs"]["intensity"]["ssim_count"]) == 0

  # A second cohort (the same tables under seed 7): nothing is trained, the statistics cover both.
  os.makedirs(out / "seed-7")
  for name in (study.TABLES_FILE, "tables-absolute.json"):
    shutil.copy(out / "seed-0" / name, out / "seed-7" / name)
  summary = study.run_study(out, [0, 7], source=str(source), smoke=True, config=_config(), methods=["eu_au"],
                            also_residuals=["absolute"], num_resamples=200, verbose=False)
  assert not os.path.exists(out / "seed-7" / "ladder")
  assert os.path.isfile(out / "seed-0" / "ladder" / "comparison.md")
  # A folder that is not a study is never written into.
  foreign = tmp_path / "notes"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(errors.InputError, match="not an output of `u2ad study`"):
    study.run_study(foreign, [0], source=str(source), smoke=True, config=_config(),
                    methods=["eu_au"], num_resamples=200, verbose=False)
  assert os.listdir(foreign) == ["notes.txt"]
  assert summary["num_cohorts"] == 2 and summary["seeds"] == [0, 7]
  for rung, by_metric in summary["rungs"].items():
    for name, e in by_metric.items():
      assert len(e["per_cohort"]) == 2 and e["per_cohort"][0] == e["per_cohort"][1]
      assert e["mean"] == first["rungs"][rung][name]["mean"]
      if np.isfinite(e["lo"]):
        assert e["lo"] - 1e-12 <= e["mean"] <= e["hi"] + 1e-12
  assert "ssim_normal_cord" in summary["rungs"]["eu_au"]
  assert "ssim_normal_cord" not in summary["rungs"]["intensity"]
  assert list(summary["differences"]) == ["eu_au - intensity"]
  diff = summary["differences"]["eu_au - intensity"]["patient_auroc"]
  rungs = summary["rungs"]
  assert diff["mean"] == pytest.approx(rungs["eu_au"]["patient_auroc"]["mean"]
                                       - rungs["intensity"]["patient_auroc"]["mean"])

  pixel_diff = summary["pixel"]["differences"]["eu_au - intensity"]["pixel_ap"]
  assert pixel_diff["per_cohort"][0] == pytest.approx(
      summary["pixel"]["rungs"]["eu_au"]["pixel_ap"]["per_cohort"][0]
      - summary["pixel"]["rungs"]["intensity"]["pixel_ap"]["per_cohort"][0])
  assert summary["rescored"]["absolute"]["num_cohorts"] == 2

  md = open(out / "study.md").read()
  assert "(e) EU + AU (U2AD)" in md and "eu_au - intensity" in md and "[" in md
  assert "pixel AP" in md and "scored with another map: absolute" in md
  rows = list(csv.DictReader(open(out / "study.csv")))
  assert {(r["map"], r["kind"], r["rung"]) for r in rows} == {
      (m, k, r) for m in ("centered_positive", "absolute")
      for k, r in (("rung", "intensity"), ("rung", "eu_au"), ("difference", "eu_au - intensity"))}
  assert {r["metric"] for r in rows} == {*stats.METRICS, *stats.PIXEL_METRICS}
  saved = json.load(open(out / "study.json"))  # standard JSON (no NaN)
  assert saved["seeds"] == [0, 7]
  assert os.path.getsize(out / "figures" / "study_ladder.png") > 1000
