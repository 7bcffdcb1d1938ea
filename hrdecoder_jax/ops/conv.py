"""2-D convolutions through oneDNN on CPUs (an XLA FFI custom call), XLA's own everywhere else.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (the model's ``nnx.Conv`` layers
take it). It sends a convolution to oneDNN when all of these hold at trace time:

* the backend is the CPU and the oneDNN backend is on (``set_backend('onednn')``, or ``'auto'`` on a
  single-device CPU process: ``runtime.configure`` / ``hrdecoder_jax.setup`` choose);
* the convolution is a plain float32 2-D NHWC x HWIO one (no dilation, one group), which is every
  convolution of HRNet and the heads;
* the compiled library is available (built on first use, see below).

Otherwise it is ``jax.lax.conv_general_dilated`` itself, so float64 (the parity tests), bfloat16, GPUs and
exported models never see the custom call. Forward, input gradient and weight gradient all run in oneDNN
(a ``custom_vjp``), the same function up to float32 summation order.

Why: on CPUs XLA runs each convolution on one core and computes weight gradients at a fraction of the
machine's speed (docs/benchmark.md, "CPU profile of the train step"); oneDNN, the library PyTorch uses on
CPUs, runs all three on every core near peak.

The library (``onednn_conv.cc``) is compiled once per source/jaxlib/oneDNN version into
``$HRDECODER_JAX_CACHE/../ops`` (default ``~/.cache/hrdecoder_jax/ops``) with ``g++`` (or ``$CXX``), the FFI
headers that ship with jaxlib and the oneDNN wheels ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp``. Where
any of these is missing the build is skipped with one logged line and XLA's convolutions are used.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_log = logging.getLogger(__name__)

BACKEND_ENV = "HRDECODER_JAX_CONV"
BACKENDS = ("auto", "onednn", "xla")
SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
TARGETS = {"fwd": "HrdConvForward", "bwd_data": "HrdConvBackwardData", "bwd_weights": "HrdConvBackwardWeights"}
_ONEDNN_DISTS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")

_backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
_lock = threading.Lock()
_loaded: bool | None = None      # None: not tried yet
_load_error: str | None = None


def set_backend(name: str) -> None:
    """``'onednn'`` (use it wherever it applies), ``'xla'`` (never), ``'auto'`` (on single-device CPU
    processes). Takes effect for functions traced afterwards (a jitted function keeps what it was traced with)."""
    global _backend
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"convolution backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def backend() -> str:
    return _backend


# ----------------------------------------------------------------------------------------------------
# Building and loading the library
# ----------------------------------------------------------------------------------------------------


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
    """The compiled library, built if this source/jaxlib/oneDNN/compiler combination has none yet."""
    include, libdir = _onednn_paths()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise LookupError("no C++ compiler (g++ or $CXX)")
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", f"-I{include}", f"-L{libdir}",
             "-l:libdnnl.so.3", f"-Wl,-rpath,{libdir}"]
    tag = hashlib.sha256(SOURCE.read_bytes() + "|".join(
        [jax.__version__, importlib.metadata.version("jaxlib"), importlib.metadata.version(_ONEDNN_DISTS[0]), cxx,
         *flags]).encode()).hexdigest()[:16]
    out_dir = _build_dir()
    target = out_dir / f"onednn_conv-{tag}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    cmd = [cxx, str(SOURCE), "-o", tmp, *flags]
    _log.info("building the oneDNN convolution library: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{cxx} failed: {last}")
    os.replace(tmp, target)      # atomic: a concurrent builder's identical result may win, that is fine
    return target


def available() -> bool:
    """Whether the oneDNN library is loaded and registered (builds and loads it on the first call)."""
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
                jax.ffi.register_ffi_target(f"hrd_conv_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            _loaded = True
        except (LookupError, RuntimeError, OSError, AttributeError) as e:
            _load_error = str(e)
            _log.warning("oneDNN convolutions unavailable (%s); using XLA's", e)
            _loaded = False
    return _loaded


def load_error() -> str | None:
    """Why the library is not available (None if it is or was not tried)."""
    return _load_error


# ----------------------------------------------------------------------------------------------------
# The convolution
# ----------------------------------------------------------------------------------------------------


def _attrs(strides, padding) -> dict:
    (pt, pb), (pl, pr) = padding
    return {k: np.int64(v) for k, v in dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr).items()}


def _out_shape(x_shape, k_shape, strides, padding):
    oh, ow = ((x_shape[1 + i] + padding[i][0] + padding[i][1] - k_shape[i]) // strides[i] + 1 for i in range(2))
    return x_shape[0], oh, ow, k_shape[3]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]):
    """``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``
    in oneDNN (float32). Raises RuntimeError where the library cannot be built or loaded."""
    if not available():
        raise RuntimeError(f"oneDNN convolutions are unavailable here: {_load_error}")
    out = jax.ShapeDtypeStruct(_out_shape(x.shape, kernel.shape, strides, padding), x.dtype)
    return jax.ffi.ffi_call("hrd_conv_fwd", out)(x, kernel, **_attrs(strides, padding))


def _fwd(x, kernel, strides, padding):
    return onednn_conv(x, kernel, strides, padding), (x, kernel)


def _bwd(strides, padding, res, dy):
    x, kernel = res
    attrs = _attrs(strides, padding)
    dx = jax.ffi.ffi_call("hrd_conv_bwd_data", jax.ShapeDtypeStruct(x.shape, x.dtype))(dy, kernel, **attrs)
    dk = jax.ffi.ffi_call("hrd_conv_bwd_weights", jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))(x, dy, **attrs)
    return dx, dk


onednn_conv.defvjp(_fwd, _bwd)


def _use_onednn() -> bool:
    if _backend == "xla":
        return False
    if jax.default_backend() != "cpu":
        return False
    if _backend == "auto" and jax.device_count() != 1:
        return False
    return available()


def in_effect() -> str:
    """The backend float32 convolutions traced now get: 'onednn' or 'xla'."""
    return "onednn" if _use_onednn() else "xla"


def _nhwc_hwio(dimension_numbers, ndim: int) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
        return (tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2) and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
                and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None, **kwargs):
    """``jax.lax.conv_general_dilated`` with oneDNN for the float32 NHWC/HWIO convolutions on CPUs."""
    plain = (lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32 and feature_group_count == 1
             and not kwargs.get("preferred_element_type") and kwargs.get("out_sharding") is None
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and not isinstance(padding, str) and _nhwc_hwio(dimension_numbers, lhs.ndim))
    if plain and _use_onednn():
        pad = tuple((int(a), int(b)) for a, b in padding)
        return onednn_conv(lhs, rhs, tuple(int(s) for s in window_strides), pad)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
