"""Detection and evaluation: checkpoint -> anomaly maps -> scores -> decisions -> outputs.

  settings.py         the scoring settings, read once from a run's config (EvalSettings).
  rungs/              one module per rung (intensity, model), the shared driver and the registry.
  metrics.py          precision / recall / specificity / F1, AUROC (ranks), AP, best Dice, SSIM.
  metric_registry.py  which metric is reported at which level (patient, segment, pixel), by name.
  postprocess.py      anomaly map in the scoring ROI; percentile + connected-component filter.
  curves.py           the anomaly curve along the cord and its segment maxima.
  scoring.py          segment and patient scores of every subject.
  thresholds.py       the unsupervised decision threshold (median + k robust sigma, no labels).
  analysis.py         the scoring code every rung shares: maps -> scores, decisions, metrics.
  outputs.py          staged outputs: per-subject NIfTI maps and JSON sidecars, summary.json.
  figures.py, report.py  PNG figures, CSV tables, metrics JSON, the Markdown report.
  ladder.py           the comparison table of the rungs.
  stats.py            hierarchical bootstrap over cohorts and patients (`u2ad study`).
"""
