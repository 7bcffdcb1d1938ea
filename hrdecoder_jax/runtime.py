"""Process set-up shared by every command and by the Python API: XLA's CPU options, the convolution
backend, the persistent compilation cache, TensorFlow kept off the accelerators.

* ``configure(purpose)``: what every command calls first, and the one call of the Python API
  (``hrdecoder_jax.setup()``). Call it before the first JAX computation of the process.
* ``apply_xla_cpu_flags()``: the XLA CPU options alone; ``import hrdecoder_jax`` applies them when JAX's
  backend has not started yet, so the API gets the commands' exact gradients without any call.

XLA CPU options (only where no ``XLA_FLAGS`` choice of the user says otherwise, and only when no GPU/TPU
plugin is installed):

* XLA hands reductions to YNNPACK by default, whose float32 sums lose precision: two gradients of the
  reference fixture came out 4e-4 .. 8e-4 off with them and 5e-6 without; they are always off (``-reduce``).
* Convolutions: float32 convolutions on a single-device CPU process run in oneDNN (``ops/conv.py``; all
  three of forward, input and weight gradient, on every core); XLA's own convolutions remain for float64,
  bfloat16, several devices, or where oneDNN is unavailable. For those, training keeps YNNPACK's (faster
  backward at batch 1 on the AMD Zen 4 measured) and inference uses XLA's Eigen convolutions (all cores;
  1.2x faster forward). ``HRDECODER_JAX_CONV=xla|onednn|auto`` overrides the convolution backend.

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
import platform
import sys

CACHE_ENV = "HRDECODER_JAX_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "hrdecoder_jax", "xla")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = {
    "train": f"{YNN_FLAG}=-reduce",
    "inference": f"{YNN_FLAG}=-individual_convolution,-reduce",
}

_log = logging.getLogger(__name__)
# Whether the user's own XLA_FLAGS choose the YNNPACK fusions (then they are left alone), as the
# environment was when this module was first imported; and what this module put there since.
_USER_CHOSE_YNN = YNN_FLAG in os.environ.get("XLA_FLAGS", "")
_applied: str | None = None


def _accelerator_plugin_installed() -> bool:
    def found(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:   # a dotted name whose parent package is absent
            return False
    return any(found(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                                        "jax_plugins.xla_cuda13", "libtpu"))


def _backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")   # not imported yet: nothing has started
    return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def xla_cpu_flags(purpose: str) -> str | None:
    """The CPU flags ``configure`` adds for ``purpose`` ('train' or 'inference'), or None when the user's
    ``XLA_FLAGS`` already choose, or an accelerator plugin is installed."""
    if purpose not in CPU_FLAGS:
        raise ValueError(f"purpose must be one of {sorted(CPU_FLAGS)}, got {purpose!r}")
    if _USER_CHOSE_YNN or _accelerator_plugin_installed():
        return None
    return CPU_FLAGS[purpose]


def apply_xla_cpu_flags(purpose: str = "train") -> bool:
    """Put ``xla_cpu_flags(purpose)`` in ``XLA_FLAGS`` if JAX's backend has not started (XLA reads them then).
    Returns whether the process runs with them (False: the user's choice, an accelerator, or too late)."""
    global _applied
    flags = xla_cpu_flags(purpose)
    if not flags:
        return False
    if flags == _applied:
        return True
    if _backend_started():
        _log.warning("JAX's backend is already running; XLA CPU options %s not applied (call "
                     "hrdecoder_jax.setup() before the first JAX computation)", flags)
        return False
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(YNN_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(kept + [flags])
    _applied = flags
    return True


def cache_dir() -> str | None:
    """The persistent compilation cache folder, or None when disabled (``HRDECODER_JAX_CACHE=off``)."""
    value = os.environ.get(CACHE_ENV, DEFAULT_CACHE).strip()
    if value.lower() in ("", "off", "0", "none", "false"):
        return None
    return os.path.abspath(os.path.expanduser(value))


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``cache_dir()`` (programs that took over a second to
    compile); returns the folder, or None when it is off or cannot be made."""
    directory = cache_dir()
    if not directory:
        return None
    import jax
    try:
        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except OSError as e:   # a read-only home: run without the cache rather than fail
        _log.warning("compilation cache %s unavailable (%s); compiling every run", directory, e.strerror)
        return None
    return directory


def configure(purpose: str = "train", *, tensorflow: bool = True, quiet: bool = True) -> None:
    """Set XLA's CPU options for ``purpose`` ('train' or 'inference'), turn on the compilation cache, hide
    the GPUs from TensorFlow (``tensorflow=False``: a command that never uses TensorFlow does not import it;
    ``quiet``: without TensorFlow's start-up banner). The CPU kernels follow ``HRDECODER_JAX_CPU_KERNELS``
    (``ops/library.py``)."""
    apply_xla_cpu_flags(purpose)
    enable_compilation_cache()
    if tensorflow:
        hide_gpus_from_tensorflow(quiet=quiet)


def _import_tensorflow(quiet: bool):
    """``import tensorflow``; ``quiet``: with the process's stderr closed meanwhile, where TensorFlow's native
    libraries print their start-up banner (an absl notice and the oneDNN line, once per library) whatever
    ``TF_CPP_MIN_LOG_LEVEL`` says. A failed import still raises (its error is a Python exception)."""
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
