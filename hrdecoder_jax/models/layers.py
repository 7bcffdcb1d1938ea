"""Building blocks shared by every model, with the PyTorch-parity settings in one place.

All tensors are NHWC. What this module pins down, so no other file has to remember it:

* convolutions have no bias when a norm layer follows (mmcv ``bias='auto'``) and use explicit symmetric
  padding ``k // 2`` (Flax ``'SAME'`` pads stride-2 convolutions asymmetrically, PyTorch does not);
* batch norm uses eps 1e-5 and Flax momentum 0.9 (= PyTorch momentum 0.1), normalises with the biased
  batch variance but stores the *unbiased* one in ``var`` as PyTorch does, and always computes in float32;
* bilinear resizing follows ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``
  exactly (half-pixel centres, source index clamped at 0, no antialiasing), including crops whose size
  and offset are traced values, so random HR crops never recompile.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch.

def _host_normal_init(std_of_shape):
    """A normal initialiser drawn with NumPy from the PRNG key's bits.

    Why: drawing every kernel with ``jax.random`` compiles one small XLA program per distinct shape,
    which made building HRNet take 10-20 s on a CPU; NumPy draws the same distribution in milliseconds.
    Deterministic per key, like any Flax initialiser.
    """
    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):  # abstract (eval_shape) or jitted construction
            return jax.random.normal(key, shape, dtype) * std_of_shape(shape)
        seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).tolist()
        values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * std_of_shape(shape)
        return jnp.asarray(values, dtype)
    return init


def param_dtype(dtype) -> jnp.dtype:
    """Storage type of parameters and BN statistics for compute ``dtype``: float64 in a float64 model,
    float32 otherwise (bfloat16 computes on float32 parameters)."""
    return jnp.dtype(jnp.float64) if dtype is not None and jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


# mmcv ConvModule / HRNet: Kaiming normal, fan_out, ReLU gain. HWIO kernel: fan_out = kh * kw * out.
conv_kernel_init = _host_normal_init(lambda shape: np.sqrt(2.0 / (shape[0] * shape[1] * shape[-1])))


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, use_bias: bool = False,
         kernel_init=conv_kernel_init, dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with PyTorch padding ``kernel_size // 2`` on every side."""
    pad = kernel_size // 2
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
                    padding=((pad, pad), (pad, pad)), use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=param_dtype(dtype), rngs=rngs)


class BatchNorm(nnx.Module):
    """Batch norm over N, H, W with PyTorch semantics (see the module docstring).

    ``use_running_average`` is toggled by ``model.train()`` / ``model.eval()``. Under ``jax.jit`` with the
    batch sharded over devices the batch statistics are global, which is what the reference's SyncBN does.
    """

    def __init__(self, num_features: int, *, momentum: float = BN_MOMENTUM, epsilon: float = BN_EPS,
                 dtype=None):
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = False
        store = param_dtype(dtype)
        self.scale = nnx.Param(jnp.ones((num_features,), store))
        self.bias = nnx.Param(jnp.zeros((num_features,), store))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), store))
        self.var = nnx.BatchStat(jnp.ones((num_features,), store))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 compute keeps f32 statistics
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)  # biased: used to normalise
            n = xf.size // self.num_features
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(unbiased)
        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * self.scale[...]) + self.bias[...]
        return y.astype(x.dtype)


class ConvModule(nnx.Module):
    """mmcv ``ConvModule``: conv (no bias) -> BN -> ReLU, with attributes named ``conv`` and ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 act: bool = True, dtype=None, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, dtype=dtype)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.after_conv(self.conv(x))

    def after_conv(self, x: Array) -> Array:
        """BN (and ReLU) of an already convolved ``x``."""
        x = self.bn(x)
        return jax.nn.relu(x) if self.act else x


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, dtype=None,
            rngs: nnx.Rngs) -> nnx.List:
    """``nn.Sequential(conv, BN[, ReLU])`` as a list, so parameter paths read ``<name>.0`` / ``<name>.1``
    like the PyTorch state_dict. The caller decides about the ReLU (it has no parameters)."""
    return nnx.List([conv(in_channels, out_channels, kernel_size, stride=stride, dtype=dtype, rngs=rngs),
                     BatchNorm(out_channels, dtype=dtype)])


def apply_conv_bn(layers: Sequence[nnx.Module], x: Array, relu: bool) -> Array:
    x = layers[1](layers[0](x))
    return jax.nn.relu(x) if relu else x


# ----------------------------------------------------------------------------------------------------
# Bilinear resizing with PyTorch's align_corners=False convention.
# ----------------------------------------------------------------------------------------------------

def index_dtype(dtype) -> jnp.dtype:
    """The precision of the bilinear index arithmetic for data of ``dtype``: PyTorch computes the scale and
    the source coordinates in the input's accumulation type, float64 for float64 tensors and float32 for
    float32, float16 and bfloat16 ones."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _source_indices(in_size, out_size, num_out: int, offset=0, dtype=jnp.float32):
    """Indices and weights that ``F.interpolate(bilinear, align_corners=False)`` uses along one axis.

    Resizing ``in_size`` samples to ``out_size`` samples; returns the first ``num_out`` outputs (``num_out``
    is static, ``in_size``, ``out_size`` and ``offset`` may be traced integers). Output ``o`` samples the
    window ``[offset, offset + in_size)`` of a longer axis. Returns ``(i0, i1, lam)`` of shape
    ``[num_out]``: the output is ``(1 - lam) * x[i0] + lam * x[i1]``. The scale and the source coordinate
    are computed in ``index_dtype(dtype)`` (``dtype``: the resized data's), as PyTorch does.
    """
    f = index_dtype(dtype)
    # A true (correctly rounded) division as PyTorch's: the barrier stops XLA from turning a division by a
    # constant into a multiplication by its reciprocal, which is 1 ulp off and shifts traced crops by ~1e-5.
    scale = jnp.asarray(in_size, f) / jax.lax.optimization_barrier(jnp.asarray(out_size, f))
    src = jnp.maximum(scale * (jnp.arange(num_out, dtype=f) + 0.5) - 0.5, 0.0)
    in_i = jnp.asarray(in_size, jnp.int32)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_i - 1)  # the clamp only bites past out_size
    lam = src - i0.astype(f)
    i1 = jnp.minimum(i0 + 1, in_i - 1)
    offset = jnp.asarray(offset, jnp.int32)
    return i0 + offset, i1 + offset, lam


def _lerp_axis(x: Array, i0: Array, i1: Array, lam: Array, axis: int) -> Array:
    shape = [1] * x.ndim
    shape[axis] = lam.shape[0]
    lam = lam.reshape(shape).astype(x.dtype)
    a = jnp.take(x, i0, axis=axis, mode="clip")
    b = jnp.take(x, i1, axis=axis, mode="clip")
    return (1 - lam) * a + lam * b


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """Resize ``[B, H, W, C]`` to ``[B, *size, C]`` exactly as PyTorch bilinear, align_corners=False."""
    out_h, out_w = size
    in_h, in_w = x.shape[1], x.shape[2]
    if out_h != in_h:
        x = _lerp_axis(x, *_source_indices(in_h, out_h, out_h, dtype=x.dtype), axis=1)
    if out_w != in_w:
        x = _lerp_axis(x, *_source_indices(in_w, out_w, out_w, dtype=x.dtype), axis=2)
    return x


def crop_resize_bilinear(x: Array, box: Array, size: tuple[int, int]) -> Array:
    """Crop ``x[:, y1:y2, x1:x2]`` and resize it to ``size``, for a *traced* box ``[y1, y2, x1, x2]``.

    Equal to ``F.interpolate(x[..., y1:y2, x1:x2], size, mode='bilinear')`` (the crop's edges clamp, no
    pixel outside the crop is read), with an output shape that does not depend on the box, so every crop
    size and offset runs through one compiled function. ``x``: ``[B, H, W, C]``; ``box``: int ``[4]``.
    """
    y1, y2, x1, x2 = box[0], box[1], box[2], box[3]
    x = _lerp_axis(x, *_source_indices(y2 - y1, size[0], size[0], y1, x.dtype), axis=1)
    return _lerp_axis(x, *_source_indices(x2 - x1, size[1], size[1], x1, x.dtype), axis=2)


def upsample_to_box(x: Array, box_size: Array, max_size: tuple[int, int]) -> tuple[Array, Array]:
    """Resize ``[B, h, w, C]`` to a traced size ``box_size = (s_h, s_w)`` inside a fixed ``max_size`` canvas.

    Returns the canvas ``[B, *max_size, C]`` whose top-left ``s_h x s_w`` block equals
    ``F.interpolate(x, (s_h, s_w), mode='bilinear')``, and the validity mask ``[*max_size]`` of that block.
    """
    s_h, s_w = box_size[0], box_size[1]
    x = _lerp_axis(x, *_source_indices(x.shape[1], s_h, max_size[0], dtype=x.dtype), axis=1)
    x = _lerp_axis(x, *_source_indices(x.shape[2], s_w, max_size[1], dtype=x.dtype), axis=2)
    mask = (jnp.arange(max_size[0])[:, None] < s_h) & (jnp.arange(max_size[1])[None, :] < s_w)
    return x, mask
