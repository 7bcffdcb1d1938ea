"""Full-image inference: whole-image or sliding-window logits, optional flip TTA, resize to the original size.

The reference (``EncoderDecoder.slide_inference`` + ``LesionEncoderDecoder``): windows of ``crop_size`` with
``stride`` (the last ones shifted inward), each run through the model's ``encode_decode``; logits are
summed and divided by the per-pixel window count (an average of *logits*, before the sigmoid); the map is
then resized bilinearly to the original image size and the sigmoid comes last.

``model.test_cfg.weighting='gaussian'`` (not in the reference; ``'uniform'``, the reference's average, is the
default) weights every window by MONAI's importance map instead (``gaussian_importance_map``): the result is
``sum(w * logits) / sum(w)`` over the windows covering a pixel, so a window's border, where its view of the
image ends, counts less than another window's centre.

Windows are independent in eval mode (BN uses running statistics), so they run as one batch (or in chunks
of ``window_batch``) through one compiled forward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hrdecoder_jax.config_utils import DEFAULT_SIGMA_SCALE, DEFAULT_WEIGHTING, window_weighting
from hrdecoder_jax.models.resize import resize_bilinear
from hrdecoder_jax.models.segmentor import slide_windows

Array = jax.Array


class Forward:
    """A jitted ``images [B, H, W, 3] -> logits [B, H, W, K]`` of a model in its current mode (call
    ``model.eval()`` first), with the model's state captured when it was made. Compiled once per input
    shape; ``lower(images)`` exposes the compilation (memory and cost analysis)."""

    def __init__(self, model: nnx.Module):
        graphdef, self.state = nnx.split(model)
        self.jitted = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))

    def __call__(self, images: Array) -> Array:
        return self.jitted(self.state, images)

    def lower(self, images):
        return self.jitted.lower(self.state, images)

    def compilations(self) -> int:
        return self.jitted._cache_size()


def make_forward(model: nnx.Module) -> Forward:
    """The compiled forward of ``model`` (see ``Forward``)."""
    return Forward(model)


def _forward_fn(model_or_forward) -> Callable[[Array], Array]:
    return model_or_forward if not isinstance(model_or_forward, nnx.Module) else make_forward(model_or_forward)


def _with_flip(forward: Callable, images: Array, flip: bool) -> Array:
    logits = forward(images)
    if flip:  # horizontal-flip TTA: average the logits of the image and of its mirror
        logits = (logits + jnp.flip(forward(jnp.flip(images, axis=2)), axis=2)) / 2
    return logits


def whole_inference(model, images: Array, *, flip: bool = False) -> Array:
    """Logits ``[B, H, W, K]`` of the whole images (the model resizes internally as it needs)."""
    return _with_flip(_forward_fn(model), images, flip)


def gaussian_importance_map(window: Sequence[int], sigma_scale: float = DEFAULT_SIGMA_SCALE) -> np.ndarray:
    """MONAI's Gaussian importance map of a window ``(h, w)`` (``compute_importance_map(mode='gaussian')``),
    float64 ``[h, w]``: per axis ``exp(-x^2 / (2 sigma^2))`` with ``sigma = sigma_scale * size`` and ``x`` the
    distance from the window's centre (``(size - 1) / 2``), the product over the axes, and every weight below
    ``max(min(map), 1e-3)`` raised to it (MONAI's floor: far corners still count a little, so every pixel a
    window covers has a positive total weight)."""
    weights = np.ones((), np.float64)
    for size in window:
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        sigma = sigma_scale * size
        weights = weights[..., None] * np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return np.maximum(weights, max(weights.min(), 1e-3))


def slide_inference(model, images: Array, crop_size: Sequence[int], stride: Sequence[int], *,
                    flip: bool = False, window_batch: int | None = None, weighting: str = DEFAULT_WEIGHTING,
                    sigma_scale: float = DEFAULT_SIGMA_SCALE) -> Array:
    """Sliding-window logits ``[B, H, W, K]`` averaged where windows overlap, as the reference
    (``weighting='uniform'``), or weighted by ``gaussian_importance_map(crop_size, sigma_scale)``
    (``weighting='gaussian'``).

    ``model``: an ``nnx.Module`` (in eval mode) or a forward function from ``make_forward``. Traceable (the
    windows are static): ``jax.jit`` or ``jax.export`` it, with a symbolic batch size when ``window_batch``
    is None (one call for all windows).
    """
    window_weighting({"weighting": weighting, "sigma_scale": sigma_scale})
    forward = _forward_fn(model)
    b, h, w, _ = images.shape
    if h < crop_size[0] or w < crop_size[1]:
        raise ValueError(f"image {h}x{w} is smaller than the slide window {tuple(crop_size)}: "
                         "resize it to the test scale first")
    boxes = slide_windows((h, w), crop_size, stride)
    crops = jnp.concatenate([images[:, y1:y2, x1:x2] for (y1, y2, x1, x2) in boxes], axis=0)  # window-major
    if not window_batch:
        outs = [_with_flip(forward, crops, flip)]
    else:
        outs = [_with_flip(forward, crops[i:i + window_batch], flip)
                for i in range(0, crops.shape[0], window_batch)]
    logits = jnp.concatenate(outs, axis=0).reshape(len(boxes), b, *crop_size, -1)
    total = jnp.zeros((b, h, w, logits.shape[-1]), logits.dtype)
    if weighting == "gaussian":
        importance = gaussian_importance_map(crop_size, sigma_scale)
        weight = jnp.asarray(importance, logits.dtype)[None, :, :, None]
        norm = np.zeros((h, w), np.float64)
        for logit, (y1, y2, x1, x2) in zip(logits, boxes):
            window = jax.lax.slice(total, (0, y1, x1, 0), (b, y2, x2, total.shape[-1]))
            total = jax.lax.dynamic_update_slice(total, window + logit * weight, (0, y1, x1, 0))
            norm[y1:y2, x1:x2] += importance
        return total / jnp.asarray(norm, logits.dtype)[None, :, :, None]
    count = np.zeros((h, w), np.float32)
    for logit, (y1, y2, x1, x2) in zip(logits, boxes):
        window = jax.lax.slice(total, (0, y1, x1, 0), (b, y2, x2, total.shape[-1]))
        total = jax.lax.dynamic_update_slice(total, window + logit, (0, y1, x1, 0))
        count[y1:y2, x1:x2] += 1
    return total / jnp.asarray(count)[None, :, :, None]


def inference(model, images: Array, test_cfg, *, window_batch: int | None = None) -> Array:
    """Logits ``[B, H, W, K]`` at the input size, by ``test_cfg.mode`` ('slide' or 'whole'; slide windows
    blended by ``test_cfg.weighting``)."""
    flip = bool(test_cfg.get("flip", False))
    weighting, sigma_scale = window_weighting(test_cfg)
    if test_cfg["mode"] == "slide":
        return slide_inference(model, images, test_cfg["crop_size"], test_cfg["stride"], flip=flip,
                               window_batch=window_batch, weighting=weighting, sigma_scale=sigma_scale)
    if test_cfg["mode"] == "whole":
        return whole_inference(model, images, flip=flip)
    raise ValueError(f"model.test_cfg.mode must be 'slide' or 'whole', got {test_cfg['mode']!r}")


@jax.jit
def _resize_sigmoid(logits: Array, size_holder: Array) -> Array:
    return jax.nn.sigmoid(resize_bilinear(logits, size_holder.shape))


def probabilities(logits: Array, original_size: Sequence[int]) -> Array:
    """Resize logits ``[B, h, w, K]`` to ``original_size`` (bilinear, align_corners=False) and apply the
    sigmoid: per-lesion probabilities ``[B, H0, W0, K]``, as the reference's final step."""
    return _resize_sigmoid(logits, jnp.zeros(tuple(int(s) for s in original_size), jnp.bool_))
