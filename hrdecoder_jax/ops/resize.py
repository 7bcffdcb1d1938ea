"""Static bilinear resizes of NHWC float32 maps as one CPU kernel each (forward and transpose).

``resize(x, tables)``: ``tables`` are PyTorch's per-axis source indices and weights ``(i0, i1, 1 - lam, lam)``
for H and for W, computed on the host by ``models.resize`` (the one owner of the resize rule); the kernel
resizes along H, then W, as ``models.resize.resize_bilinear`` does. Used where the compiled CPU kernels apply
(``ops.library.use_native``); XLA builds each such resize from padded, shifted slices, several hundred small
kernels per train step.
"""
from __future__ import annotations

import functools

import jax
import numpy as np


def _attrs(tables) -> dict:
    (i0h, i1h, w0h, w1h), (i0w, i1w, w0w, w1w) = tables
    return dict(i0h=np.asarray(i0h, np.int64), i1h=np.asarray(i1h, np.int64), w0h=np.asarray(w0h, np.float32),
                w1h=np.asarray(w1h, np.float32), i0w=np.asarray(i0w, np.int64), i1w=np.asarray(i1w, np.int64),
                w0w=np.asarray(w0w, np.float32), w1w=np.asarray(w1w, np.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def resize(x, tables):
    """``[N, H, W, C] -> [N, len(i0h), len(i0w), C]`` float32 (``tables``: hashable nested tuples)."""
    n, _, _, c = x.shape
    out = jax.ShapeDtypeStruct((n, len(tables[0][0]), len(tables[1][0]), c), x.dtype)
    return jax.ffi.ffi_call("hrd_resize", out)(x, **_attrs(tables))


def _fwd(x, tables):
    return resize(x, tables), x.shape


def _bwd(tables, shape, g):
    return (jax.ffi.ffi_call("hrd_resize_transpose", jax.ShapeDtypeStruct(shape, g.dtype))(g, **_attrs(tables)),)


resize.defvjp(_fwd, _bwd)
