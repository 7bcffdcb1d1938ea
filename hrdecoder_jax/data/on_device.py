"""The last steps of the training augmentation, on the accelerator: normalise, zero the padding, build the label.

The host pipeline (``pipeline.train_transform_raw``) hands over the raw crop: the image as uint8 (4x fewer
bytes to produce, batch and copy than float32), the packed lesion bits and each crop's size before padding.
``finish_batch`` is the twin of ``pipeline.finish_example`` in jax: the same float32 operations in the same
order, so the model sees bit for bit what the TensorFlow version would give it (tested). Inside the jitted
train step it fuses into the step's first reads and costs no extra pass. Pure jax: no gather (the label
table is a chain of selects on the packed bits).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def finish_batch(image, packed, valid, *, mean, std, label_mode: str = "overwrite"):
    """Raw crops -> ``(images float32 [b, h, w, 3], labels)``.

    Args:
      image: uint8 (or float32) [b, h, w, 3] raw RGB, as ``train_transform_raw`` returns it.
      packed: uint8 [b, h, w] packed masks (bit k = lesion k of EX, HE, SE, MA).
      valid: int32 [b, 2] rows and columns of each crop before padding; pixels outside are 0.
      mean, std: the normalisation (RGB), ``(x - mean) * (1 / std)`` with 1/std rounded from float64.
      label_mode: "overwrite" -> int32 [b, h, w] fused label (MA > SE > HE > EX > background);
        "multilabel" -> uint8 [b, h, w, 4] masks (``config_utils.LABEL_MODES``, checked by the config's
        validation).
    """
    mean_t = jnp.asarray(np.asarray(mean, np.float32))
    stdinv = jnp.asarray(np.asarray([1.0 / float(s) for s in std], np.float32))
    img = (image.astype(jnp.float32) - mean_t) * stdinv
    h, w = image.shape[1], image.shape[2]
    inside = ((jnp.arange(h)[None, :, None] < valid[:, 0, None, None])
              & (jnp.arange(w)[None, None, :] < valid[:, 1, None, None]))
    img = jnp.where(inside[..., None], img, jnp.zeros((), jnp.float32))
    p = packed.astype(jnp.int32)
    if label_mode == "multilabel":
        return img, ((p[..., None] >> jnp.arange(4)) & 1).astype(jnp.uint8)
    label = jnp.zeros(p.shape, jnp.int32)
    for k in range(4):                       # later lesions overwrite earlier ones: the highest set bit wins
        label = jnp.where(((p >> k) & 1) == 1, k + 1, label)
    return img, label


def make_finish(data_config):
    """``finish(raw, packed) -> (images, labels)`` for ``train_step.make_train_step(finish=...)``, where
    ``raw = {"image", "valid"}`` and ``packed`` are the host batch's arrays."""
    mean, std = tuple(data_config.mean), tuple(data_config.std)
    label_mode = str(data_config.label_mode)

    def finish(raw, packed):
        return finish_batch(raw["image"], packed, raw["valid"], mean=mean, std=std, label_mode=label_mode)

    return finish
