"""Test setup: 4 fake CPU devices (must happen before JAX initialises its backend), the library's exact XLA
CPU options and compilation cache (``runtime``), and fixture paths."""
import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session: the many small training runs of the tests compile the
# same programs (a subprocess inherits it through the environment).
os.environ.setdefault("HRDECODER_JAX_CACHE", os.path.join(tempfile.gettempdir(), "hrdecoder_jax_test_xla"))

import pytest  # noqa: E402

from hrdecoder_jax import runtime  # noqa: E402

# XLA's YNNPACK convolutions and reductions lose precision in some backward passes (two gradients of the
# reference fixture 4e-4 .. 9e-4 off, 4e-6 without them): parity is checked on the exact path, the
# options ``runtime`` gives inference (see README, Parity). The user's own XLA_FLAGS choice is kept.
runtime.apply_xla_cpu_flags("inference")

# Outputs of the original PyTorch code, kept in the repository (tests/fixtures/README.md says how each was made).
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4, final test metrics) and its config."""
    from hrdecoder_jax.train import train_and_evaluate
    from test_train import shrunk_synthetic_config
    root = tmp_path_factory.mktemp("trained")
    config = shrunk_synthetic_config(root / "data")
    config.eval_every = 0
    config.eval.max_images = 1
    result = train_and_evaluate(config, str(root / "run"))
    assert result["steps"] == 4
    return root, config


def pytest_configure(config):
    runtime.enable_compilation_cache()


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """A model-only checkpoint (as ``convert`` writes) of the reference weights, tiny config."""
    from hrdecoder_jax import checkpoint, cli
    from test_evaluate import TINY, reference_model
    config = cli.load_config(TINY)
    path = tmp_path_factory.mktemp("converted")
    checkpoint.save_model(str(path), reference_model(config, FIXTURES), config=config, source="fixture")
    return path
