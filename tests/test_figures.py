"""Figures: the slice panel shows the canal close up beside the whole slice."""

import numpy as np

from u2ad_jax.data import levels as levels_lib
from u2ad_jax.evaluation import figures


def _levels():
  rows = np.linspace(20.0, 110.0, 7)
  return levels_lib.VertebralLevels(centroid_rows=rows, centroid_cols=np.full(7, 40.0),
                                    reference_slice=0, num_bodies=7, method="count")


def _capture(monkeypatch):
  shown = {}

  def save(fig, path):
    shown["axes"] = [(ax.get_title(), [im.get_array().shape for im in ax.get_images()])
                     for ax in fig.axes]

  monkeypatch.setattr(figures, "_save", save)
  return shown


def test_slice_panel_adds_the_canal_close_up_where_the_model_reconstructs(monkeypatch, tmp_path):
  shown = _capture(monkeypatch)
  rng = np.random.default_rng(0)
  image = rng.random((128, 96)).astype(np.float32)
  eu = np.zeros_like(image)
  eu[30:90, 50:62] = 0.01  # the ROI patches the Monte-Carlo passes disagree on
  figures.slice_panels(tmp_path / "a.png", image, np.zeros_like(image), _levels(),
                       recon=image * 0.9, eu=eu, title="t")
  titles = [t for t, _ in shown["axes"]]
  assert titles == ["image", "mean reconstruction", "epistemic uncertainty",
                    "postprocessed anomaly", "canal: image", "canal: reconstruction"]
  # The box of EU > 0 plus a 6-pixel margin, at full resolution.
  assert shown["axes"][-1][1] == [(60 + 12, 12 + 12)]
  assert shown["axes"][-2][1] == [(72, 24)]

  # Without a reconstruction (the intensity rung) or with no EU, no close-up.
  figures.slice_panels(tmp_path / "b.png", image, np.zeros_like(image), _levels(), title="t")
  assert [t for t, _ in shown["axes"]] == ["image", "postprocessed anomaly"]
  figures.slice_panels(tmp_path / "c.png", image, np.zeros_like(image), _levels(),
                       recon=image, eu=np.zeros_like(image), title="t")
  assert "canal: image" not in [t for t, _ in shown["axes"]]
