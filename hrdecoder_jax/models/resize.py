"""Bilinear resizing exactly as ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``.

PyTorch's rule along one axis, resizing ``n_in`` samples to ``n_out``: ``scale = n_in / n_out`` (correctly
rounded), source coordinate ``src = max(scale * (o + 0.5) - 0.5, 0)``, ``i0 = min(floor(src), n_in - 1)``,
``i1 = min(i0 + 1, n_in - 1)``, ``lam = src - i0``; output ``(1 - lam) * x[i0] + lam * x[i1]``; no
antialiasing. The arithmetic runs in the data's precision class (``index_dtype``: float64 for float64 data,
float32 otherwise), as PyTorch's does.

Nothing here gathers, so nothing scatters in the backward pass (XLA's scatter-add is slow on CPUs and, in
some jaxlib releases, pathologically slow on GPUs):

* static sizes with an integer factor (HRNet's fuse layers, the head's concat, the logits' upsampling, the
  2x input downscale) are fixed stencils: shifted slices with constant weights, interleaved by a reshape;
* other static sizes are banded matrix products: with ``n_out / n_in = p / q`` in lowest terms, every
  block of ``p`` outputs reads ``q + 2`` neighbouring inputs, through weights computed on the host;
* traced crops and sizes (random HR crops: one compiled step for every draw) are matrix products with a
  matrix built in-graph from the traced indices by one-hot comparisons.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hrdecoder_jax.ops import library
from hrdecoder_jax.ops.resize import resize as kernel_resize

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


def index_dtype(dtype) -> jnp.dtype:
    """The precision of the bilinear index arithmetic for data of ``dtype``: PyTorch computes the scale and
    the source coordinates in the input's accumulation type, float64 for float64 tensors and float32 for
    float32, float16 and bfloat16 ones."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Static sizes: the plan is computed once on the host.
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def source_indices_host(n_in: int, n_out: int, dtype_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, lam)`` of PyTorch's rule for static sizes, computed with NumPy in ``index_dtype``."""
    f = np.dtype(index_dtype(dtype_name))
    scale = f.type(n_in) / f.type(n_out)          # IEEE division: correctly rounded, as PyTorch's
    centres = np.arange(n_out, dtype=f) + f.type(0.5)
    if f == np.float32:
        # PyTorch's kernels (and XLA) evaluate scale * centre - 0.5 as one fused multiply-add, rounded once;
        # in float64 the product of two float32 values is exact, so this is that rounding. NumPy's float32
        # arithmetic would round twice, moving some weights by up to 4e-6 (one float32 step of the coordinate).
        src = (scale.astype(np.float64) * centres.astype(np.float64) - 0.5).astype(np.float32)
    else:
        src = scale * centres - 0.5
    src = np.maximum(src, f.type(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = (src - i0.astype(f)).astype(f)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, lam


def _dense(n_in: int, i0: np.ndarray, i1: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The ``[n_out, n_in]`` interpolation matrix of ``(i0, i1, lam)`` (a clamped pair adds up to 1)."""
    m = np.zeros((len(i0), n_in), lam.dtype)
    rows = np.arange(len(i0))
    np.add.at(m, (rows, i0), 1 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


@functools.lru_cache(maxsize=None)
def _plan(n_in: int, n_out: int, dtype_name: str):
    """How to resize one static axis:

    * ``('up', k, ((shift, lam) per phase))`` when ``n_out = k * n_in``: output ``k * i + r`` is
      ``(1 - lam_r) * x[i + shift_r] + lam_r * x[i + shift_r + 1]`` on the replicate-padded axis;
    * ``('down', k, phase, lam)`` when ``n_in = k * n_out``: output ``o`` reads ``x[k * o + phase]`` (and
      the next sample);
    * ``('banded', p, q, W)`` otherwise, with ``n_out / n_in = p / q`` in lowest terms: output block ``t``
      (outputs ``p t .. p t + p - 1``) reads only the padded samples ``q t .. q t + q + 1``, through its
      own ``[p, q + 2]`` slice of ``W [n_in / q, p, q + 2]``.

    Every plan is checked here against PyTorch's interpolation matrix (a stencil must reproduce it).
    """
    i0, i1, lam = source_indices_host(n_in, n_out, dtype_name)
    exact = _dense(n_in, i0, i1, lam)
    tol = 1e-12 if lam.dtype == np.float64 else 1e-6
    if n_out % n_in == 0:
        k = n_out // n_in
        mid = n_in // 2                                      # a sample no border clamp reaches when n_in > 2
        phases = tuple((int(i0[k * mid + r]) - mid, lam[k * mid + r]) for r in range(k))
        up = np.zeros_like(exact)
        for r, (shift, lam_r) in enumerate(phases):
            rows = k * np.arange(n_in) + r
            np.add.at(up, (rows, np.clip(np.arange(n_in) + shift, 0, n_in - 1)), 1 - lam_r)
            np.add.at(up, (rows, np.clip(np.arange(n_in) + shift + 1, 0, n_in - 1)), lam_r)
        if all(s in (-1, 0) for s, _ in phases) and np.abs(up - exact).max() <= tol:
            return ("up", k, phases)
    if n_in % n_out == 0:
        k = n_in // n_out
        phase, lam0 = int(i0[0]), lam[0]
        if (phase + 1 < k or lam0 == 0) and (i0 == k * np.arange(n_out) + phase).all() \
                and (lam == lam0).all() and (lam0 == 0 or (i1 == i0 + 1).all()):
            return ("down", k, phase, lam0)
    g = np.gcd(n_in, n_out)
    p, q = n_out // g, n_in // g
    block = np.repeat(np.arange(g), p)                       # the block of every output sample
    a, b = i0 + 1 - q * block, i1 + 1 - q * block            # positions in the block's padded window
    if a.min() < 0 or b.max() > q + 1:                       # cannot happen for bilinear; be safe
        raise AssertionError(f"bilinear {n_in}->{n_out}: source outside its block window")
    w = np.zeros((g, p, q + 2), lam.dtype)
    j = np.tile(np.arange(p), g)
    np.add.at(w, (block, j, a), 1 - lam)
    np.add.at(w, (block, j, b), lam)
    return ("banded", p, q, w)


def _take(x: Array, start: int, stop: int, axis: int, stride: int = 1) -> Array:
    return jax.lax.slice_in_dim(x, start, stop, stride, axis=axis)


def _materialised(x: Array) -> Array:
    """``x`` computed once into memory. Every stencil reads its input several times (two taps per phase);
    without the barrier XLA fuses the producer (HRNet's BN, ReLU and residual chain) into each read and
    recomputes it per phase: one fusion of the W18 eval forward ran 40 ReLUs per output element, 30% of
    the forward's time."""
    return jax.lax.optimization_barrier(x)


def _pad_replicate(x: Array, axis: int) -> Array:
    n = x.shape[axis]
    return jnp.concatenate([_take(x, 0, 1, axis), x, _take(x, n - 1, n, axis)], axis=axis)


def _upsample(x: Array, k: int, phases, axis: int) -> Array:
    n = x.shape[axis]
    padded = _pad_replicate(_materialised(x), axis)
    outs = []
    for shift, lam in phases:
        a = _take(padded, 1 + shift, 1 + shift + n, axis)
        if lam == 0:
            outs.append(a)
            continue
        b = _take(padded, 2 + shift, 2 + shift + n, axis)
        outs.append(a * jnp.asarray(1 - lam, x.dtype) + b * jnp.asarray(lam, x.dtype))
    y = jnp.stack(outs, axis=axis + 1)                              # [..., n, k, ...]
    return y.reshape(*x.shape[:axis], n * k, *x.shape[axis + 1:])


def _downsample(x: Array, k: int, phase: int, lam, axis: int) -> Array:
    n = x.shape[axis] // k
    y = _materialised(x).reshape(*x.shape[:axis], n, k, *x.shape[axis + 1:])
    a = jax.lax.index_in_dim(y, phase, axis=axis + 1, keepdims=False)
    if lam == 0:
        return a
    b = jax.lax.index_in_dim(y, phase + 1, axis=axis + 1, keepdims=False)
    return a * jnp.asarray(1 - lam, x.dtype) + b * jnp.asarray(lam, x.dtype)


def _banded(x: Array, p: int, q: int, w: np.ndarray, axis: int) -> Array:
    g = w.shape[0]
    padded = _pad_replicate(_materialised(x), axis)                # length q g + 2
    head = _take(padded, 0, q * g, axis)
    head = head.reshape(*x.shape[:axis], g, q, *x.shape[axis + 1:])
    tails = [jnp.expand_dims(_take(padded, q + e, q * g + 1 + e, axis, stride=q), axis + 1) for e in (0, 1)]
    windows = jnp.concatenate([head, *tails], axis=axis + 1)        # [..., g, q + 2, ...]
    letters = "abcdefghijklmnopqrsuvwxyz"[:x.ndim - 1]
    lhs = letters[:axis] + "tk" + letters[axis:]
    y = jnp.einsum(f"tjk,{lhs}->{lhs.replace('k', 'j')}", jnp.asarray(w, x.dtype), windows, precision=HIGHEST)
    return y.reshape(*x.shape[:axis], g * p, *x.shape[axis + 1:])


def apply_matrix(x: Array, m: Array, axis: int) -> Array:
    """``y[..., o, ...] = sum_i m[o, i] x[..., i, ...]`` along ``axis``, at full precision."""
    y = jnp.tensordot(m.astype(x.dtype), x, axes=((1,), (axis,)), precision=HIGHEST)   # out axis first
    return jnp.moveaxis(y, 0, axis)


def resize_axis(x: Array, n_out: int, axis: int) -> Array:
    """Resize one axis of ``x`` to the static length ``n_out`` (PyTorch bilinear, align_corners=False)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    plan = _plan(n_in, n_out, jnp.dtype(x.dtype).name)
    if plan[0] == "up":
        return _upsample(x, plan[1], plan[2], axis)
    if plan[0] == "down":
        return _downsample(x, plan[1], plan[2], plan[3], axis)
    return _banded(x, plan[1], plan[2], plan[3], axis)


@functools.lru_cache(maxsize=None)
def _kernel_tables(n_in: int, n_out: int) -> tuple:
    """``(i0, i1, 1 - lam, lam)`` of one float32 axis as tuples (hashable: the kernel's static attributes);
    the identity when the size does not change."""
    if n_in == n_out:
        idx = tuple(range(n_in))
        return idx, idx, (1.0,) * n_in, (0.0,) * n_in
    i0, i1, lam = source_indices_host(n_in, n_out, "float32")
    w0 = (np.float32(1) - lam).astype(np.float32)
    return tuple(int(v) for v in i0), tuple(int(v) for v in i1), tuple(float(v) for v in w0), \
        tuple(float(v) for v in lam)


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """Resize ``[B, H, W, C]`` to ``[B, *size, C]`` exactly as PyTorch bilinear, align_corners=False.
    Float32 on CPUs with the compiled kernels: one kernel (``ops/resize.py``) computing the same weighted
    sums, H then W."""
    size = (int(size[0]), int(size[1]))
    if x.shape[1:3] == size:
        return x
    if x.ndim == 4 and library.use_native(x.dtype):
        return kernel_resize(x, (_kernel_tables(x.shape[1], size[0]), _kernel_tables(x.shape[2], size[1])))
    return resize_axis(resize_axis(x, size[0], 1), size[1], 2)


# ----------------------------------------------------------------------------------------------------
# Traced crops and sizes: the interpolation matrix is built in-graph.
# ----------------------------------------------------------------------------------------------------


def source_indices(in_size, out_size, num_out: int, offset=0, dtype=jnp.float32):
    """In-graph ``(i0, i1, lam)`` of PyTorch's rule for ``in_size -> out_size`` samples (traced integers
    allowed), for the first ``num_out`` (static) outputs, reading the window ``[offset, offset + in_size)``
    of a longer axis. Arithmetic in ``index_dtype(dtype)``."""
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


def interpolation_matrix(i0: Array, i1: Array, lam: Array, n_in: int) -> Array:
    """The ``[num_out, n_in]`` matrix with ``1 - lam`` at ``(o, i0[o])`` and ``lam`` at ``(o, i1[o])``
    (one-hot comparisons, no scatter)."""
    columns = jnp.arange(n_in, dtype=i0.dtype)[None, :]
    return (jnp.where(columns == i0[:, None], (1 - lam)[:, None], 0)
            + jnp.where(columns == i1[:, None], lam[:, None], 0))


def crop_resize_bilinear(x: Array, box: Array, size: tuple[int, int]) -> Array:
    """Crop ``x[:, y1:y2, x1:x2]`` and resize it to ``size``, for a *traced* box ``[y1, y2, x1, x2]``.

    Equal to ``F.interpolate(x[..., y1:y2, x1:x2], size, mode='bilinear')`` (the crop's edges clamp, no
    pixel outside the crop is read), with an output shape that does not depend on the box, so every crop
    size and offset runs through one compiled function. ``x``: ``[B, H, W, C]``; ``box``: int ``[4]``.
    """
    y1, y2, x1, x2 = box[0], box[1], box[2], box[3]
    rows = interpolation_matrix(*source_indices(y2 - y1, size[0], size[0], y1, x.dtype), x.shape[1])
    cols = interpolation_matrix(*source_indices(x2 - x1, size[1], size[1], x1, x.dtype), x.shape[2])
    return apply_matrix(apply_matrix(x, rows, 1), cols, 2)


def upsample_to_box(x: Array, box_size: Array, max_size: tuple[int, int]) -> tuple[Array, Array]:
    """Resize ``[B, h, w, C]`` to a traced size ``box_size = (s_h, s_w)`` inside a fixed ``max_size`` canvas.

    Returns the canvas ``[B, *max_size, C]`` whose top-left ``s_h x s_w`` block equals
    ``F.interpolate(x, (s_h, s_w), mode='bilinear')``, and the validity mask ``[*max_size]`` of that block.
    """
    s_h, s_w = box_size[0], box_size[1]
    rows = interpolation_matrix(*source_indices(x.shape[1], s_h, max_size[0], dtype=x.dtype), x.shape[1])
    cols = interpolation_matrix(*source_indices(x.shape[2], s_w, max_size[1], dtype=x.dtype), x.shape[2])
    x = apply_matrix(apply_matrix(x, rows, 1), cols, 2)
    mask = (jnp.arange(max_size[0])[:, None] < s_h) & (jnp.arange(max_size[1])[None, :] < s_w)
    return x, mask
