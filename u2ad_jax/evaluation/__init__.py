"""Detection and evaluation (method.md sections 8-9): checkpoint -> anomaly maps -> decisions.

  metrics.py          precision / recall / specificity / F1, AUROC (ranks), AP, best Dice, SSIM.
  levels.py           vertebral levels C2 ... T1 from the vertebral-body label; segment rows.
  postprocess.py      anomaly map in the scoring ROI; percentile + connected-component filter.
  curves.py           the anomaly curve along the cord and its segment maxima.
  scoring.py          segment and patient scores of every subject.
  thresholds.py       the unsupervised decision threshold (median + k robust sigma, no labels).
  analysis.py         the scoring code every rung shares: maps -> scores, decisions, metrics.
  intensity_baseline.py  rung (a): cord intensity relative to the subject's median.
  evaluator.py        `u2ad evaluate`: restore, MC maps, analysis, NIfTI / JSON / report outputs.
  figures.py, report.py  PNG figures, CSV tables, metrics JSON, the Markdown report.
  ladder.py           the comparison table of the rungs.
  workflow.py         `u2ad demo` and `u2ad ablate` end to end.
"""
