"""The compiled CPU kernels (``cpu_kernels.cc``): when they are used, how they are built and loaded.

Setting (``set_backend`` or ``HRDECODER_JAX_CPU_KERNELS``): ``'auto'`` (the default) uses them in a
single-device CPU process, ``'native'`` wherever they apply, ``'xla'`` never. A kernel applies to float32 on
the CPU backend only (``ops.conv``, ``ops.batch_norm`` say which operations); float64 (the parity tests),
bfloat16, GPUs, several devices (a custom call is not partitioned over a sharded batch) and exported models
keep XLA's own operations. The setting applies to functions traced after it: a jitted function keeps what it
was traced with.

The library is compiled once per source / jaxlib / oneDNN / compiler / CPU into ``ops/`` beside the
compilation cache (default ``~/.cache/hrdecoder_jax/ops``) with ``g++`` (or ``$CXX``), the FFI headers that
ship with jaxlib and the oneDNN wheels ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` (Linux x86_64
dependencies of the package). Where any of these is missing the build is skipped with one logged line and
XLA's operations are used.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax

_log = logging.getLogger(__name__)

BACKEND_ENV = "HRDECODER_JAX_CPU_KERNELS"
BACKENDS = ("auto", "native", "xla")
SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
TARGETS = {   # FFI target name -> exported handler symbol
    "hrd_conv_fwd": "HrdConvForward", "hrd_conv_bwd_data": "HrdConvBackwardData",
    "hrd_conv_bwd_weights": "HrdConvBackwardWeights", "hrd_bn_moments": "HrdBnMoments",
    "hrd_bn_grad_sums": "HrdBnGradSums", "hrd_sgd_step": "HrdSgdStep", "hrd_adamw_step": "HrdAdamwStep",
    "hrd_identity": "HrdIdentity", "hrd_resize": "HrdResize", "hrd_resize_transpose": "HrdResizeTranspose",
}
_ONEDNN_DISTS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")

_backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
_lock = threading.Lock()
_loaded: bool | None = None      # None: not tried yet
_load_error: str | None = None


def set_backend(name: str) -> None:
    """``'auto'`` (single-device CPU processes), ``'native'`` (wherever a kernel applies) or ``'xla'``
    (never); for functions traced afterwards."""
    global _backend
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"CPU kernel backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def backend() -> str:
    return _backend


@contextlib.contextmanager
def backend_scope(name: str):
    """``set_backend(name)`` for what is traced inside the block (an exported model traces with ``'xla'``:
    the artifact must run where these kernels are not registered)."""
    before = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def use_native(dtype) -> bool:
    """Whether an operation of ``dtype`` traced now runs in the compiled kernels."""
    if _backend == "xla" or dtype != jax.numpy.float32 or jax.default_backend() != "cpu":
        return False
    if _backend == "auto" and jax.device_count() != 1:
        return False
    return available()


def in_effect() -> str:
    """What float32 operations traced now get: 'native' or 'xla'."""
    return "native" if use_native(jax.numpy.float32) else "xla"


def _onednn_paths() -> tuple[pathlib.Path, pathlib.Path]:
    """(include dir, lib dir) of the oneDNN wheels; raises LookupError naming what is missing."""
    found = {}
    for dist_name in _ONEDNN_DISTS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise LookupError(f"the {dist_name} package is not installed") from None
        for f in dist.files or ():
            p = str(f)
            if p.endswith("oneapi/dnnl/dnnl.hpp"):
                found["include"] = pathlib.Path(dist.locate_file(f)).resolve().parents[2]
            elif p.endswith("libdnnl.so.3"):
                found["lib"] = pathlib.Path(dist.locate_file(f)).resolve().parent
    if "include" not in found or "lib" not in found:
        raise LookupError("the oneDNN wheels hold no dnnl.hpp / libdnnl.so.3")
    return found["include"], found["lib"]


def _build_dir() -> pathlib.Path:
    from hrdecoder_jax import runtime
    xla_cache = runtime.cache_dir()
    base = pathlib.Path(xla_cache).parent if xla_cache else pathlib.Path(tempfile.gettempdir()) / "hrdecoder_jax"
    return base / "ops"


def _compile() -> pathlib.Path:
    """The compiled library, built if this source/jaxlib/oneDNN/compiler/CPU combination has none yet."""
    from hrdecoder_jax import runtime
    include, libdir = _onednn_paths()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise LookupError("no C++ compiler (g++ or $CXX)")
    # Multiply-adds contract into FMAs, as in XLA's own CPU kernels (the optimiser step then equals optax's
    # on XLA bit for bit for SGD).
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
             f"-I{include}", f"-L{libdir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{libdir}"]
    tag = hashlib.sha256(SOURCE.read_bytes() + "|".join(
        [jax.__version__, importlib.metadata.version("jaxlib"), importlib.metadata.version(_ONEDNN_DISTS[0]), cxx,
         runtime.cpu_model(), *flags]).encode()).hexdigest()[:16]
    out_dir = _build_dir()
    target = out_dir / f"cpu_kernels-{tag}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    cmd = [cxx, str(SOURCE), "-o", tmp, *flags]
    _log.info("building the CPU kernels: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()
        raise RuntimeError(f"{cxx} failed: {(errors or ['(no output)'])[0].strip()}")
    os.replace(tmp, target)      # atomic: a concurrent builder's identical result may win, that is fine
    return target


def available() -> bool:
    """Whether the kernels are loaded and registered (builds and loads them on the first call)."""
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            # Threads of oneDNN's OpenMP runtime sleep while they wait instead of spinning against XLA's
            # own threads (read once, when libgomp loads).
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            lib = ctypes.CDLL(str(_compile()))
            for name, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _loaded = True
        except (LookupError, RuntimeError, OSError, AttributeError) as e:
            _load_error = str(e)
            _log.warning("hrdecoder_jax CPU kernels unavailable (%s); using XLA's operations", e)
            _loaded = False
    return _loaded


def require() -> None:
    """Raise RuntimeError (naming why) where the kernels cannot be built or loaded."""
    if not available():
        raise RuntimeError(f"hrdecoder_jax CPU kernels are unavailable here: {_load_error}")


def load_error() -> str | None:
    """Why the kernels are not available (None if they are or were not tried)."""
    return _load_error
