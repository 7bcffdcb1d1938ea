"""Losses: the reference's dice ``BinaryLoss`` (mmseg ``binary_loss.py`` with ``smooth=1e-5``).

Per sample n and lesion class c, with sums over all pixels of that sample, p = sigmoid(logit):
``D[n, c] = 1 - (2 * sum(p * t) + eps) / (sum(p^2) + sum(t^2) + eps)``; the loss is the mean over classes,
then over samples. Background (0) and ignore (255) pixels are *negatives* for every class, not masked out,
as in the reference. Always computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def lesion_targets(labels: Array, num_classes: int = 4, dtype=jnp.float32) -> Array:
    """Label map ``[N, H, W]`` (0 background, 1..num_classes lesions, 255 ignore) -> float ``[N, H, W, K]``.

    A ``[N, H, W, K]`` input is taken as multi-label 0/1 masks already and only cast.
    """
    if labels.ndim == 4:
        return labels.astype(dtype)
    classes = jnp.arange(1, num_classes + 1, dtype=labels.dtype)
    return (labels[..., None] == classes).astype(dtype)


def dice_loss(logits: Array, labels: Array, *, smooth: float = 1e-5, mask: Array | None = None) -> Array:
    """Mean dice loss of ``logits [N, H, W, K]`` against ``labels [N, H, W]`` (or multi-label ``[N, H, W, K]``).

    ``mask [H, W]`` (or broadcastable to ``[N, H, W]``) restricts the sums to valid pixels; it is how a crop
    of traced size lives inside a fixed-size canvas without changing the value.
    """
    p = jax.nn.sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    t = lesion_targets(labels, logits.shape[-1], p.dtype)
    if mask is not None:
        m = jnp.broadcast_to(mask, p.shape[:-1])[..., None].astype(p.dtype)
        p = p * m
        t = t * m
    axes = (1, 2)
    intersection = jnp.sum(p * t, axis=axes)
    denominator = jnp.sum(p * p, axis=axes) + jnp.sum(t * t, axis=axes)
    per_class = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)   # [N, K]
    return jnp.mean(jnp.mean(per_class, axis=-1))
