"""Test setup: 4 fake CPU devices (must happen before JAX initialises its backend) and fixture paths."""
import os
import pathlib

# XLA's CPU convolutions go through YNNPACK by default, whose backward passes lose precision on some
# shapes: two gradients of the reference fixture came out ~1e-3 off with it and 4e-6 off with XLA's Eigen
# convolutions. Parity is checked on the exact path (see README, Parity).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                                   "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "reference"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {FIXTURES} (expected ../shared beside the checkout)")
    return FIXTURES
