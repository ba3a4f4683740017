"""Packaging: everything is declared in setup.cfg except the one mapping setup.cfg cannot express.

The config files live in `configs/` at the top of the checkout (so `--config configs/cpu.py`
works there) and are installed as the package `u2ad_jax.configs`, so that `u2ad demo` finds
them after a plain (non-editable) `pip install .` (u2ad_jax/config_files.py looks in both).
"""

import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=["u2ad_jax", "u2ad_jax.*"]) + ["u2ad_jax.configs"],
    package_dir={"u2ad_jax.configs": "configs"},
)
