"""The rungs of the comparison ladder: one module per way of making an anomaly map.

  base.py       the cohort a rung scores, what a rung returns (`RungMaps`), and the driver every
                rung shares: maps -> `analysis.analyse` -> staged outputs.
  intensity.py  rung (a): cord intensity relative to the subject's median (no learning).
  model.py      the learnt rungs: a checkpoint's Monte-Carlo reconstructions -> residual map.
  registry.py   rung name -> rung class; commands and the ladder look rungs up by name.
"""
