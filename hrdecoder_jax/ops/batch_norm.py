"""Training-mode batch norm with its statistics in the compiled CPU kernels (float32 on CPUs).

``batch_norm_train(x, scale, bias, running_mean, running_var, eps, momentum)`` returns
``(y, new_running_mean, new_running_var)``: ``y = (x - mean) * (rsqrt(var + eps) * scale) + bias`` with the
batch mean and biased variance over every axis but the last (the formula of ``models.layers.BatchNorm``),
and the running statistics ``momentum * running + (1 - momentum) * batch`` with the unbiased variance, as
PyTorch stores it; no gradient flows into them. Where the kernels apply (``ops.library.use_native``) the
statistics (mean, ``rsqrt(var + eps)``, the running updates) and the two sums of the backward pass
(``sum dy`` and ``sum dy * (x - mean)``) are custom calls that accumulate in double, as PyTorch's CPU batch
norm does; the elementwise parts stay in XLA. Elsewhere (float64, bfloat16, GPUs) it is the same formula in
plain JAX, differentiated by JAX.

Why: XLA rewrites every large float32 reduction into a tree of two kernels for precision, and compiles a few
more small kernels per layer for the statistics: about a third of the ~3,000 kernels of the W18 train step's
forward and backward (compile time), and a seventh of its run time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hrdecoder_jax.ops import library


def _unbias(x) -> float:
    n = x.size // x.shape[-1]
    return n / max(n - 1, 1)


def _plain(x, scale, bias, running_mean, running_var, eps, momentum):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    y = (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
    m = momentum
    new_mean = m * running_mean + (1 - m) * jax.lax.stop_gradient(mean)
    new_var = m * running_var + (1 - m) * jax.lax.stop_gradient(var * _unbias(x))
    return y, new_mean, new_var


def _statistics(x, running_mean, running_var, eps, momentum):
    stat = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    return jax.ffi.ffi_call("hrd_bn_moments", (stat, stat, stat, stat))(
        x, running_mean, running_var, eps=np.float32(eps), momentum=np.float32(momentum),
        one_minus_momentum=np.float32(1 - momentum), unbias=np.float32(_unbias(x)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _native(x, scale, bias, running_mean, running_var, eps: float, momentum: float):
    return _native_fwd(x, scale, bias, running_mean, running_var, eps, momentum)[0]


def _native_fwd(x, scale, bias, running_mean, running_var, eps, momentum):
    mean, rstd, new_mean, new_var = _statistics(x, running_mean, running_var, eps, momentum)
    y = (x - mean) * (rstd * scale) + bias
    return (y, new_mean, new_var), (x, mean, rstd, scale)


def _native_bwd(eps, momentum, res, cotangents):
    del eps, momentum
    x, mean, rstd, scale = res
    dy = cotangents[0]          # the running statistics take no gradient (as in the plain path)
    c = x.shape[-1]
    m = x.size // c
    stat = jax.ShapeDtypeStruct((c,), jnp.float32)
    # The scale's gradient (sum dy * (x - mean) * rstd) comes out of the kernel too: one XLA kernel fewer
    # per layer (about 300 in the W18 train step, compile time).
    sum_dy, sum_dy_xmu, grad_scale = jax.ffi.ffi_call("hrd_bn_grad_sums", (stat, stat, stat))(dy, x, mean, rstd)
    dx = (scale * rstd) * (dy - sum_dy / m - (x - mean) * (rstd * rstd) * (sum_dy_xmu / m))
    zeros = jnp.zeros((c,), jnp.float32)
    return dx, grad_scale, sum_dy, zeros, zeros


_native.defvjp(_native_fwd, _native_bwd)


def batch_norm_train(x, scale, bias, running_mean, running_var, eps: float, momentum: float):
    """``(y, new running mean, new running var)`` of ``x`` in training mode (see the module docstring)."""
    if (x.dtype == jnp.float32 and scale.dtype == jnp.float32 and running_mean.dtype == jnp.float32
            and library.use_native(x.dtype)):
        return _native(x, scale, bias, running_mean, running_var, float(eps), float(momentum))
    return _plain(x, scale, bias, running_mean, running_var, eps, momentum)
