"""Building blocks shared by every model, with the PyTorch-parity settings in one place.

All tensors are NHWC. What this module pins down, so no other file has to remember it:

* convolutions have no bias when a norm layer follows (mmcv ``bias='auto'``) and use explicit symmetric
  padding ``k // 2`` (Flax ``'SAME'`` pads stride-2 convolutions asymmetrically, PyTorch does not);
* batch norm uses eps 1e-5 and Flax momentum 0.9 (= PyTorch momentum 0.1), normalises with the biased
  batch variance but stores the *unbiased* one in ``var`` as PyTorch does, and computes in float32 at least;
* parameters and BN statistics are float32, or float64 in a float64 model (``param_dtype``).

Bilinear resizing (PyTorch's ``align_corners=False`` rule, without gathers) is ``models/resize.py``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hrdecoder_jax.ops.batch_norm import batch_norm_train
from hrdecoder_jax.ops.conv import conv_general_dilated

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
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=param_dtype(dtype),
                    conv_general_dilated=conv_general_dilated, rngs=rngs)


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
        scale, bias = self.scale.get_value(), self.bias.get_value()
        if self.use_running_average:
            mean, var = self.mean.get_value(), self.var.get_value()
            y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
            return y.astype(x.dtype)
        # Batch statistics (var biased: used to normalise, unbiased: stored); in the CPU kernels where they apply.
        y, mean, var = batch_norm_train(xf, scale, bias, self.mean.get_value(), self.var.get_value(), self.epsilon,
                                        self.momentum)
        # set_value/get_value, not ``[...]``: Flax's indexed assignment compares the new value's sharding,
        # and asking a tracer for it builds an error message by walking the whole traced graph, which
        # made tracing the train step quadratic in the model depth (45 of 57 s for HRNet-W18).
        self.mean.set_value(mean)
        self.var.set_value(var)
        return y.astype(x.dtype)


def conv_bn_forward(conv_layer: nnx.Conv, bn: BatchNorm, x: Array) -> Array:
    """``bn(conv_layer(x))``; in eval mode with BN folded into the convolution.

    With running statistics BN is a per-channel affine map, so it moves into the kernel and a bias:
    ``w' = w * s``, ``b' = beta + (b - mean) * s`` with ``s = gamma / sqrt(var + eps)``. One pass over the
    activation less per convolution (CPU evaluation is memory-bound outside the convolutions); the same
    function up to rounding (float64 parity unchanged).
    """
    if not bn.use_running_average:
        return bn(conv_layer(x))
    s = jax.lax.rsqrt(bn.var.get_value() + bn.epsilon) * bn.scale.get_value()
    shift = bn.bias.get_value() - bn.mean.get_value() * s
    if conv_layer.bias is not None:
        shift = shift + conv_layer.bias.get_value() * s
    dtype = conv_layer.dtype or jnp.promote_types(x.dtype, s.dtype)
    kernel = (conv_layer.kernel.get_value() * s).astype(dtype)
    y = conv_general_dilated(x.astype(dtype), kernel, conv_layer.strides, conv_layer.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=conv_layer.precision)
    return (y + shift.astype(dtype)).astype(dtype)


class ConvModule(nnx.Module):
    """mmcv ``ConvModule``: conv (no bias) -> BN -> ReLU, with attributes named ``conv`` and ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 act: bool = True, dtype=None, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, dtype=dtype)
        self.act = act

    def __call__(self, x: Array) -> Array:
        x = conv_bn_forward(self.conv, self.bn, x)
        return jax.nn.relu(x) if self.act else x

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
    x = conv_bn_forward(layers[0], layers[1], x)
    return jax.nn.relu(x) if relu else x
