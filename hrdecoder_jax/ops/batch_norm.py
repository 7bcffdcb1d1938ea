"""Training-mode batch norm with its reductions in the compiled CPU kernels (float32 on CPUs).

``batch_norm_train(x, scale, bias, eps) -> (y, mean, var)``: ``y = (x - mean) * (rsqrt(var + eps) * scale)
+ bias`` with the batch mean and biased variance over every axis but the last, the formula of
``models.layers.BatchNorm``. Where the kernels apply (``ops.library.use_native``), the mean and variance
and the two sums of the backward pass (``sum dy`` and ``sum dy * (x - mean)``) are custom calls that
accumulate in double, as PyTorch's CPU batch norm does; the elementwise parts stay in XLA. Elsewhere
(float64, bfloat16, GPUs) it is the same formula in plain JAX, differentiated by JAX.

Why: XLA rewrites every large float32 reduction into a tree of two kernels for precision; the two reductions
of each BN forward and the two of its backward made about 900 of the ~1,000 kernels of the W18 train step
(compile time) and a seventh of its run time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hrdecoder_jax.ops import library


def _plain(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias, mean, var


def _moments(x):
    c = x.shape[-1]
    stat = jax.ShapeDtypeStruct((c,), jnp.float32)
    return jax.ffi.ffi_call("hrd_bn_moments", (stat, stat))(x)


def _native_fwd(x, scale, bias, eps):
    mean, var = _moments(x)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native(x, scale, bias, eps: float):
    return _native_fwd(x, scale, bias, eps)[0]


def _native_bwd(eps, res, cotangents):
    del eps
    x, mean, rstd, scale = res
    dy, dmean, dvar = cotangents
    c = x.shape[-1]
    m = x.size // c
    stat = jax.ShapeDtypeStruct((c,), jnp.float32)
    sum_dy, sum_dy_xmu = jax.ffi.ffi_call("hrd_bn_grad_sums", (stat, stat))(dy, x, mean)
    xmu = x - mean
    # d/dx of y through the normalisation, plus the (usually zero) cotangents of the returned statistics.
    dx = ((scale * rstd) * (dy - sum_dy / m - xmu * (rstd * rstd) * (sum_dy_xmu / m))
          + (dmean + 2.0 * dvar * xmu) / m)
    return dx, sum_dy_xmu * rstd, sum_dy


_native.defvjp(_native_fwd, _native_bwd)


def batch_norm_train(x, scale, bias, eps: float):
    """``(y, batch mean, biased batch variance)`` of ``x`` (statistics over all axes but the last)."""
    if x.dtype == jnp.float32 and scale.dtype == jnp.float32 and library.use_native(x.dtype):
        return _native(x, scale, bias, float(eps))
    return _plain(x, scale, bias, eps)
