"""Test-session setup. Fake CPU devices must be requested before jax initialises."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# The real sample slices live beside the repository in this workplace only; tests that need
# them skip elsewhere (the data must never be committed).
SAMPLES_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "u2ad-samples"


@pytest.fixture(scope="session")
def samples_dir():
  if not SAMPLES_DIR.is_dir():
    pytest.skip("real sample slices (../shared/data/u2ad-samples) not available")
  return SAMPLES_DIR
