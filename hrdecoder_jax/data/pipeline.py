"""tf.data training and evaluation pipelines of the HRDecoder paper configs.

Input: a ``tf.data.Dataset`` of ``{"image": uint8 [H, W, 3] RGB, "masks": uint8 [H, W, 4] (EX, HE,
SE, MA; 0/1, overlaps kept), "name": tf.string}`` (the tfds builders of this package).

Training, per example, in the reference's order (mmseg 0.x pipeline of the lesion configs):

0. decode + pack the four masks into one uint8 bit map, then CACHE (memory, or one file per
   example under a directory) -- the base-scale decoded data, before any random op;
1. ``Resize(img_scale, ratio_range, keep_ratio=True)``: r ~ U[lo, hi), mmcv imrescale size; image
   bilinear (cv2 INTER_LINEAR, no antialias, rounded to uint8 like cv2), label cv2 INTER_NEAREST;
2. ``RandomCrop(crop_size, cat_max_ratio)`` with mmseg's 10 re-draws (the 11th box if none passes);
   steps 1-2 are fused: only the crop window of the rescaled image is ever computed;
3. ``RandomFlip(flip_prob, 'horizontal')``;
4. ``RandomRotate(rotate_prob, (-deg, deg))``: positive = clockwise, centre ((w-1)/2, (h-1)/2),
   image bilinear with raw border 0 (-> -mean/std after normalisation), label nearest border 0;
5. ``Normalize(mean, std)`` (RGB);
6. ``Pad(crop_size)`` bottom/right: image 0 in normalised space, label 0;
7. label: fused map int32 (overwrite order EX < HE < SE < MA; ``label_mode="overwrite"``) or the
   four masks uint8 (``label_mode="multilabel"``).

Where the work happens: steps 1-4 and the pad run on the host (``train_transform_raw``; the image stays
uint8, the flip is folded into the crop's column indices); steps 5-7 (``finish_example``) run either here
or, in training, on the accelerator inside the train step (``data.on_device.finish_batch``, the same float32
operations), so the host produces and copies uint8 crops, a quarter of the float32 bytes.

Evaluation (``MultiScaleFlipAug(flip=False)``): image resized to ``test_scale`` with
keep_ratio=False (bilinear, no antialias, uint8 rounding), normalised; label at the ORIGINAL
resolution; batch 1 because sizes differ.

Determinism and resumption. The training stream is an infinite sequence of global positions
g = step * global_batch + j. Epoch e = g // N visits the N examples in a stateless pseudo-random
permutation (``tf.random.experimental.index_shuffle`` keyed by (seed, e)); every augmentation draw
comes from a stateless key folded from (seed, g). Nothing depends on TF's global seed or on
iteration history, so ``start_step=k`` starts the stream at g = k * global_batch and yields exactly
the batches of an uninterrupted run from step k on. Examples are fetched by index from the cache
(``tf.data.experimental.at`` on an in-memory cache, or one file per example).

Multi-process: process p takes positions j in [p*b, (p+1)*b) of every global batch
(b = global_batch // process_count), so the per-process numpy batches concatenated in process
order form the global batch. No jax arrays are created here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator

import numpy as np
import tensorflow as tf

# The data settings are plain config (no TensorFlow): they live in config_utils, re-exported here.
from hrdecoder_jax.config_utils import (  # noqa: E402,F401
    DDR_MEAN,
    DDR_STD,
    IDRID_MEAN,
    IDRID_STD,
    LABEL_MODES,
    ddr_data_config,
    default_data_config,
)
from hrdecoder_jax.data import augment  # noqa: E402

# Constants folded into the user seed so the epoch permutations and the augmentations draw from
# unrelated streams even for the same (seed, counter).
_SALT_EPOCH = 0x0E90C
_SALT_AUG = 0xA06
_SALT_TRAIN_KEY = 0x5EED


# ---------------------------------------------------------------------------------------------
# Config checks (the settings themselves: config_utils.default_data_config)
# ---------------------------------------------------------------------------------------------


def _degree_range(deg) -> tuple[float, float]:
    if isinstance(deg, (int, float)):
        return -abs(float(deg)), abs(float(deg))
    lo, hi = deg
    return min(lo, hi), max(lo, hi)


def _autotune(v: int) -> int:
    return tf.data.AUTOTUNE if v is None or v < 0 else int(v)


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    return opts


# ---------------------------------------------------------------------------------------------
# Per-example transforms
# ---------------------------------------------------------------------------------------------


def encode_example(example: dict) -> dict:
    """Decoded example -> the cached form ``{"image": uint8 [H, W, 3], "packed": uint8 [H, W]}``.

    Packing the four masks into bits keeps multi-label information at a quarter of the memory.
    """
    return {"image": tf.ensure_shape(example["image"], [None, None, 3]),
            "packed": augment.pack_masks(tf.ensure_shape(example["masks"], [None, None, 4]))}


def _finish_label(packed: tf.Tensor, label_mode: str) -> dict:
    if label_mode == "overwrite":
        return {"label": augment.packed_to_label(packed, tf.int32)}
    return {"masks": augment.unpack_masks(packed)}


def train_transform_raw(image: tf.Tensor, packed: tf.Tensor, key: tf.Tensor, data_config) -> dict:
    """The random part of the training augmentation of one example (steps 1-4, pad of step 6).

    What ``train_transform`` computes, before normalisation: ``finish_example`` (here, in TensorFlow)
    or ``data.on_device.finish_batch`` (in the train step's jit) turn it into the model's input, bit for
    bit the same. The image stays uint8 while it is on the uint8 grid (``quantize_uint8``), so the host
    moves a quarter of the bytes, and the flip is folded into the crop's column indices.

    Args:
      image: uint8 [H, W, 3] RGB at base (decoded) resolution.
      packed: uint8 [H, W] packed masks (see ``augment.pack_masks``).
      key: stateless key int64 [2]; the output is a pure function of (image, packed, key).
      data_config: see ``default_data_config``.
    Returns:
      ``{"image": [crop_h, crop_w, 3]`` uint8 (float32 without ``quantize_uint8``), raw RGB, 0 in the
      padding, ``"packed": uint8 [crop_h, crop_w]`` packed masks, 0 in the padding, ``"valid": int32 [2]``
      (rows, columns) of the crop before padding``}``.
    """
    cfg = data_config
    crop_h, crop_w = (int(v) for v in cfg.crop_size)
    k_ratio, k_crop, k_flip, k_rot, k_angle = tf.unstack(tf.random.experimental.stateless_split(key, 5))

    # 1. Resize (keep ratio). Only the sizes and index vectors here; the pixels come in step 2.
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    if cfg.ratio_range is None:
        ratio = tf.constant(1.0, tf.float64)
    else:
        lo, hi = (float(v) for v in cfg.ratio_range)
        ratio = lo + tf.random.stateless_uniform([], k_ratio, dtype=tf.float64) * (hi - lo)
    new_h, new_w = augment.rescale_size(h, w, cfg.img_scale, ratio)

    # 2. RandomCrop: the crop is min(crop, size) (mmseg slices past the edge).
    ch = tf.minimum(crop_h, new_h)
    cw = tf.minimum(crop_w, new_w)
    rows_nn = augment.nearest_indices(h, new_h)
    cols_nn = augment.nearest_indices(w, new_w)

    def packed_window(y, x):
        return tf.gather(tf.gather(packed, rows_nn[y:y + ch], axis=0), cols_nn[x:x + cw], axis=1)

    def fused_counts(y, x):  # the acceptance test always counts the fused (reference) label,
        return augment.fused_counts_from_packed(packed_window(y, x))  # which has no ignore value

    cat_max_ratio = float(cfg.cat_max_ratio)

    def background_dominates(y, x):
        # Exact shortcut for the usual case (fundus crops are mostly background): the most
        # frequent value covers at least the background's share, so the crop fails when the
        # background alone reaches cat_max_ratio or is the only value.
        nonzero = augment.nonzero_count_nearest_window(packed, rows_nn[y:y + ch], cols_nn[x:x + cw])
        total = ch * cw
        bg_share = tf.cast(total - nonzero, tf.float64) / tf.cast(total, tf.float64)
        return tf.logical_or(tf.equal(nonzero, 0), bg_share >= cat_max_ratio)

    off = augment.select_crop(k_crop, (new_h, new_w), (crop_h, crop_w), fused_counts, cat_max_ratio,
                              reject_fn=background_dominates)

    # 3. RandomFlip (horizontal), folded into the window's column indices (the same pixels, mirrored).
    do_flip = tf.random.stateless_uniform([], k_flip, dtype=tf.float64) < float(cfg.flip_prob)
    lab = augment.resize_nearest_window(packed, (new_h, new_w), (off[0], off[1]), (ch, cw), flip=do_flip)
    img = augment.resize_bilinear_window(image, (new_h, new_w), (off[0], off[1]), (ch, cw), flip=do_flip)
    quantize = bool(cfg.quantize_uint8)
    if quantize:
        img = augment.to_uint8(img)

    # 4. RandomRotate: border 0 on the RAW image (so -mean/std after Normalize) and on the label.
    d_lo, d_hi = _degree_range(cfg.rotate_degree)
    do_rot = tf.random.stateless_uniform([], k_rot, dtype=tf.float64) < float(cfg.rotate_prob)
    angle = tf.random.stateless_uniform([], k_angle, minval=d_lo, maxval=d_hi, dtype=tf.float64)

    def _rotate():
        r_img = augment.rotate(tf.cast(img, tf.float32), angle, interpolation="BILINEAR", fill_value=0.0)
        r_img = augment.to_uint8(r_img) if quantize else r_img
        r_lab = augment.rotate(lab[..., None], angle, interpolation="NEAREST", fill_value=0.0)[..., 0]
        return r_img, r_lab

    img, lab = tf.cond(do_rot, _rotate, lambda: (img, lab))

    # 6. Pad (raw 0 here; finishing sets the padding to 0 in normalised space).
    img = tf.ensure_shape(augment.pad_to(img, (crop_h, crop_w), 0), [crop_h, crop_w, 3])
    lab = tf.ensure_shape(augment.pad_to(lab, (crop_h, crop_w), 0), [crop_h, crop_w])
    return {"image": img, "packed": lab, "valid": tf.stack([ch, cw])}


def finish_example(raw: dict, data_config) -> dict:
    """``train_transform_raw``'s output -> the model's input (steps 5-7), in TensorFlow.

    5. Normalize; 6. the padding (outside ``valid``) 0 in normalised space; 7. the label. The device
    twin, ``data.on_device.finish_batch``, computes the same values with the same float32 operations.
    """
    img = augment.normalize(raw["image"], data_config.mean, data_config.std)
    shape = tf.shape(img)
    inside = tf.logical_and(tf.range(shape[0])[:, None] < raw["valid"][0],
                            tf.range(shape[1])[None, :] < raw["valid"][1])
    img = tf.where(inside[..., None], img, tf.zeros_like(img))
    return {"image": img, **_finish_label(raw["packed"], data_config.label_mode)}


def train_transform(image: tf.Tensor, packed: tf.Tensor, key: tf.Tensor, data_config) -> dict:
    """The training augmentation of one example (steps 1-7 of the module docstring).

    Arguments as ``train_transform_raw``, whose output ``finish_example`` turns into the model's input.
    Returns:
      ``{"image": float32 [crop_h, crop_w, 3], "label": int32 [crop_h, crop_w]}`` or ``"masks"``
      uint8 [crop_h, crop_w, 4] instead of ``"label"``.
    """
    return finish_example(train_transform_raw(image, packed, key, data_config), data_config)


def eval_transform(example: dict, data_config) -> dict:
    """Test pipeline of one decoded example.

    Returns ``{"image": float32 [th, tw, 3]`` (test_scale = (tw, th)), ``"label": int32 [H0, W0]``
    at the original resolution (or ``"masks"`` uint8 [H0, W0, 4]), ``"orig_size": int32 [2]``
    (H0, W0), ``"name": string}``.
    """
    cfg = data_config
    label_mode = cfg.label_mode   # one of LABEL_MODES (config_utils.validate_data_config)
    image = tf.ensure_shape(example["image"], [None, None, 3])
    tw, th = (int(v) for v in cfg.test_scale)
    img = augment.resize_bilinear(image, (th, tw))
    if cfg.quantize_uint8:
        img = augment.quantize_uint8(img)
    img = tf.ensure_shape(augment.normalize(img, cfg.mean, cfg.std), [th, tw, 3])
    out = {"image": img, **_finish_label(augment.pack_masks(example["masks"]), label_mode),
           "orig_size": tf.shape(image, out_type=tf.int32)[:2]}
    out["name"] = example["name"] if "name" in example else tf.constant("")
    return out


# ---------------------------------------------------------------------------------------------
# Cached example source (random access by index)
# ---------------------------------------------------------------------------------------------


def _num_examples(ds: tf.data.Dataset, num_examples: int | None) -> int:
    if num_examples is not None:
        return int(num_examples)
    card = int(ds.cardinality())
    if card >= 0:
        return card
    logging.warning("dataset cardinality unknown; counting examples with a full pass "
                    "(pass num_examples= or use assert_cardinality to avoid it)")
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


class _MemorySource:
    """In-memory ``.cache()`` of the encoded examples, read by index.

    ``tf.data.experimental.at`` on a memory cache fills the cache progressively on first access
    (each example decoded once, whichever index comes first) and serves later reads from memory.
    """

    def __init__(self, ds: tf.data.Dataset, num_examples: int | None, num_parallel_calls: int):
        self.num_examples = _num_examples(ds, num_examples)
        self._cached = ds.map(encode_example, num_parallel_calls=num_parallel_calls,
                              deterministic=True).cache()

    def fetch(self, index: tf.Tensor) -> dict:
        return tf.data.experimental.at(self._cached, tf.cast(index, tf.int64))


class _FileSource:
    """One file per encoded example, read by index, under ``cache/<key>/``: the key is a fingerprint of what
    the cache holds (``_cache_key``: the prepared data's fingerprint, the split, the held-out validation
    examples), so runs on other data never read this one's examples, whatever ``data.cache`` they share.

    tf.data's file ``.cache(path)`` has no random access, so the cache is written once as
    ``<index>.image`` / ``<index>.packed`` plus a ``_COMPLETE`` marker (with the key and a description of
    the data) and reused while the marker exists.
    """

    MARKER = "_COMPLETE"

    def __init__(self, ds: tf.data.Dataset, cache: str, key: str, holds: str, num_parallel_calls: int):
        if tf.io.gfile.exists(os.path.join(cache, self.MARKER)):
            logging.warning("data.cache=%s holds a cache written before caches carried a fingerprint of their "
                            "data; it is not used (delete its files to free the space)", cache)
        directory = os.path.join(cache, key)
        self.directory = directory
        marker = os.path.join(directory, self.MARKER)
        if not tf.io.gfile.exists(marker):
            self._write(ds, directory, num_parallel_calls, key, holds)
        with tf.io.gfile.GFile(marker) as f:
            record = json.load(f)
        if record.get("key") != key:
            from hrdecoder_jax.data.contract import DatasetError
            raise DatasetError(f"{directory} holds {record.get('holds', 'other data')}, not {holds}; delete it")
        self.num_examples = int(record["num_examples"])

    @staticmethod
    def _path(directory: str, index, kind: str):
        return tf.strings.join([directory, "/", tf.strings.as_string(index, width=7, fill="0"), "." + kind])

    def _write(self, ds, directory, num_parallel_calls, key, holds):
        tf.io.gfile.makedirs(directory)
        n = 0
        suffix = f".tmp{os.getpid()}"
        for i, ex in enumerate(ds.map(encode_example, num_parallel_calls=num_parallel_calls)):
            for kind in ("image", "packed"):
                final = self._path(directory, np.int64(i), kind).numpy().decode()
                tf.io.write_file(final + suffix, tf.io.serialize_tensor(ex[kind]))
                tf.io.gfile.rename(final + suffix, final, overwrite=True)  # atomic for readers
            n = i + 1
        with tf.io.gfile.GFile(os.path.join(directory, self.MARKER) + suffix, "w") as f:
            json.dump({"num_examples": n, "key": key, "holds": holds}, f)
        tf.io.gfile.rename(os.path.join(directory, self.MARKER) + suffix,
                           os.path.join(directory, self.MARKER), overwrite=True)

    def fetch(self, index: tf.Tensor) -> dict:
        index = tf.cast(index, tf.int64)
        image = tf.io.parse_tensor(tf.io.read_file(self._path(self.directory, index, "image")), tf.uint8)
        packed = tf.io.parse_tensor(tf.io.read_file(self._path(self.directory, index, "packed")), tf.uint8)
        return {"image": tf.ensure_shape(image, [None, None, 3]), "packed": tf.ensure_shape(packed, [None, None])}


def _cache_key(data_config, fingerprint: str | None) -> tuple[str, str]:
    """``(key, description)`` of the training examples a file cache holds: the prepared data's
    ``fingerprint`` (``data.data_fingerprint``; without one, the dataset's name, folders and builder
    settings) and the validation examples held out of the training split."""
    def get(name):
        return data_config.get(name) if hasattr(data_config, "get") else getattr(data_config, name, None)

    if fingerprint is None:
        synthetic = get("synthetic")
        fingerprint = json.dumps({"name": get("name"), "data_dir": os.path.abspath(os.path.expanduser(
            str(get("data_dir") or "~/tensorflow_datasets"))), "manual_dir": get("manual_dir"),
            "synthetic": synthetic.to_dict() if hasattr(synthetic, "to_dict") else synthetic}, sort_keys=True)
    held_out = ({"validate_on": "val", "val_count": get("val_count"), "val_fraction": get("val_fraction"),
                 "val_seed": get("val_seed")} if get("validate_on") == "val" else {"validate_on": get("validate_on")})
    text = json.dumps({"data": fingerprint, "held_out": held_out}, sort_keys=True)
    key = hashlib.blake2b(text.encode(), digest_size=10).hexdigest()
    holds = f"the training examples of {fingerprint} (held out: {json.dumps(held_out, sort_keys=True)})"
    return key, holds


def _make_source(ds, data_config, num_examples, num_parallel_calls, fingerprint=None):
    cache = data_config.cache
    if cache is True or cache == "memory":
        return _MemorySource(ds, num_examples, num_parallel_calls)
    if isinstance(cache, str) and cache:
        key, holds = _cache_key(data_config, fingerprint)
        return _FileSource(ds, os.path.expanduser(cache), key, holds, num_parallel_calls)
    raise ValueError("the training pipeline reads examples by index and needs a cache: set "
                     f"data_config.cache to True/'memory' or a directory path, got {cache!r}")


# ---------------------------------------------------------------------------------------------
# Training stream
# ---------------------------------------------------------------------------------------------


def _process_info(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # deferred: the pipeline itself never touches jax arrays

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _stream_positions(k: tf.Tensor, *, global_batch_size: int, per_process: int, process_index: int) -> tf.Tensor:
    """Per-process element counter k -> global stream position g (int64)."""
    step = k // per_process
    return step * global_batch_size + process_index * per_process + k % per_process


def _example_index(g: tf.Tensor, num_examples: int, seed: int) -> tf.Tensor:
    """Example index int64 at global position g: epoch g // N in a stateless permutation."""
    n = tf.constant(num_examples, tf.int64)
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, _SALT_TRAIN_KEY], tf.int64), _SALT_EPOCH)
    epoch_key = tf.random.experimental.stateless_fold_in(base, g // n)
    return tf.random.experimental.index_shuffle(g % n, epoch_key, n - 1)


def _augment_key(g: tf.Tensor, seed: int) -> tf.Tensor:
    """Stateless key int64 [2] of the example at global position g."""
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, _SALT_TRAIN_KEY], tf.int64), _SALT_AUG)
    return tf.random.experimental.stateless_fold_in(base, g)


def build_train_dataset(ds: tf.data.Dataset, data_config, *, global_batch_size: int, seed: int,
                        start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None, num_examples: int | None = None,
                        raw: bool = False, fingerprint: str | None = None) -> tf.data.Dataset:
    """The infinite, batched training ``tf.data.Dataset`` of one process (see ``make_train_dataset``)."""
    process_index, process_count = _process_info(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} not divisible by process_count {process_count}")
    b = global_batch_size // process_count
    npc = _autotune(data_config.num_parallel_calls)
    source = _make_source(ds, data_config, num_examples, npc, fingerprint)
    n = source.num_examples
    if n < 1:
        raise ValueError("empty training dataset")
    seed = int(seed)

    def load_and_augment(k):
        g = _stream_positions(k, global_batch_size=global_batch_size, per_process=b, process_index=process_index)
        ex = source.fetch(_example_index(g, n, seed))
        out = train_transform_raw(ex["image"], ex["packed"], _augment_key(g, seed), data_config)
        return out if raw else finish_example(out, data_config)

    out = (tf.data.Dataset.counter(start=start_step * b, dtype=tf.int64)
           .map(load_and_augment, num_parallel_calls=npc, deterministic=True)
           .batch(b, drop_remainder=True)
           .prefetch(_autotune(data_config.prefetch)))
    return out.with_options(_options())


def make_train_dataset(ds: tf.data.Dataset, data_config, *, global_batch_size: int, seed: int,
                       start_step: int = 0, process_index: int | None = None,
                       process_count: int | None = None, num_examples: int | None = None,
                       raw: bool = False, fingerprint: str | None = None) -> Iterator[dict]:
    """Infinite iterator of this process's numpy training batches.

    Args:
      ds: decoded examples ``{"image", "masks", "name"}`` (the training split, e.g. after
        ``split_train_val``) in a FIXED order (e.g. tfds ``shuffle_files=False``): the stream
        addresses examples by position. Its cardinality must be known, or pass ``num_examples``.
      data_config: see ``default_data_config``.
      global_batch_size: images per step over all processes.
      seed: the run's seed; together with the global example position it fixes every draw.
      start_step: first step to produce; batches equal those of an uninterrupted run from there.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
    Yields:
      ``{"image": float32 [b, crop_h, crop_w, 3], "label": int32 [b, crop_h, crop_w]}`` with
      b = global_batch_size // process_count (``"masks"`` uint8 [b, crop_h, crop_w, 4] instead of
      ``"label"`` when ``label_mode="multilabel"``). Concatenating the processes' batches in process
      order gives the global batch.
      With ``raw=True``: ``train_transform_raw``'s ``{"image": uint8, "packed", "valid"}`` batched, for
      the trainer, which finishes them on the device (``data.on_device``); the same model input.
    ``fingerprint``: what ``ds`` was read from (``data.data_fingerprint``); it keys a file cache
    (``data_config.cache`` a directory), with the held-out validation examples, so a cache is only ever
    read back by runs on the same data.
    """
    return build_train_dataset(ds, data_config, global_batch_size=global_batch_size, seed=seed,
                               start_step=start_step, process_index=process_index,
                               process_count=process_count, num_examples=num_examples,
                               raw=raw, fingerprint=fingerprint).as_numpy_iterator()


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def build_eval_dataset(ds: tf.data.Dataset, data_config) -> tf.data.Dataset:
    """The evaluation ``tf.data.Dataset``: ``eval_transform`` per example, in order, batch 1."""
    npc = _autotune(data_config.num_parallel_calls)
    out = (ds.map(lambda ex: eval_transform(ex, data_config), num_parallel_calls=npc, deterministic=True)
           .batch(1)
           .prefetch(1))
    return out.with_options(_options())


def make_eval_dataset(ds: tf.data.Dataset, data_config) -> Iterator[dict]:
    """Iterator of numpy dicts, one image each, in dataset order.

    Each dict: ``"image"`` float32 [1, th, tw, 3] (test_scale = (tw, th)), ``"label"`` int32
    [1, H0, W0] at the original resolution (or ``"masks"`` uint8 [1, H0, W0, 4]), ``"orig_size"``
    int32 [1, 2] = (H0, W0), ``"name"`` bytes [1].
    """
    return build_eval_dataset(ds, data_config).as_numpy_iterator()


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------


def val_indices(num_examples: int, data_config) -> list[int]:
    """Sorted indices of the held-out validation examples among ``num_examples``.

    ``val_count`` examples if set, else round(val_fraction * N) (at least 1 when the fraction is
    positive), chosen by a fixed-seed permutation (``val_seed``) so the split never changes.
    """
    if data_config.val_count is not None:
        n_val = int(data_config.val_count)
    else:
        frac = float(data_config.val_fraction)
        n_val = max(1, int(round(frac * num_examples))) if frac > 0 else 0
    if not 0 <= n_val < num_examples:
        from hrdecoder_jax.config_utils import ConfigError
        setting = (f"data.val_count={n_val}" if data_config.val_count is not None
                   else f"data.val_fraction={data_config.val_fraction} ({n_val} images)")
        raise ConfigError(f"{setting} holds out too many of the training split's {num_examples} images: "
                          f"it must leave at least one to train on (at most {num_examples - 1})")
    perm = np.random.default_rng(int(data_config.val_seed)).permutation(num_examples)
    return sorted(int(i) for i in perm[:n_val])


def split_train_val(ds_or_names, data_config, *, test_ds=None, num_examples: int | None = None):
    """Splits the training split into (train, val) deterministically.

    ``validate_on="test"`` reproduces the reference: returns ``(ds_or_names, test_ds)`` unchanged,
    i.e. train on everything and select checkpoints on the test split. ``validate_on="val"``
    holds out ``val_indices`` examples:

    * a ``tf.data.Dataset``: by position in the (deterministic) dataset order; returns two
      datasets with asserted cardinality;
    * a sequence of names: by position in the SORTED names, so the split depends only on the set of
      names; returns (train_names, val_names) lists in the input order.
    """
    mode = data_config.validate_on
    if mode == "test":
        return ds_or_names, test_ds
    if isinstance(ds_or_names, tf.data.Dataset):
        n = _num_examples(ds_or_names, num_examples)
        val = val_indices(n, data_config)
        val_t = tf.constant(val + [-1], tf.int64)  # -1 sentinel keeps the constant non-empty

        def is_val(i, _):
            return tf.reduce_any(tf.equal(i, val_t))

        def is_train(i, ex):
            return tf.logical_not(is_val(i, ex))

        def drop_index(_, ex):
            return ex

        enum = ds_or_names.enumerate()
        train_ds = enum.filter(is_train).map(drop_index)
        val_ds = enum.filter(is_val).map(drop_index)
        return (train_ds.apply(tf.data.experimental.assert_cardinality(n - len(val))),
                val_ds.apply(tf.data.experimental.assert_cardinality(len(val))))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in ds_or_names]
    if len(set(names)) != len(names):
        raise ValueError("duplicate names")
    val_set = {sorted(names)[i] for i in val_indices(len(names), data_config)}
    return [n for n in names if n not in val_set], [n for n in names if n in val_set]


__all__ = [
    "default_data_config", "ddr_data_config", "encode_example", "train_transform", "train_transform_raw",
    "finish_example", "eval_transform",
    "build_train_dataset", "make_train_dataset", "build_eval_dataset", "make_eval_dataset",
    "val_indices", "split_train_val", "IDRID_MEAN", "IDRID_STD", "DDR_MEAN", "DDR_STD",
]
