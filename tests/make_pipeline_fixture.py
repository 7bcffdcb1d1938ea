"""Writes tests/fixtures/pipeline_train_transform.npz: outputs of ``pipeline.train_transform`` for fixed keys.

The fixture pins what the training augmentation computes, bit for bit, so speed work on the pipeline
(uint8 intermediates, the flip folded into the crop's indices, normalisation on the device) can prove
it changed nothing. Run from the repository root: ``python tests/make_pipeline_fixture.py``.
"""
import os

import numpy as np
import tensorflow as tf

from hrdecoder_jax.data import augment, pipeline as P

H, W, CROP, KEYS = 40, 60, 32, 16
# Config cases: (name, overrides). ratio_range (0.5, 2.0) makes crops smaller than CROP (padding).
CASES = {
    "default": {},
    "float": {"quantize_uint8": False},
    "multilabel": {"label_mode": "multilabel"},
    "noflip_norot": {"flip_prob": 0.0, "rotate_prob": 0.0},
}


def inputs():
    rng = np.random.default_rng(20261201)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    masks = np.zeros((H, W, 4), np.uint8)
    for k in range(4):
        for _ in range(3):
            y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
            masks[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12), k] = 1
    return image, masks


def config(overrides):
    cfg = P.default_data_config()
    cfg.img_scale = (W, H)
    cfg.crop_size = (CROP, CROP)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def outputs(image, masks):
    packed = augment.pack_masks(tf.constant(masks))
    out = {}
    for name, overrides in CASES.items():
        cfg = config(overrides)
        for s in range(KEYS):
            res = P.train_transform(tf.constant(image), packed, tf.constant([s, 77], tf.int64), cfg)
            for k, v in res.items():
                out[f"{name}/{s}/{k}"] = v.numpy()
    return out


if __name__ == "__main__":
    image, masks = inputs()
    path = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_train_transform.npz")
    np.savez_compressed(path, image=image, masks=masks, **outputs(image, masks))
    print(f"wrote {path}")
