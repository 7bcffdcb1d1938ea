"""Test setup: 4 fake CPU devices (must happen before JAX initialises its backend) and fixture paths."""
import os
import pathlib

# XLA's CPU backend hands convolutions and reductions to YNNPACK by default, and both lose precision in
# some backward passes: two gradients of the reference fixture came out 4e-4 .. 9e-4 off with either of
# them (YNNPACK's reductions do it on AMD Zen 4, its convolutions on the Intel machines measured before)
# and 4e-6 off without them. Parity is checked on the exact path (see README, Parity).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                                   "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# Outputs of the original PyTorch code, kept in the repository (tests/fixtures/README.md says how each was made).
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def pytest_configure(config):
    """One persistent compilation cache for the session: the many small training runs of the tests compile
    the same programs (a subprocess inherits it through the environment)."""
    import tempfile
    cache = os.environ.setdefault("HRDECODER_JAX_CACHE", os.path.join(tempfile.gettempdir(), "hrdecoder_jax_test_xla"))
    import jax
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
