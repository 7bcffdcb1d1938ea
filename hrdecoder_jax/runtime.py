"""Process set-up shared by every command: XLA's CPU options, the persistent compilation cache, TensorFlow
kept off the accelerators. Call ``configure`` before the first JAX computation of the process.

XLA CPU options (only where no ``XLA_FLAGS`` choice of the user says otherwise, and only when no GPU/TPU
plugin is installed). Measured on a 2-core AMD Zen 4 (HRNetV2-W18, batch 1; docs/benchmark.md):

* XLA hands reductions to YNNPACK by default, whose float32 sums lose precision: two gradients of the
  reference fixture came out 4e-4 .. 8e-4 off with them and 5e-6 without; every command turns them off
  (``-reduce``; 13% of the train step's time, the price of exact gradients).
* YNNPACK convolutions run on one core each, XLA's Eigen convolutions on all: the eval forward is 1.2x
  faster on Eigen (0.53 vs 0.63 s), the train step 1.15x faster on YNNPACK (whose backward convolutions
  are faster at batch 1). Inference commands (``evaluate``, ``predict``) use Eigen; training keeps
  YNNPACK's convolutions (both are exact).

Compilation cache: compiled programs are kept in ``$HRDECODER_JAX_CACHE`` (default
``~/.cache/hrdecoder_jax/xla``; ``off`` disables), so a resumed run or a second evaluation does not
compile again.

Platforms: ``platform_problem`` turns a backend that ``JAX_PLATFORMS`` asks for but JAX cannot start (e.g.
``cuda`` without a GPU, where JAX raises a bare ``AssertionError``) into one sentence saying how to fix it.
"""
from __future__ import annotations

import importlib.util
import logging
import os

CACHE_ENV = "HRDECODER_JAX_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "hrdecoder_jax", "xla")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = {
    "train": f"{YNN_FLAG}=-reduce",
    "inference": f"{YNN_FLAG}=-individual_convolution,-reduce",
}

_log = logging.getLogger(__name__)


def _accelerator_plugin_installed() -> bool:
    def found(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:   # a dotted name whose parent package is absent
            return False
    return any(found(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                                        "jax_plugins.xla_cuda13", "libtpu"))


def _backend_started() -> bool:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, "_backends", None))


def xla_cpu_flags(purpose: str) -> str | None:
    """The CPU flags ``configure`` adds for ``purpose`` ('train' or 'inference'), or None when the user's
    ``XLA_FLAGS`` already choose, or an accelerator plugin is installed."""
    if purpose not in CPU_FLAGS:
        raise ValueError(f"purpose must be one of {sorted(CPU_FLAGS)}, got {purpose!r}")
    if YNN_FLAG in os.environ.get("XLA_FLAGS", "") or _accelerator_plugin_installed():
        return None
    return CPU_FLAGS[purpose]


def cache_dir() -> str | None:
    """The persistent compilation cache folder, or None when disabled (``HRDECODER_JAX_CACHE=off``)."""
    value = os.environ.get(CACHE_ENV, DEFAULT_CACHE).strip()
    if value.lower() in ("", "off", "0", "none", "false"):
        return None
    return os.path.abspath(os.path.expanduser(value))


def configure(purpose: str = "train", *, tensorflow: bool = True, quiet: bool = True) -> None:
    """Set XLA's CPU options for ``purpose``, turn on the compilation cache, hide the GPUs from TensorFlow
    (``tensorflow=False``: a command that never uses TensorFlow does not import it; ``quiet``: without
    TensorFlow's start-up banner)."""
    flags = xla_cpu_flags(purpose)
    if flags:
        if _backend_started():
            _log.info("XLA backend already running; CPU options %s not applied", flags)
        else:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    import jax

    directory = cache_dir()
    if directory:
        try:
            os.makedirs(directory, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", directory)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        except OSError as e:   # a read-only home: run without the cache rather than fail
            _log.warning("compilation cache %s unavailable (%s); compiling every run", directory, e.strerror)
    if tensorflow:
        hide_gpus_from_tensorflow(quiet=quiet)


def _import_tensorflow(quiet: bool):
    """``import tensorflow``; ``quiet``: with the process's stderr closed meanwhile, where TensorFlow's native
    libraries print their start-up banner (an absl notice and the oneDNN line, once per library) whatever
    ``TF_CPP_MIN_LOG_LEVEL`` says. A failed import still raises (its error is a Python exception)."""
    import sys
    if not quiet or "tensorflow" in sys.modules:
        import tensorflow as tf
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tf


def hide_gpus_from_tensorflow(quiet: bool = True) -> None:
    """tf.data runs on the CPU; TensorFlow must never take accelerator memory from JAX. Without TensorFlow
    (or where it cannot be imported) there is nothing to hide."""
    try:
        if importlib.util.find_spec("tensorflow") is None:
            return
    except (ImportError, ValueError):
        return
    tf = _import_tensorflow(quiet)
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:   # TensorFlow's devices are already initialised: nothing to change any more
        pass


def platform_problem() -> str | None:
    """Why JAX cannot start the backend ``JAX_PLATFORMS`` names, as one sentence with the fix; None when it
    starts (or no platform is forced). Call after an error: it starts the backend if nothing had."""
    wanted = os.environ.get("JAX_PLATFORMS", "").strip()
    if not wanted:
        return None
    import jax
    try:
        jax.devices()
        return None
    except Exception as e:  # noqa: BLE001 - JAX raises AssertionError or RuntimeError here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    platforms = [p.strip().lower() for p in wanted.split(",") if p.strip()]
    if any(p in ("cuda", "gpu") for p in platforms):
        plugin = any(importlib.util.find_spec(n) is not None for n in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
        why = ("the CUDA plugin is installed but finds no usable GPU (driver, CUDA_VISIBLE_DEVICES?)" if plugin
               else "JAX's CUDA plugin is not installed")
        return (f"JAX_PLATFORMS={wanted} but CUDA is not available: {why}; on a machine with an NVIDIA GPU "
                'install the cuda12 extra (pip install -e ".[cuda12]"), or unset JAX_PLATFORMS to run on the CPU')
    return (f"JAX_PLATFORMS={wanted}: JAX cannot start that backend ({reason}); unset JAX_PLATFORMS to let JAX "
            "choose, or install the backend's plugin")
