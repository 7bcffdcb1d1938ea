"""The input pipeline's speed work changed nothing it computes.

* ``train_transform`` equals, bit for bit, the outputs of the pipeline as it was before the speed work
  (``fixtures/pipeline_train_transform.npz``, made by ``tests/make_pipeline_fixture.py`` at that commit):
  uint8 intermediates, the flip folded into the crop's indices and the split into a host part and a
  finishing part are pure refactorings.
* The device finish (``data.on_device.finish_batch``, jax, inside the train step) equals the TensorFlow
  finish (``pipeline.finish_example``) bit for bit: normalisation, zeroed padding, fused label / masks.
* The trainer's stream (``raw=True``) finished on the device equals the ``raw=False`` stream.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import helpers
import make_pipeline_fixture as M
from hrdecoder_jax.data import augment, on_device, pipeline as P

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_train_transform.npz")


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(FIXTURE))


def test_train_transform_unchanged_bit_for_bit(fixture):
    out = M.outputs(fixture["image"], fixture["masks"])
    assert len(out) == 4 * M.KEYS * 2
    flipped = padded = 0
    for k, v in out.items():
        ref = fixture[k]
        assert v.dtype == ref.dtype and v.shape == ref.shape, k
        np.testing.assert_array_equal(v, ref, err_msg=k)
        if k.endswith("/image") and k.startswith("default/"):
            padded += bool((v[-1] == 0).all())
    # The keys cover the cases that matter: crops smaller than the crop size (padding) and both flips.
    assert padded >= 2
    cfg = M.config({})
    for s in range(M.KEYS):
        k_flip = tf.unstack(tf.random.experimental.stateless_split(tf.constant([s, 77], tf.int64), 5))[2]
        flipped += bool(tf.random.stateless_uniform([], k_flip, dtype=tf.float64).numpy() < cfg.flip_prob)
    assert 0 < flipped < M.KEYS


def test_flip_folded_into_the_window_is_hflip():
    rng = np.random.default_rng(3)
    image = tf.constant(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for out_size, off, win in [((50, 71), (3, 5), (31, 40)), ((20, 30), (0, 0), (20, 30)), ((37, 53), (2, 1), (9, 17))]:
        a = augment.resize_bilinear_window(image, out_size, off, win)
        b = augment.resize_bilinear_window(image, out_size, off, win, flip=tf.constant(True))
        np.testing.assert_array_equal(b.numpy(), helpers.hflip(a).numpy())
        la = augment.resize_nearest_window(image[..., 0], out_size, off, win)
        lb = augment.resize_nearest_window(image[..., 0], out_size, off, win, flip=True)
        np.testing.assert_array_equal(lb.numpy(), la.numpy()[:, ::-1])


def test_to_uint8_equals_quantize():
    x = np.concatenate([np.linspace(-3, 258, 200001, dtype=np.float32),
                        np.float32([0.49999997, 0.5, 254.5, 254.49998, 255.0, 255.5, -0.5, 1e9, -1e9]),
                        np.arange(256, dtype=np.float32) + np.float32(0.5)])
    q = augment.quantize_uint8(tf.constant(x)).numpy()
    u = augment.to_uint8(tf.constant(x)).numpy()
    assert u.dtype == np.uint8
    np.testing.assert_array_equal(u.astype(np.float32), q)


@pytest.mark.parametrize("label_mode", ["overwrite", "multilabel"])
@pytest.mark.parametrize("quantize", [True, False])
def test_device_finish_equals_tensorflow_finish(fixture, label_mode, quantize):
    cfg = M.config({"label_mode": label_mode, "quantize_uint8": quantize})
    packed_in = augment.pack_masks(tf.constant(fixture["masks"]))
    raws = [P.train_transform_raw(tf.constant(fixture["image"]), packed_in, tf.constant([s, 5], tf.int64), cfg)
            for s in range(8)]
    assert raws[0]["image"].dtype == (tf.uint8 if quantize else tf.float32)
    host = [P.finish_example(r, cfg) for r in raws]
    batch = {k: np.stack([r[k].numpy() for r in raws]) for k in ("image", "packed", "valid")}
    assert (batch["valid"] < M.CROP).any()          # some crops are padded
    finish = jax.jit(on_device.make_finish(cfg))
    img, lab = finish({"image": batch["image"], "valid": batch["valid"]}, batch["packed"])
    key = "label" if label_mode == "overwrite" else "masks"
    np.testing.assert_array_equal(np.asarray(img), np.stack([h["image"].numpy() for h in host]))
    ref = np.stack([h[key].numpy() for h in host])
    assert np.asarray(lab).dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(lab), ref)


def test_device_label_table_every_packed_value():
    packed = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    valid = np.int32([[4, 4]])
    image = np.zeros((1, 4, 4, 3), np.uint8)
    _, lab = on_device.finish_batch(image, packed, valid, mean=(0, 0, 0), std=(1, 1, 1))
    # Hand table: the highest set bit of EX=1, HE=2, SE=4, MA=8 wins.
    expected = [0, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]
    np.testing.assert_array_equal(np.asarray(lab).ravel(), expected)
    _, masks = on_device.finish_batch(image, packed, valid, mean=(0, 0, 0), std=(1, 1, 1), label_mode="multilabel")
    np.testing.assert_array_equal(np.asarray(masks).reshape(16, 4), [[(v >> k) & 1 for k in range(4)] for v in range(16)])


def test_raw_stream_finished_on_device_equals_host_stream(fixture):
    cfg = M.config({})
    cfg.num_parallel_calls = 2
    image, masks = fixture["image"], fixture["masks"]
    ds = tf.data.Dataset.from_tensor_slices({"image": np.stack([image, image[::-1]]),
                                             "masks": np.stack([masks, masks[::-1]]), "name": ["a", "b"]})
    host = P.make_train_dataset(ds, cfg, global_batch_size=2, seed=4, process_index=0, process_count=1)
    raw = P.make_train_dataset(ds, cfg, global_batch_size=2, seed=4, process_index=0, process_count=1, raw=True)
    finish = jax.jit(on_device.make_finish(cfg))
    for _ in range(3):
        h, r = next(host), next(raw)
        assert r["image"].dtype == np.uint8 and r["packed"].dtype == np.uint8
        img, lab = finish({"image": r["image"], "valid": r["valid"]}, r["packed"])
        np.testing.assert_array_equal(np.asarray(img), h["image"])
        np.testing.assert_array_equal(np.asarray(lab), h["label"])


def test_finish_inside_the_train_step_has_no_gather():
    """The finishing ops add no gather to the step (the label table is selects)."""
    cfg = M.config({})
    hlo = jax.jit(on_device.make_finish(cfg)).lower(
        {"image": jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.uint8), "valid": jax.ShapeDtypeStruct((2, 2), jnp.int32)},
        jax.ShapeDtypeStruct((2, 8, 8), jnp.uint8)).as_text()
    assert "gather" not in hlo and "scatter" not in hlo
