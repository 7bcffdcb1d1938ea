"""Tests of the tf.data pipelines (hrdecoder_jax/data/{augment,pipeline}.py) on tiny synthetic images.

Conventions checked against hand-computed values: mmcv imrescale sizes, cv2 INTER_NEAREST
(floor(dst * in/out)), half-pixel bilinear without antialias, clockwise-positive rotation about
((w-1)/2, (h-1)/2), mmseg RandomCrop's cat_max_ratio re-draws, the overwrite order of the masks,
the border values (rotation: raw 0 -> -mean/std; pad: 0 after normalisation; label 0), and the
stream properties (determinism, start_step resumption, process shards, epoch permutations).
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

H, W, N = 48, 64, 6  # tiny images; 6 examples so a few steps cross epoch boundaries
CROP = 32


def fuse_np(masks: np.ndarray) -> np.ndarray:
    """Reference fused label: later classes of (EX, HE, SE, MA) overwrite earlier ones."""
    label = np.zeros(masks.shape[:-1], np.int32)
    for k in range(4):
        label[masks[..., k] > 0] = k + 1
    return label


def mmcv_rescale_size(h, w, scale_wh, r):
    """Direct transcription of mmseg Resize(ratio_range) + mmcv rescale_size, in Python floats."""
    target = (int(scale_wh[0] * r), int(scale_wh[1] * r))
    f = min(max(target) / max(h, w), min(target) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def blob_masks(rng, h=H, w=W) -> np.ndarray:
    """Masks uint8 [h, w, 4] made of overlapping rectangles (>= 8 px), so labels form regions."""
    masks = np.zeros((h, w, 4), np.uint8)
    for k in range(4):
        for _ in range(2):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            masks[y:y + rng.integers(8, 16), x:x + rng.integers(8, 16), k] = 1
    return masks


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    masks = np.stack([blob_masks(rng) for _ in range(N)])
    label = fuse_np(masks)
    # The red channel encodes the fused label (40 per class), so alignment is checkable after
    # augmentation; green/blue are noise.
    images = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    images[..., 0] = 40 * label
    names = [f"img{i:02d}" for i in range(N)]
    return {"image": images, "masks": masks, "name": names}


@pytest.fixture(scope="module")
def ds(data):
    return tf.data.Dataset.from_tensor_slices(data)


def small_config(**kw):
    cfg = P.default_data_config()
    cfg.img_scale = (W, H)
    cfg.crop_size = (CROP, CROP)
    cfg.test_scale = (W // 2, H // 2)
    cfg.num_parallel_calls = 2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def denorm(img, cfg):
    return img * np.asarray(cfg.std, np.float32) + np.asarray(cfg.mean, np.float32)


# --------------------------------------------------------------------------- labels


def test_overwrite_order_and_packing():
    combos = np.array([[(v >> k) & 1 for k in range(4)] for v in range(16)], np.uint8)  # [16, 4]
    masks = combos[None]  # [1, 16, 4]
    label = helpers.fuse_masks(tf.constant(masks)).numpy()
    np.testing.assert_array_equal(label, fuse_np(masks))
    # Spot checks: EX+HE -> HE, HE+SE -> SE, everything -> MA, EX alone -> EX.
    assert label[0, 0b0011] == 2 and label[0, 0b0110] == 3 and label[0, 0b1111] == 4 and label[0, 0b0001] == 1
    np.testing.assert_array_equal(augment.unpack_masks(augment.pack_masks(tf.constant(masks))).numpy(), masks)
    # Crop-acceptance counts from the packed map equal the counts of the fused label.
    packed = np.random.default_rng(5).integers(0, 16, (20, 30)).astype(np.uint8)
    np.testing.assert_array_equal(augment.fused_counts_from_packed(tf.constant(packed)).numpy(),
                                  np.bincount(augment.packed_to_label(tf.constant(packed)).numpy().ravel(), minlength=5))


# --------------------------------------------------------------------------- resize


def test_rescale_size_hand_cases():
    # IDRiD 4288x2848 at r=1: f = min(2880/4288, 1920/2848) = 0.67164 -> 2880 x 1913 (mmcv rescale_size).
    assert tuple(int(v) for v in augment.rescale_size(2848, 4288, (2880, 1920), 1.0)) == (1913, 2880)
    # r=0.5: target (1440, 960), f = 1440/4288 -> w 1440, h int(956.42 + 0.5) = 956.
    assert tuple(int(v) for v in augment.rescale_size(2848, 4288, (2880, 1920), 0.5)) == (956, 1440)
    # DDR-like 2000x1500 to (2048, 2048): f = min(2048/2000, 2048/1500) = 1.024 -> 2048 x 1536.
    assert tuple(int(v) for v in augment.rescale_size(1500, 2000, (2048, 2048), 1.0)) == (1536, 2048)
    rng = np.random.default_rng(1)
    for r in rng.uniform(0.5, 2.0, 50):
        for h, w, s in [(2848, 4288, (2880, 1920)), (1300, 1950, (2048, 2048)), (H, W, (W, H))]:
            got = tuple(int(v) for v in augment.rescale_size(h, w, s, r))
            assert got == mmcv_rescale_size(h, w, s, float(r)), (h, w, s, r)


def test_nearest_matches_cv2_inter_nearest():
    # 5 -> 3: src = floor(dst * 5/3) = [0, 1, 3] (half-pixel nearest would give [0, 2, 4]).
    np.testing.assert_array_equal(augment.nearest_indices(5, 3).numpy(), [0, 1, 3])
    # 2 -> 5: src = floor(dst * 0.4) = [0, 0, 0, 1, 1].
    np.testing.assert_array_equal(augment.nearest_indices(2, 5).numpy(), [0, 0, 0, 1, 1])
    lab = tf.constant(np.arange(15, dtype=np.uint8).reshape(3, 5))
    out = helpers.resize_nearest(lab, (5, 3)).numpy()
    rows, cols = [0, 0, 1, 1, 2], [0, 1, 3]  # 3 -> 5: floor(dst * 0.6)
    np.testing.assert_array_equal(out, lab.numpy()[np.ix_(rows, cols)])
    assert out.dtype == np.uint8


def test_bilinear_matches_half_pixel_formula():
    # 4 -> 2: src = (dst + 0.5) * 2 - 0.5 = 0.5, 2.5 -> [5, 25].
    x = tf.constant([[0.0, 10.0, 20.0, 30.0]])[..., None]  # [1, 4, 1]
    np.testing.assert_allclose(augment.resize_bilinear(x, (1, 2)).numpy()[0, :, 0], [5.0, 25.0])
    # 2 -> 4: src = -0.25 (clamp 0), 0.25, 0.75, 1.25 (clamp 1) -> [0, 2, 6, 8].
    x = tf.constant([[0.0, 8.0]])[..., None]
    np.testing.assert_allclose(augment.resize_bilinear(x, (1, 4)).numpy()[0, :, 0], [0.0, 2.0, 6.0, 8.0])
    # Same as tf.image.resize(antialias=False) for down- and upsampling; windows equal crops.
    img = tf.constant(np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8))
    for size in [(20, 27), (48, 64), (97, 130)]:
        full = augment.resize_bilinear(img, size).numpy()
        ref = tf.image.resize(tf.cast(img, tf.float32), size, method="bilinear", antialias=False).numpy()
        np.testing.assert_allclose(full, ref, atol=2e-3)
        win = augment.resize_bilinear_window(img, size, (3, 5), (size[0] - 7, size[1] - 9)).numpy()
        np.testing.assert_allclose(win, full[3:size[0] - 4, 5:size[1] - 4], atol=1e-4)


def test_nonzero_count_of_nearest_window():
    lab = (np.random.default_rng(6).random((H, W)) < 0.3).astype(np.uint8) * 7
    for size, off, win in [((97, 130), (10, 20), (40, 50)), ((20, 27), (3, 4), (15, 20)), ((H, W), (0, 0), (H, W))]:
        rows = augment.nearest_indices(H, size[0])[off[0]:off[0] + win[0]]
        cols = augment.nearest_indices(W, size[1])[off[1]:off[1] + win[1]]
        expect = np.count_nonzero(lab[np.ix_(rows.numpy(), cols.numpy())])
        assert int(augment.nonzero_count_nearest_window(tf.constant(lab), rows, cols)) == expect


def test_resize_ops_inside_tf_data(data):
    d = tf.data.Dataset.from_tensor_slices({"image": data["image"][:2], "masks": data["masks"][:2]})

    def f(ex):
        return {"img": augment.resize_bilinear(ex["image"], (30, 41)),
                "lab": helpers.resize_nearest(augment.pack_masks(ex["masks"]), (71, 97))}

    for i, out in enumerate(d.map(f).as_numpy_iterator()):
        np.testing.assert_array_equal(out["img"], augment.resize_bilinear(tf.constant(data["image"][i]), (30, 41)).numpy())
        rows, cols = augment.nearest_indices(H, 71).numpy(), augment.nearest_indices(W, 97).numpy()
        expect = augment.pack_masks(tf.constant(data["masks"][i])).numpy()[np.ix_(rows, cols)]
        np.testing.assert_array_equal(out["lab"], expect)


# --------------------------------------------------------------------------- rotation, flip


def test_rotation_positive_is_clockwise():
    x = np.arange(25, dtype=np.float32).reshape(5, 5, 1)
    out = augment.rotate(tf.constant(x), 90.0).numpy()
    np.testing.assert_allclose(out, np.rot90(x, k=-1), atol=1e-4)  # k=-1: clockwise
    # A marker at the top centre ends at the right centre (clockwise on screen, y down).
    m = np.zeros((7, 7, 1), np.uint8)
    m[0, 3] = 1
    out = augment.rotate(tf.constant(m), 90.0, interpolation="NEAREST").numpy()
    assert out[3, 6, 0] == 1 and out.sum() == 1 and out.dtype == np.uint8
    # Same op inside tf.data.
    mapped = next(tf.data.Dataset.from_tensors(x).map(lambda t: augment.rotate(t, -90.0)).as_numpy_iterator())
    np.testing.assert_allclose(mapped, np.rot90(x, k=1), atol=1e-4)


def test_rotation_border_and_label_values():
    rng = np.random.default_rng(3)
    lab = rng.integers(1, 5, (9, 12, 1)).astype(np.uint8)
    out = augment.rotate(tf.constant(lab), 30.0, interpolation="NEAREST").numpy()
    assert set(np.unique(out)) <= {0, 1, 2, 3, 4}  # only old values plus border 0
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 0  # corners come from outside
    img = augment.rotate(tf.ones((9, 12, 3)) * 100.0, 30.0).numpy()
    assert img[0, 0, 0] == 0.0 and img[4, 6, 0] == pytest.approx(100.0)
    np.testing.assert_array_equal(helpers.hflip(tf.constant(lab)).numpy(), lab[:, ::-1])


# --------------------------------------------------------------------------- crop


def mmseg_select(draws, label, crop, cat_max_ratio, ignore=255):
    """mmseg RandomCrop.__call__ on precomputed draws (draw 0 plus up to 10 re-draws)."""
    ch, cw = crop
    bbox = draws[0]
    for j in range(10):
        seg = label[bbox[0]:bbox[0] + ch, bbox[1]:bbox[1] + cw]
        vals, cnt = np.unique(seg, return_counts=True)
        cnt = cnt[vals != ignore]
        if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
            break
        bbox = draws[j + 1]
    return tuple(bbox)


def test_cat_max_ratio_redraws_match_mmseg():
    label = np.zeros((60, 70), np.int32)
    label[:, 50:] = 1
    label[40:, 55:] = 2
    label[45:50, :20] = 255
    crop = (24, 24)
    for s in range(25):
        key = tf.constant([s, 7], tf.int64)
        draws = [tuple(augment.crop_offset(tf.random.experimental.stateless_fold_in(key, np.int64(k)),
                                       (60, 70), crop).numpy()) for k in range(11)]
        got = tuple(augment.select_crop(key, (60, 70), crop, lambda y, x: helpers.value_counts(label[y:y + 24, x:x + 24]),
                                    0.75).numpy())
        assert got == mmseg_select(draws, label, crop, 0.75), s
    # The cheap background pre-test (used by the pipeline) never changes the choice.
    lab2 = np.where(label == 255, 3, label)
    rows, cols = tf.range(60), tf.range(70)

    def bg_reject(y, x):
        nz = augment.nonzero_count_nearest_window(lab2, rows[y:y + 24], cols[x:x + 24])
        return tf.logical_or(nz == 0, tf.cast(576 - nz, tf.float64) / 576.0 >= 0.75)

    for s in range(25):
        key = tf.constant([s, 8], tf.int64)
        counts = lambda y, x: helpers.value_counts(lab2[y:y + 24, x:x + 24])  # noqa: E731
        np.testing.assert_array_equal(augment.select_crop(key, (60, 70), crop, counts, 0.75, reject_fn=bg_reject),
                                      augment.select_crop(key, (60, 70), crop, counts, 0.75))
    # All draws fail on a one-class label: the 11th draw is used.
    zeros = np.zeros((60, 70), np.int32)
    key = tf.constant([1, 2], tf.int64)
    last = augment.crop_offset(tf.random.experimental.stateless_fold_in(key, np.int64(10)), (60, 70), crop).numpy()
    got = augment.select_crop(key, (60, 70), crop, lambda y, x: helpers.value_counts(zeros[y:y + 24, x:x + 24]), 0.75).numpy()
    np.testing.assert_array_equal(got, last)
    # Crop larger than the image: offset 0.
    np.testing.assert_array_equal(augment.crop_offset(key, (10, 12), crop).numpy(), [0, 0])


# --------------------------------------------------------------------------- train transform


def test_train_transform_alignment_exact_90(data):
    """No resize, 90-degree rotation: image and label must coincide pixel for pixel."""
    cfg = small_config(ratio_range=None, rotate_degree=(90.0, 90.0))
    for i in range(4):
        key = tf.constant([i, 0], tf.int64)
        packed = augment.pack_masks(tf.constant(data["masks"][i]))
        out = P.train_transform(tf.constant(data["image"][i]), packed, key, cfg)
        raw = np.round(denorm(out["image"].numpy(), cfg))
        np.testing.assert_array_equal(raw[..., 0], 40 * out["label"].numpy())
        # The crop really is a rotated window of the input: every output label row is a column.
        assert out["label"].shape == (CROP, CROP)


def quadrant_example():
    """Image/masks [H, W] with four large label regions (boundaries at y=30, x=20); red = 40 * label."""
    yy, xx = np.mgrid[:H, :W]
    label = 1 + 2 * (yy >= 30) + (xx >= 20)  # 1 2 / 3 4, asymmetric so flips are visible
    masks = np.stack([(label == k + 1) for k in range(4)], -1).astype(np.uint8)
    image = np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8)
    image[..., 0] = 40 * label
    return image, masks


def test_train_transform_alignment_resize_rotate_eager_vs_tf_data():
    """Full augmentation (resize, crop, flip, any angle): aligned eagerly and inside tf.data."""
    image, masks = quadrant_example()
    cfg = small_config()
    d = tf.data.Dataset.from_tensors({"image": image, "masks": masks}).repeat(8)

    def fn(k, ex):
        return P.train_transform(ex["image"], augment.pack_masks(ex["masks"]), tf.stack([k, 5]), cfg)

    mapped = list(d.enumerate().map(fn).as_numpy_iterator())
    margins = []
    for i, out in enumerate(mapped):
        eager = fn(tf.constant(i, tf.int64), {"image": tf.constant(image), "masks": tf.constant(masks)})
        np.testing.assert_array_equal(out["label"], eager["label"].numpy())
        np.testing.assert_allclose(out["image"], eager["image"].numpy(), atol=1e-5)
        label = out["label"]
        assert out["image"].shape == (CROP, CROP, 3) and label.dtype == np.int32
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4}  # old values plus border 0
        # Bilinear image vs nearest label differ only along region edges (cv2's INTER_NEAREST is
        # not half-pixel, so by up to a pixel): nearly all pixels agree, a flipped label does not.
        valid = ~(out["image"] == 0).all(-1)  # pad pixels are 0 after normalisation, label 0
        red = np.round(denorm(out["image"], cfg)[..., 0] / 40.0)
        agree = np.mean((red == label)[valid])
        assert agree > 0.85, (i, agree)
        margins.append(agree - np.mean((red == label[:, ::-1])[valid]))
    assert np.mean(margins) > 0.2, margins


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_crop_and_flip_are_exact_windows(flip):
    """Without resize and rotation, the output is an exact (flipped) window of the input."""
    image, masks = quadrant_example()
    label = fuse_np(masks)
    cfg = small_config(ratio_range=None, rotate_prob=0.0, flip_prob=flip)
    for s in range(3):
        out = P.train_transform(tf.constant(image), augment.pack_masks(tf.constant(masks)),
                                tf.constant([s, 9], tf.int64), cfg)
        lab = out["label"].numpy()
        raw = np.round(denorm(out["image"].numpy(), cfg)).astype(np.int64)
        if flip:
            lab, raw = lab[:, ::-1], raw[:, ::-1]
        hits = [(y, x) for y in range(H - CROP + 1) for x in range(W - CROP + 1)
                if np.array_equal(raw, image[y:y + CROP, x:x + CROP])]
        assert len(hits) == 1  # the noise channels make the window unique
        y, x = hits[0]
        np.testing.assert_array_equal(lab, label[y:y + CROP, x:x + CROP])


def test_border_and_pad_values():
    """Rotation border = raw 0 (-> -mean/std), pad = 0 after normalisation, label border/pad = 0."""
    cfg = small_config(img_scale=(24, 24), ratio_range=None, rotate_degree=(40.0, 45.0))
    image = tf.fill([24, 24, 3], tf.constant(200, tf.uint8))
    packed = tf.ones([24, 24], tf.uint8)  # EX everywhere
    out = P.train_transform(image, packed, tf.constant([3, 4], tf.int64), cfg)
    img, lab = out["image"].numpy(), out["label"].numpy()
    mean, std = np.array(cfg.mean, np.float32), np.array(cfg.std, np.float32)
    np.testing.assert_allclose(img[0, 0], -mean / std, rtol=1e-5)  # rotated-in corner
    assert lab[0, 0] == 0
    np.testing.assert_allclose(img[12, 12], (200 - mean) / std, rtol=1e-5)
    assert lab[12, 12] == 1
    np.testing.assert_array_equal(img[24:], 0.0)  # pad bottom
    np.testing.assert_array_equal(img[:, 24:], 0.0)  # pad right
    assert not lab[24:].any() and not lab[:, 24:].any()


# --------------------------------------------------------------------------- stream


@pytest.fixture(scope="module")
def full_run(ds):
    cfg = small_config()
    it = P.make_train_dataset(ds, cfg, global_batch_size=4, seed=11, process_index=0, process_count=1)
    return [next(it) for _ in range(5)]  # 20 positions = 3.3 epochs of 6


def test_batches_shapes_and_determinism(ds, full_run):
    b = full_run[0]
    assert b["image"].shape == (4, CROP, CROP, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4, CROP, CROP) and b["label"].dtype == np.int32
    again = next(P.make_train_dataset(ds, small_config(), global_batch_size=4, seed=11, process_index=0,
                                      process_count=1))
    np.testing.assert_array_equal(again["image"], b["image"])
    other = next(P.make_train_dataset(ds, small_config(), global_batch_size=4, seed=12, process_index=0,
                                      process_count=1))
    assert not np.array_equal(other["image"], b["image"])


def test_start_step_resumption(ds, full_run):
    it = P.make_train_dataset(ds, small_config(), global_batch_size=4, seed=11, start_step=3,
                              process_index=0, process_count=1)
    for step in (3, 4):
        got = next(it)
        np.testing.assert_array_equal(got["image"], full_run[step]["image"])
        np.testing.assert_array_equal(got["label"], full_run[step]["label"])


def test_process_shards_form_global_batch(ds, full_run):
    shards = [P.make_train_dataset(ds, small_config(), global_batch_size=4, seed=11, process_index=p,
                                   process_count=2) for p in range(2)]
    for step in range(3):
        parts = [next(s) for s in shards]
        assert parts[0]["image"].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), full_run[step]["image"])
        np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), full_run[step]["label"])
    # Index level: shards partition every global batch; each epoch is a permutation of 0..N-1.
    kw = dict(global_batch_size=4, seed=11, num_steps=9)
    one = helpers.train_example_indices(N, **kw)
    two = [helpers.train_example_indices(N, process_index=p, process_count=2, **kw) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(two, axis=1), one)
    epochs = one.reshape(-1, N)  # 36 positions = 6 epochs
    for e in epochs:
        assert sorted(e) == list(range(N))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch


def test_multilabel_mode_matches_overwrite(ds, full_run):
    it = P.make_train_dataset(ds, small_config(label_mode="multilabel"), global_batch_size=4, seed=11,
                              process_index=0, process_count=1)
    b = next(it)
    assert "label" not in b and b["masks"].shape == (4, CROP, CROP, 4) and b["masks"].dtype == np.uint8
    np.testing.assert_array_equal(fuse_np(b["masks"]), full_run[0]["label"])
    np.testing.assert_array_equal(b["image"], full_run[0]["image"])


def test_file_cache_matches_memory(ds, full_run, tmp_path):
    cfg = small_config(cache=str(tmp_path / "cache"))
    for _ in range(2):  # second pass reuses the written files
        it = P.make_train_dataset(ds, cfg, global_batch_size=4, seed=11, process_index=0, process_count=1)
        for step in range(2):
            got = next(it)
            np.testing.assert_array_equal(got["image"], full_run[step]["image"])
            np.testing.assert_array_equal(got["label"], full_run[step]["label"])
    assert len(list((tmp_path / "cache").glob("*/_COMPLETE"))) == 1   # one sub-folder, keyed by its data, reused


# --------------------------------------------------------------------------- eval, split


def test_eval_pipeline(data, ds):
    cfg = small_config()
    outs = list(P.make_eval_dataset(ds, cfg))
    assert len(outs) == N
    for i, o in enumerate(outs):
        assert o["image"].shape == (1, H // 2, W // 2, 3) and o["image"].dtype == np.float32
        np.testing.assert_array_equal(o["label"][0], fuse_np(data["masks"][i]))  # original resolution
        np.testing.assert_array_equal(o["orig_size"][0], [H, W])
        assert o["name"][0].decode() == data["name"][i]
        ref = tf.image.resize(tf.cast(data["image"][i], tf.float32), (H // 2, W // 2), antialias=False)
        ref = augment.normalize(augment.quantize_uint8(ref), cfg.mean, cfg.std).numpy()
        np.testing.assert_allclose(o["image"][0], ref, atol=1e-4)
    ml = next(P.make_eval_dataset(ds, small_config(label_mode="multilabel")))
    np.testing.assert_array_equal(ml["masks"][0], data["masks"][0])


def test_split_train_val(data, ds):
    cfg = small_config(val_fraction=0.34)
    train, val = P.split_train_val(ds, cfg)
    assert int(train.cardinality()) == 4 and int(val.cardinality()) == 2
    tn = [x["name"].decode() for x in train.as_numpy_iterator()]
    vn = [x["name"].decode() for x in val.as_numpy_iterator()]
    assert sorted(tn + vn) == data["name"] and not set(tn) & set(vn)
    assert vn == [data["name"][i] for i in P.val_indices(N, cfg)]
    # By name: independent of the input order.
    t1, v1 = P.split_train_val(data["name"], cfg)
    t2, v2 = P.split_train_val(data["name"][::-1], cfg)
    assert sorted(v1) == sorted(v2) and len(v1) == 2 and not set(t1) & set(v1)
    cfg.val_count = 1
    assert len(P.split_train_val(data["name"], cfg)[1]) == 1
    # Reference behaviour: validate on the test split, train on everything.
    cfg.validate_on = "test"
    assert P.split_train_val(ds, cfg, test_ds="TEST") == (ds, "TEST")
    # IDRiD default: 10% of 54 -> 5 held-out images.
    assert len(P.val_indices(54, P.default_data_config())) == 5


# ---------------------------------------------------------------------------------------------
# The input pipeline's speed work changed nothing it computes.
#
# * ``train_transform`` equals, bit for bit, the outputs of the pipeline as it was before the speed work
#   (``fixtures/pipeline_train_transform.npz``, made by ``tests/make_pipeline_fixture.py`` at that commit):
#   uint8 intermediates, the flip folded into the crop's indices and the split into a host part and a
#   finishing part are pure refactorings.
# * The device finish (``data.on_device.finish_batch``, jax, inside the train step) equals the TensorFlow
#   finish (``pipeline.finish_example``) bit for bit: normalisation, zeroed padding, fused label / masks.
# * The trainer's stream (``raw=True``) finished on the device equals the ``raw=False`` stream.
# ---------------------------------------------------------------------------------------------

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
