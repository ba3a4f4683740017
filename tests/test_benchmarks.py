"""`benchmarks/run.py --size mu --quick --json` end to end: every field present, positive, finite."""

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
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "mu", "--quick",
       "--json", str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["errors"] == [], proc.stderr[-3000:]
  assert result["size"] == "mu" and result["quick"] is True

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
