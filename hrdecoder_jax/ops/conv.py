"""2-D convolutions through oneDNN on CPUs (an XLA FFI custom call), XLA's own everywhere else.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (the model's ``nnx.Conv`` layers
take it). It sends a convolution to oneDNN when the compiled CPU kernels are in use for float32
(``ops.library``: CPU backend, one device by default, library built) and the convolution is a plain 2-D
NHWC x HWIO one (no dilation, one group), which is every convolution of HRNet and the heads. Otherwise it
is ``jax.lax.conv_general_dilated`` itself. Forward, input gradient and weight gradient all run in oneDNN
(a ``custom_vjp``), the same function up to float32 summation order.

Why: on CPUs XLA runs each convolution on one core and computes weight gradients at a fraction of the
machine's speed (docs/benchmark.md, "CPU profile of the train step"); oneDNN, the library PyTorch uses on
CPUs, runs all three on every core near peak.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hrdecoder_jax.ops import library

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
    in oneDNN (float32). Raises RuntimeError where the kernels cannot be built or loaded."""
    library.require()
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
    if plain and library.use_native(lhs.dtype):
        pad = tuple((int(a), int(b)) for a, b in padding)
        return onednn_conv(lhs, rhs, tuple(int(s) for s in window_strides), pad)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
