"""`benchmarks/run.py --size mu --quick --json` end to end: every field present, positive, finite."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _positive_finite(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_mu_benchmark_writes_complete_json(tmp_path):
  """Run as from a bare checkout (no PYTHONPATH, another working directory): the script finds
  the library beside it, measures THAT one, and streams a RESULT line per measurement."""
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "mu", "--quick",
       "--json", str(out), "--cache-dir", str(tmp_path / "cache")],
      capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["errors"] == [], proc.stderr[-3000:]
  assert result["size"] == "mu" and result["quick"] is True
  streamed = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
              if line.startswith("RESULT ")]
  assert [r["name"] for r in streamed][:2] == ["matmul", "flops_32px"]
  assert {r["kind"] for r in streamed} == {"matmul", "flops", "train", "mc", "attention",
                                           "input"}
  assert all(r["u2ad_jax_file"] == str(ROOT / "u2ad_jax" / "__init__.py") for r in streamed)
  assert any((tmp_path / "cache").iterdir())  # the persistent compilation cache was written
  assert 0 < result["summary"]["train_host_fraction"] < 0.5

  summary = result["summary"]
  for name in ("matmul_gflops", "train_gflop_per_image", "forward_gflop_per_image",
               "train_images_per_s", "train_mfu", "train_peak_rss_gb", "train_compile_s",
               "mc_s_per_image_k10", "mc_cpu_s_per_image_k10", "mc_floor_s_per_image_k10",
               "mc_peak_rss_gb"):
    assert _positive_finite(summary[name]), (name, summary[name])
  assert summary["mc_passes_k10"] >= 10
  for name in ("dense", "dot_product", "blockwise"):
    assert _positive_finite(summary["attention_fwd_bwd_vs_blockwise"][name]), name
  assert summary["attention_fwd_bwd_vs_blockwise"]["blockwise"] == 1.0

  scaling = result["scaling"]
  assert [r["num_samples"] for r in scaling["num_samples"]] == [2, 10]
  # More samples need more passes, hence more work per image.
  assert scaling["num_samples"][0]["passes"] < scaling["num_samples"][1]["passes"]
  for axis, metric in (("num_samples", "s_per_image"), ("train_batch", "images_per_s"),
                       ("image_size_train", "images_per_s"), ("image_size_mc", "s_per_image")):
    assert scaling[axis], axis
    for row in scaling[axis]:
      assert _positive_finite(row[metric]), (axis, row)
      assert _positive_finite(row["peak_rss_gb"]), (axis, row)
      assert _positive_finite(row["first_call_s"]), (axis, row)
  assert result["train"]["loss_finite"] is True
  assert result["machine"]["jax"]


def _benchmark_module(name):
  """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _FakeRunner:
  """Stands in for the subprocesses: canned results by spec, the specs in the order run."""
  library = str(ROOT / "u2ad_jax" / "__init__.py")

  def __init__(self, results):
    self.results, self.specs = results, []

  def __call__(self, log, cache_dir, budget_s):
    return self

  def run(self, spec, min_s=15.0):
    self.specs.append(spec)
    result = self.results(spec)
    return {"u2ad_jax_file": self.library, **result}

  def start_background(self, name, spec):
    self.specs.append(spec)

  def collect(self, name, timeout=None):
    return {"u2ad_jax_file": self.library, "train_gflop_per_image": 46.6,
            "forward_gflop_per_image": 16.2} if name == "flops" else {
                "u2ad_jax_file": self.library}


def _canned(probe_ok=True):
  oom = {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9e10 bytes",
         "error_kind": "oom"}

  def results(spec):
    if spec["kind"] == "attention_probe":
      return ({"attention": "cudnn", "agrees": True} if probe_ok else
              {"error": "NotImplementedError: no", "error_kind": "error"})
    if spec["kind"] == "train":
      batch = spec["batch"]
      return oom if batch > 1200 else {"batch": batch, "images_per_s": 3000.0,
                                       "peak_device_gb": 20.0, "device_bytes_limit_gb": 140.0}
    return {"gflops": 5e5, "s_per_image": 0.004, "passes": 14}
  return results


def test_accelerator_plan_retries_smaller_after_oom_and_rewrites_the_json(tmp_path, monkeypatch,
                                                                          capsys):
  bench = _benchmark_module("run")
  runner = _FakeRunner(_canned())
  monkeypatch.setattr(bench, "Runner", runner)
  out_path = tmp_path / "accel.json"
  writes = []
  write = bench.Recorder.write
  monkeypatch.setattr(bench.Recorder, "write",
                      lambda self: (write(self), writes.append(json.loads(out_path.read_text()))))
  out = bench.main(["--platform", "accelerator", "--json", str(out_path)])
  # Batch 256 peaks at 20 GB of 140: the guess is 0.9 * 140 / (20 / 256) -> 1536 (a multiple
  # of 256); it runs out of memory and the plan tries 0.7x of it once.
  assert [s["batch"] for s in runner.specs if s["kind"] == "train"] == [256, 1536, 1056]
  assert out["train_largest"]["batch"] == 1056
  assert [w.get("train_largest", {}).get("error_kind") for w in writes][3] == "oom"
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")]
  assert [json.loads(l[7:])["name"] for l in lines] == [
      "matmul", "attention_probe", "train_b256", "train_largest", "train_largest", "mc",
      "flops", "input", "summary"]
  assert len(writes) == len(lines)  # the JSON is rewritten after every measurement
  assert out["summary"]["train"][0]["tflop_per_s"] == pytest.approx(3000 * 46.6 / 1e3)


def test_accelerator_plan_stops_when_the_attention_probe_fails(tmp_path, monkeypatch):
  bench = _benchmark_module("run")
  runner = _FakeRunner(_canned(probe_ok=False))
  monkeypatch.setattr(bench, "Runner", runner)
  out = bench.main(["--platform", "accelerator", "--json", str(tmp_path / "a.json")])
  assert [s["kind"] for s in runner.specs if s["kind"] in ("train", "mc")] == []
  assert "--attention dot_product" in out["stopped"]
  assert json.loads((tmp_path / "a.json").read_text())["errors"] == ["/attention_probe"]


def test_measurements_run_without_nibabel_and_ml_collections(tmp_path):
  """The GPU machine's image has JAX, flax, optax, orbax and scipy but neither nibabel nor
  ml_collections: the measuring script and everything it imports must not need them. Run with
  both blocked, without PYTHONPATH, from another directory (the script's own import shim)."""
  code = ("import sys, runpy; sys.modules.update(nibabel=None, ml_collections=None); "
          "sys.argv = ['_measure.py', sys.argv[1]]; "
          f"runpy.run_path({str(ROOT / 'benchmarks' / '_measure.py')!r}, run_name='__main__')")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", code, json.dumps(
      {"kind": "input", "size": "mu", "batch": 4, "steps": 1})], capture_output=True, text=True,
      timeout=300, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert result["u2ad_jax_file"] == str(ROOT / "u2ad_jax" / "__init__.py")
  assert result["new_index_feed"]["images_per_s"] > 0


def test_out_of_memory_is_told_from_other_errors():
  bench = _benchmark_module("run")
  died = bench._result_of("", "...\njaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory", -9)
  assert died["error_kind"] == "oom"
  assert bench._result_of("", "ValueError: bad shape", 1)["error_kind"] == "error"
  reported = bench._result_of('RESULT {"error": "x", "error_kind": "oom"}\n', "", 1)
  assert reported == {"error": "x", "error_kind": "oom"}


def test_mc_with_real_model_matches_per_pass_reference():
  """The speed path of `mc_uncertainty` (passes folded into the model batch, optional chunks)
  against one plain model call per pass, with the real (mu) model in float32; bfloat16 compute
  stays close to that float32 reference."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from u2ad_jax import masking, patches, uncertainty  # pylint: disable=g-import-not-at-top
  from u2ad_jax.models import vit_mae  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  model = vit_mae.build_model("mu")
  params = state_lib.init_params(model, jax.random.key(0))
  h, p = model.image_size, model.patch_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 1, (2, h, h, 1)).astype(np.float32))
  roi = np.zeros((2, h, h), bool)
  roi[0, :, 12:20] = True
  roi[1, 4:28, 8:16] = True
  roi = jnp.asarray(roi)
  apply_fn = lambda prm, x, plan: model.apply({"params": prm}, x, plan)
  kwargs = dict(patch_size=p, ratio=0.75, num_samples=3, min_roi=4)
  key = jax.random.key(3)
  def mc_fn(apply, **kw):
    return jax.jit(functools.partial(uncertainty.mc_uncertainty, apply, **kwargs, **kw))

  out = mc_fn(apply_fn)(params, key, images, roi)
  chunked = mc_fn(apply_fn, pass_chunk=2)(params, key, images, roi)

  passes = uncertainty.num_passes(3, 0.75, model.num_patches, min_roi=4)
  masks = np.asarray(uncertainty.mc_masks(key, patches.patch_any(roi, p), 0.75, passes))
  recons, pix = [], []
  for mask in masks:
    recons.append(np.asarray(apply_fn(params, images, masking.make_plan(jnp.asarray(mask)))[0]))
    pix.append(np.asarray(patches.patch_to_pixels(jnp.asarray(mask, jnp.float32), p,
                                                  model.grid)) > 0)
  recons, pix = np.stack(recons)[..., 0].astype(np.float64), np.stack(pix)
  x = np.asarray(images)[..., 0].astype(np.float64)
  count = pix.sum(0)
  mean = np.where(count > 0, (recons * pix).sum(0) / np.maximum(count, 1), x)
  var = np.where(count > 0, (((recons - mean) ** 2) * pix).sum(0) / np.maximum(count, 1), 0.0)
  for result in (out, chunked):
    np.testing.assert_allclose(np.asarray(result["mean"]), mean, atol=2e-6)
    np.testing.assert_allclose(np.asarray(result["eu"]), var, atol=2e-6)
  assert (np.asarray(out["eu"])[count > 0] > 0).any()

  # A shorter static encoder length from the ROI sizes (every pass of image b masks the same
  # count) gives the same maps.
  num_keep = uncertainty.mc_encoder_length(roi, p, 0.75, multiple=1)
  assert num_keep < model.num_patches
  assert num_keep == model.num_patches - 9  # image 1: 12 ROI patches, 9 masked per pass
  assert uncertainty.mc_encoder_length(roi, p, 0.75, multiple=16) == 64
  short = mc_fn(apply_fn, num_keep=num_keep)(params, key, images, roi)
  for name in ("mean", "eu", "au"):
    np.testing.assert_allclose(np.asarray(short[name]), np.asarray(out[name]), atol=2e-6)
  assert uncertainty.mc_encoder_length(np.zeros_like(roi), p, 0.75) == model.num_patches

  bf16 = vit_mae.build_model("mu", dtype=jnp.bfloat16)
  out16 = mc_fn(lambda prm, x, plan: bf16.apply({"params": prm}, x, plan))(
      params, key, images, roi)
  np.testing.assert_allclose(np.asarray(out16["mean"]), mean, atol=3e-2)
  np.testing.assert_allclose(np.asarray(out16["eu"]), var, atol=3e-3)


def test_learning_curve_variant_configs_load_and_set_none(tmp_path):
  """Each variant is written as a config file of its own (flags cannot set None): it loads, and
  'before' gets the whole image back (context_patches None) while 'after' keeps the band."""
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top
  lc = _benchmark_module("learning_curve")
  configs = {}
  for name, overrides in lc.VARIANTS.items():
    path = tmp_path / f"{name}_config.py"
    path.write_text(lc.VARIANT_CONFIG.format(name=name, cpu=str(ROOT / "configs" / "cpu.py"),
                                             overrides=overrides))
    configs[name] = config_files.load(str(path))
  cpu = config_files.load(str(ROOT / "configs" / "cpu.py"))
  assert configs["before"].model.context_patches is None
  assert configs["before"].data.patch_size == 16 and configs["before"].optim.schedule == "step"
  assert configs["after"].model.context_patches == cpu.model.context_patches == 1
  assert configs["after"].stage_epochs.pretrain == 300
  assert configs["after"].data.patch_size == cpu.data.patch_size


def test_learning_curve_marks_take_the_last_validation_before_each():
  lc = _benchmark_module("learning_curve")
  assert lc.MARKS_S == (60, 150, 300, 600, 1200, 2400)
  records = [{"train_cpu_s": 70.0, "step": 1}, {"train_cpu_s": 140.0, "step": 2},
             {"train_cpu_s": 700.0, "step": 3}]
  rows = lc.at_marks(records)
  assert rows[0] is None  # no validation by 60 CPU s
  # 'ended': the run had finished before the mark, its last value carried over.
  assert [(r["step"], r["ended"]) for r in rows[1:]] == [
      (2, False), (2, False), (2, False), (3, True), (3, True)]


def test_budget_curve_scales_every_stage_and_the_refresh_and_reads_the_studies(tmp_path):
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top
  bc = _benchmark_module("budget_curve")
  cpu = config_files.load(str(ROOT / "configs" / "cpu.py"))
  assert bc.scaled_overrides(cpu, 4) == [
      f"stage_epochs.pretrain={4 * cpu.stage_epochs.pretrain}",
      f"stage_epochs.adapt_eu={4 * cpu.stage_epochs.adapt_eu}",
      f"stage_epochs.adapt_eu_au={4 * cpu.stage_epochs.adapt_eu_au}",
      f"uncertainty.refresh_epochs={4 * cpu.uncertainty.refresh_epochs}"]
  for m, shift in ((1, 0.0), (2, 0.1)):
    cell = lambda v: {"mean": v, "lo": v - 0.05, "hi": v + 0.05, "per_cohort": [v]}
    study = {"differences": {d: {"patient_auroc": cell(-0.02 + shift), "segment_f1": cell(shift)}
                             for d in ("eu_au - baseline", "eu_au - intensity")},
             "rungs": {r: {"ssim_normal_cord": cell(0.8 + shift)} for r in ("baseline", "eu_au")}}
    (tmp_path / f"x{m}").mkdir()
    (tmp_path / f"x{m}" / "study.json").write_text(json.dumps(study))
  results = bc.collect(str(tmp_path), [1, 2])
  assert [p["mean"] for p in results["curves"]["eu_au - baseline: patient_auroc"]] == \
      pytest.approx([-0.02, 0.08])
  assert results["curves"]["eu_au - intensity: segment_f1"][1] == pytest.approx(
      {"mean": 0.1, "lo": 0.05, "hi": 0.15})
  assert results["ssim_normal_cord"]["eu_au"] == pytest.approx([0.8, 0.9])
  bc.write_figure(results, str(tmp_path / "b.png"), "t")
  assert (tmp_path / "b.png").stat().st_size > 1000
