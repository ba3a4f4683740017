"""End-to-end workflows behind `u2ad demo`, `u2ad ablate` and `u2ad study` (importable; the
commands only parse flags). Configs come from the config files (`config_files.load`:
configs/cpu.py by default, configs/smoke.py at test size).

  demo.py   phantom cohorts -> pretrain -> EU / EU+AU adaptation -> both rungs -> report.md.
  ablate.py one shared pretraining, the four adaptation rungs, the ladder's comparison table.
  study.py  the ladder over N cohorts, with hierarchical-bootstrap intervals.
"""
