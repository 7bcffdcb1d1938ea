"""TensorFlow ops for the HRDecoder data pipeline, reproducing the mmseg 0.x / mmcv 1.x conventions.

Every op works eagerly and inside ``tf.data`` (graph mode), takes HWC tensors without a batch
dimension, and draws randomness only from explicit stateless keys (int64 ``[2]``), so the
pipeline is a pure function of (seed, example index).

Label representation. The four binary lesion masks (channel order EX, HE, SE, MA) are *packed*
into one uint8 map with bit k set for mask k (EX=1, HE=2, SE=4, MA=8). All geometric label ops
(nearest resize, crop, flip, nearest rotation with border 0, pad 0) act on single pixels, so they
commute with packing; the pipeline therefore carries one uint8 map and derives at the end either

* the reference's fused label (``packed_to_label``): 0 = background, 1..4 = EX, HE, SE, MA, where a
  pixel in several masks takes the LAST of EX, HE, SE, MA (MA > SE > HE > EX), exactly what the
  reference conversion scripts write, or
* the four masks again (``unpack_masks``) for the multi-label option.

Conventions (those of mmcv/OpenCV, which the reference pipeline uses):

* ``rescale_size``: mmcv ``rescale_size`` (imrescale with a (w, h) tuple), float64 like Python.
* Bilinear resize: cv2 INTER_LINEAR = half-pixel centres, edge clamp, NO antialiasing.
* Nearest resize: cv2 INTER_NEAREST = ``src = min(floor(dst * (in / out)), in - 1)``, no half pixel.
* Rotation: mmcv ``imrotate``: positive angle = clockwise on screen, centre ((w-1)/2, (h-1)/2),
  output size unchanged, constant border.
* Images that the reference keeps as uint8 between ops (after cv2 resize and warpAffine) can be
  re-quantised with ``quantize_uint8`` (round half up, clip), as cv2's ``saturate_cast`` does.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from hrdecoder_jax.runtime import hide_gpus_from_tensorflow

hide_gpus_from_tensorflow()   # the first TensorFlow use of the package: JAX owns the accelerators

# Bits of the packed label map, in the reference's class order EX, HE, SE, MA.
MASK_BITS = (1, 2, 4, 8)

# Fused label of each packed value 0..15: the highest set bit wins (MA > SE > HE > EX).
_FUSE_LUT = [0] + [max(k + 1 for k in range(4) if v & MASK_BITS[k]) for v in range(1, 16)]


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def pack_masks(masks: tf.Tensor) -> tf.Tensor:
    """Packs masks uint8 [H, W, 4] (EX, HE, SE, MA; nonzero = lesion) into uint8 [H, W] bit flags."""
    on = tf.cast(masks > 0, tf.uint8)
    return tf.reduce_sum(on * tf.constant(MASK_BITS, tf.uint8), axis=-1)


def unpack_masks(packed: tf.Tensor) -> tf.Tensor:
    """Inverse of ``pack_masks``: uint8 [...] -> uint8 [..., 4] with values 0/1."""
    bits = tf.constant(MASK_BITS, tf.uint8)
    return tf.cast(tf.bitwise.bitwise_and(packed[..., None], bits) > 0, tf.uint8)


def packed_to_label(packed: tf.Tensor, dtype: tf.DType = tf.int32) -> tf.Tensor:
    """Fused label [...] from packed masks [...]: 4 if MA else 3 if SE else 2 if HE else 1 if EX else 0."""
    lut = tf.constant(_FUSE_LUT, dtype)
    return tf.gather(lut, tf.cast(packed, tf.int32) & 15)


# ---------------------------------------------------------------------------------------------
# Sizes and resampling indices
# ---------------------------------------------------------------------------------------------


def rescale_size(height, width, scale_wh, ratio=1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """New (height, width) int32 of mmcv ``imrescale`` for ``Resize(img_scale, ratio_range)``.

    mmseg draws ``ratio`` and sets target = (int(W_s * ratio), int(H_s * ratio)); mmcv then uses
    f = min(max(target) / max(h, w), min(target) / min(h, w)) and new size
    (int(w * f + 0.5), int(h * f + 0.5)). Everything in float64 to match Python floats.

    Args:
      height, width: the image size (scalars, any int type or Python ints).
      scale_wh: ``img_scale`` as (W_s, H_s).
      ratio: the drawn ratio r (scalar, float).
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    r = tf.cast(ratio, tf.float64)
    tw = tf.floor(float(scale_wh[0]) * r)  # int() of a positive float truncates = floor
    th = tf.floor(float(scale_wh[1]) * r)
    factor = tf.minimum(tf.maximum(tw, th) / tf.maximum(h, w), tf.minimum(tw, th) / tf.minimum(h, w))
    new_w = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
    new_h = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
    return new_h, new_w


def nearest_indices(in_size, out_size) -> tf.Tensor:
    """Source indices int32 [out_size] of cv2 INTER_NEAREST along one axis.

    cv2 ``resizeNN``: ``sx = min(floor(x * ifx), in - 1)`` with ``ifx = 1 / (out / in)`` in double;
    no half-pixel offset (unlike ``tf.image.resize(method='nearest')``).
    """
    n_in = tf.cast(in_size, tf.float64)
    n_out = tf.cast(out_size, tf.float64)
    ifx = 1.0 / (n_out / n_in)
    src = tf.floor(tf.cast(tf.range(out_size), tf.float64) * ifx)
    return tf.cast(tf.minimum(src, n_in - 1.0), tf.int32)


def bilinear_indices(in_size, out_size) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(i0, i1, frac) for half-pixel bilinear resampling along one axis (cv2 INTER_LINEAR).

    ``src = (dst + 0.5) * in / out - 0.5`` clamped to >= 0, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, in - 1)``, ``frac = src - i0`` (0 past the last pixel, i.e. edge clamp).
    This is also PyTorch ``F.interpolate(bilinear, align_corners=False)`` and
    ``tf.image.resize(bilinear, antialias=False)``. Shapes: int32 [out], int32 [out], float32 [out].
    """
    n_in = tf.cast(in_size, tf.float64)
    scale = n_in / tf.cast(out_size, tf.float64)
    src = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale - 0.5
    src = tf.clip_by_value(src, 0.0, n_in - 1.0)
    i0 = tf.floor(src)
    frac = src - i0
    i0 = tf.cast(i0, tf.int32)
    i1 = tf.minimum(i0 + 1, tf.cast(in_size, tf.int32) - 1)
    return i0, i1, tf.cast(frac, tf.float32)


def _lerp_gather(x: tf.Tensor, i0, i1, frac, axis: int) -> tf.Tensor:
    """Linear interpolation of x along ``axis`` between gathered slices i0 and i1 (float32 out)."""
    a = tf.cast(tf.gather(x, i0, axis=axis), tf.float32)
    b = tf.cast(tf.gather(x, i1, axis=axis), tf.float32)
    shape = [1] * 3
    shape[axis] = -1
    f = tf.reshape(frac, shape)
    return a + (b - a) * f


def _window(out_size, offset, window):
    """``(out_h, out_w), (y, x), (h, w)`` of a window of a resize's output (default: all of it)."""
    return tuple(out_size), tuple(offset), tuple(out_size if window is None else window)


def resize_bilinear_window(image: tf.Tensor, out_size, offset=(0, 0), window=None, flip=False) -> tf.Tensor:
    """A window of the bilinear (cv2 INTER_LINEAR, no antialias) resize of ``image`` to ``out_size``.

    Equal to ``resize_bilinear(image, out_size)[y:y+h, x:x+w]`` but computes only the window
    from the source pixels it needs, so training never materialises the up-to-2x rescaled full
    image (5760x3826 for IDRiD).

    Args:
      image: [H, W, C], any real dtype.
      out_size: (out_h, out_w) of the full resize.
      offset: (y, x) of the window in the resized image.
      window: (h, w) of the window; default the full output.
      flip: bool (a tensor is fine): the window mirrored left-right. Each output pixel is computed
        by the same formula from the same source pixels, only its column is reversed, so this is
        bit for bit a flip (``tf.reverse`` of axis 1) of the unflipped window, without a pass over the result.
    Returns:
      float32 [h, w, C].
    """
    shape = tf.shape(image)
    (out_h, out_w), (y, x), (wh, ww) = _window(out_size, offset, window)
    r0, r1, rf = bilinear_indices(shape[0], out_h)
    c0, c1, cf = bilinear_indices(shape[1], out_w)
    r0, r1, rf = r0[y:y + wh], r1[y:y + wh], rf[y:y + wh]
    c0, c1, cf = c0[x:x + ww], c1[x:x + ww], cf[x:x + ww]
    # Only the source box the window reads (indices are monotonic).
    ry, cx = r0[0], c0[0]
    src = image[ry:r1[-1] + 1, cx:c1[-1] + 1]
    r0, r1, c0, c1 = r0 - ry, r1 - ry, c0 - cx, c1 - cx
    src_h, src_w = r1[-1] + 1, c1[-1] + 1
    wh, ww = tf.size(r0), tf.size(c0)
    c0, c1, cf = (_maybe_reverse(v, flip) for v in (c0, c1, cf))

    # The result is separable; interpolate first along the axis that shrinks the intermediate
    # more (the order only changes float rounding, and is a function of the sizes alone).
    def rows_first():
        return _lerp_gather(_lerp_gather(src, r0, r1, rf, axis=0), c0, c1, cf, axis=1)

    def cols_first():
        return _lerp_gather(_lerp_gather(src, c0, c1, cf, axis=1), r0, r1, rf, axis=0)

    return tf.cond(wh * src_w <= src_h * ww, rows_first, cols_first)


def _maybe_reverse(v: tf.Tensor, flip) -> tf.Tensor:
    if isinstance(flip, bool):
        return tf.reverse(v, [0]) if flip else v
    return tf.cond(flip, lambda: tf.reverse(v, [0]), lambda: v)


def resize_bilinear(image: tf.Tensor, out_size) -> tf.Tensor:
    """Bilinear resize [H, W, C] -> float32 [out_h, out_w, C] (cv2 INTER_LINEAR, no antialias)."""
    return resize_bilinear_window(image, out_size)


def resize_nearest_window(label: tf.Tensor, out_size, offset=(0, 0), window=None, flip=False) -> tf.Tensor:
    """A window of the cv2 INTER_NEAREST resize of ``label`` [H, W] or [H, W, C]; dtype kept.

    ``flip``: the window mirrored left-right (reversed column indices; see ``resize_bilinear_window``).
    """
    shape = tf.shape(label)
    (out_h, out_w), (y, x), (wh, ww) = _window(out_size, offset, window)
    rows = nearest_indices(shape[0], out_h)[y:y + wh]
    cols = _maybe_reverse(nearest_indices(shape[1], out_w)[x:x + ww], flip)
    return tf.gather(tf.gather(label, rows, axis=0), cols, axis=1)


def quantize_uint8(x: tf.Tensor) -> tf.Tensor:
    """Rounds to the uint8 grid (half up, clipped to [0, 255]) but keeps float32.

    The reference keeps images as uint8 between cv2 ops (resize, warpAffine), which round with
    ``saturate_cast``; re-quantising reproduces that loss of precision.
    """
    return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)


def to_uint8(x: tf.Tensor) -> tf.Tensor:
    """``quantize_uint8(x)`` as uint8: the same values (integers 0..255), a quarter of the bytes.

    ``trunc(clip(x, 0, 255) + 0.5)``: for x in [0, 255] it is the very same float addition as
    ``floor(x + 0.5)`` (truncation is floor on non-negatives), and outside that range both give 0 or 255.
    """
    return tf.cast(tf.clip_by_value(x, 0.0, 255.0) + 0.5, tf.uint8)


# ---------------------------------------------------------------------------------------------
# Random crop (mmseg RandomCrop with cat_max_ratio)
# ---------------------------------------------------------------------------------------------


def crop_offset(key: tf.Tensor, size, crop_size) -> tf.Tensor:
    """One mmseg ``get_crop_bbox`` draw: int32 [2] (y, x), each uniform in [0, max(size - crop, 0)]."""
    margin_h = tf.maximum(tf.cast(size[0], tf.int32) - crop_size[0], 0)
    margin_w = tf.maximum(tf.cast(size[1], tf.int32) - crop_size[1], 0)
    ky, kx = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    y = tf.random.stateless_uniform([], ky, minval=0, maxval=margin_h + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], kx, minval=0, maxval=margin_w + 1, dtype=tf.int32)
    return tf.stack([y, x])


def fused_counts_from_packed(packed: tf.Tensor) -> tf.Tensor:
    """Counts int32 [5] of the fused labels 0..4 of a packed mask window, without building the label.

    A histogram of the 16 packed values folded through the fusion table: one cheap bincount
    instead of a per-pixel table lookup (this runs for up to 11 crop draws per example).
    """
    counts16 = tf.math.bincount(tf.reshape(tf.cast(packed, tf.int32), [-1]), minlength=256, maxlength=256)[:16]
    return tf.math.unsorted_segment_sum(counts16, tf.constant(_FUSE_LUT, tf.int32), 5)


def crop_accepted(counts: tf.Tensor, cat_max_ratio: float) -> tf.Tensor:
    """mmseg's acceptance test of a crop from its label-value counts (ignored values zeroed): bool.

    Accept when at least 2 distinct values are present and the most frequent covers
    < ``cat_max_ratio`` of the counted pixels.
    """
    total = tf.reduce_sum(counts)
    n_classes = tf.math.count_nonzero(counts)
    ratio = tf.cast(tf.reduce_max(counts), tf.float64) / tf.cast(tf.maximum(total, 1), tf.float64)
    return tf.logical_and(n_classes > 1, ratio < cat_max_ratio)


def nonzero_count_nearest_window(label: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """Number of nonzero pixels int32 in ``tf.gather(tf.gather(label, rows), cols, axis=1)``.

    Computed without the gather as m_r^T (label != 0) m_c, where m_r / m_c count how often each
    source row / column is used; ``rows`` and ``cols`` must be non-decreasing (nearest-resize
    indices). float32 sums of integers are exact below 2^24 pixels, far above any crop.
    """
    r_lo, c_lo = rows[0], cols[0]
    box = label[r_lo:rows[-1] + 1, c_lo:cols[-1] + 1]
    m_r = tf.math.bincount(rows - r_lo, minlength=tf.shape(box)[0], dtype=tf.float32)
    m_c = tf.math.bincount(cols - c_lo, minlength=tf.shape(box)[1], dtype=tf.float32)
    per_row = tf.linalg.matvec(tf.cast(box != 0, tf.float32), m_c)
    return tf.cast(tf.tensordot(m_r, per_row, 1), tf.int32)


def select_crop(key: tf.Tensor, size, crop_size, counts_fn, cat_max_ratio: float,
                max_redraws: int = 10, reject_fn=None) -> tf.Tensor:
    """The crop offset mmseg ``RandomCrop`` picks: int32 [2] (y, x).

    Draw 0 is checked, then up to ``max_redraws`` re-draws; if none is accepted, the LAST draw
    (draw 10, i.e. the 11th box) is used unchecked, as in mmseg. With ``cat_max_ratio >= 1`` the
    first draw is used. Draw k uses ``fold_in(key, k)``, so draws are independent of how many
    were needed.

    Args:
      key: stateless key int64 [2].
      size: (h, w) of the (resized) image.
      crop_size: (crop_h, crop_w).
      counts_fn: (y, x) -> int32 [num_values], the label-value counts of the crop at (y, x) with
        ignored values excluded (e.g. the label values' pixel counts of the window).
      reject_fn: optional cheap (y, x) -> bool that is True only for crops the full test rejects
        (e.g. background alone covers >= cat_max_ratio); ``counts_fn`` then runs only otherwise.
    """
    def draw(k):
        return crop_offset(tf.random.experimental.stateless_fold_in(key, tf.cast(k, tf.int64)), size, crop_size)

    if cat_max_ratio >= 1.0:
        return draw(0)

    def accepted(off):
        full = lambda: crop_accepted(counts_fn(off[0], off[1]), cat_max_ratio)  # noqa: E731
        if reject_fn is None:
            return full()
        return tf.cond(reject_fn(off[0], off[1]), lambda: tf.constant(False), full)

    def cond(k, off):
        return tf.logical_and(k < max_redraws, tf.logical_not(accepted(off)))

    def body(k, off):
        return k + 1, draw(k + 1)

    _, off = tf.while_loop(cond, body, (tf.constant(0), draw(0)))
    return off


# ---------------------------------------------------------------------------------------------
# Flip, rotation, normalisation, padding
# ---------------------------------------------------------------------------------------------


def rotation_transform(angle_deg, height, width) -> tf.Tensor:
    """Projective transform float32 [8] (output -> input coordinates) of mmcv ``imrotate``.

    mmcv calls ``cv2.getRotationMatrix2D(((w-1)/2, (h-1)/2), -angle, 1)`` and ``cv2.warpAffine``,
    so a positive angle turns the content CLOCKWISE on screen (y down). warpAffine samples
    src = M^-1 dst; that inverse is what ``ImageProjectiveTransformV3`` wants:
    x_src = c*(x-cx) + s*(y-cy) + cx, y_src = -s*(x-cx) + c*(y-cy) + cy, with c, s of the angle.
    Integer coordinates are pixel centres in both cv2 and TF. Trig in float64 so 90 degrees is
    (almost) exact.
    """
    a = tf.cast(angle_deg, tf.float64) * (math.pi / 180.0)
    c, s = tf.cos(a), tf.sin(a)
    cx = (tf.cast(width, tf.float64) - 1.0) * 0.5
    cy = (tf.cast(height, tf.float64) - 1.0) * 0.5
    zero = tf.zeros([], tf.float64)
    t = tf.stack([c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy, zero, zero])
    return tf.cast(t, tf.float32)


def rotate(x: tf.Tensor, angle_deg, *, interpolation: str = "BILINEAR", fill_value: float = 0.0) -> tf.Tensor:
    """Rotates [H, W, C] about its centre by ``angle_deg`` (positive = clockwise), constant border.

    ``interpolation``: "BILINEAR" (images, cv2 INTER_LINEAR) or "NEAREST" (labels; TF rounds the
    source coordinate to the nearest pixel as cv2's warpAffine nearest does). Output has x's
    shape and dtype (bilinear on an integer dtype is TF's, not rounded; pass float images).
    """
    shape = tf.shape(x)
    t = rotation_transform(angle_deg, shape[0], shape[1])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=t[None], output_shape=shape[:2],
        fill_value=tf.constant(fill_value, tf.float32), interpolation=interpolation, fill_mode="CONSTANT")
    return out[0]


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(x - mean) / std in float32, RGB order, as mmcv ``imnormalize`` (multiplies by 1/std)."""
    mean_t = tf.constant(mean, tf.float32)
    stdinv = tf.constant([1.0 / s for s in std], tf.float32)  # 1/std computed in float64 like mmcv
    return (tf.cast(image, tf.float32) - mean_t) * stdinv


def pad_to(x: tf.Tensor, size, value=0) -> tf.Tensor:
    """Pads [h, w, ...] at the bottom and right to ``size`` = (H, W) with ``value`` (mmcv impad)."""
    shape = tf.shape(x)
    pad_h = tf.maximum(size[0] - shape[0], 0)
    pad_w = tf.maximum(size[1] - shape[1], 0)
    paddings = [[0, pad_h], [0, pad_w]] + [[0, 0]] * (x.shape.rank - 2)
    return tf.pad(x, paddings, constant_values=tf.cast(value, x.dtype))
