"""Code only the tests use: reference replays and small ops the package itself does not need.

* ``draw_crop_boxes``: the reference's NumPy draw of the HR crop boxes, call for call (the parity tests
  feed its boxes to the model).
* ``fuse_masks``, ``resize_nearest``, ``value_counts``, ``hflip``: whole-image forms of the augmentation
  ops that the pipeline runs fused into windows (``data.augment``); the tests hold the fused forms to them.
* ``train_example_indices``: the example indices of a training stream (``data.pipeline``'s order).
* ``one_error_line``, ``write_config_file``, ``copy_run``, ``fixture_config``, ``flip``, ...: the files and configs
  of the command tests, around the ``trained`` run (``conftest.py``).
"""
from __future__ import annotations

import pathlib
import shutil
from typing import Sequence

import numpy as np
import tensorflow as tf

from hrdecoder_jax.data import augment
from hrdecoder_jax.data.pipeline import _example_index, _stream_positions

REPO = pathlib.Path(__file__).resolve().parents[1]


def draw_crop_boxes(rng: np.random.RandomState, image_size: Sequence[int], hr_scale: Sequence[int],
                    scale_ratio: Sequence[float] | None, divisible: int, crop_num: int) -> np.ndarray:
    """Host-side draw with NumPy's legacy generator, call for call as the reference
    (``get_random_hr_scale`` then ``get_crop_bbox`` per crop). Returns int32 ``[crop_num, 4]``."""
    if scale_ratio is not None:
        lo, hi = scale_ratio
        ratio = rng.random_sample() * (hi - lo) + lo
        size = (int(hr_scale[0] * ratio // divisible * divisible), int(hr_scale[1] * ratio // divisible * divisible))
    else:
        size = tuple(hr_scale)
    boxes = []
    for _ in range(crop_num):
        if tuple(image_size) == tuple(size):
            boxes.append((0, image_size[0], 0, image_size[1]))
            continue
        margin_h, margin_w = max(image_size[0] - size[0], 0), max(image_size[1] - size[1], 0)
        y1 = rng.randint(0, (margin_h + 1) // divisible) * divisible
        x1 = rng.randint(0, (margin_w + 1) // divisible) * divisible
        boxes.append((y1, y1 + size[0], x1, x1 + size[1]))
    return np.asarray(boxes, np.int32)


def fuse_masks(masks: tf.Tensor, dtype: tf.DType = tf.int32) -> tf.Tensor:
    """Reference label map [H, W] from masks [H, W, 4] (overwrite order EX, HE, SE, MA; last wins)."""
    return augment.packed_to_label(augment.pack_masks(masks), dtype)


def resize_nearest(label: tf.Tensor, out_size) -> tf.Tensor:
    """Nearest resize of [H, W] or [H, W, C] to ``out_size`` (cv2 INTER_NEAREST); dtype kept."""
    return augment.resize_nearest_window(label, out_size)


def value_counts(label: tf.Tensor, ignore_index: int | None = 255) -> tf.Tensor:
    """Pixel count of every label value 0..255 in ``label`` (any shape): int32 [256].

    ``ignore_index`` (mmseg's 255) is zeroed, as RandomCrop drops it before counting.
    """
    counts = tf.math.bincount(tf.reshape(tf.cast(label, tf.int32), [-1]), minlength=256, maxlength=256)
    if ignore_index is not None:
        counts = tf.tensor_scatter_nd_update(counts, [[ignore_index]], [0])
    return counts


def hflip(x: tf.Tensor) -> tf.Tensor:
    """Horizontal flip of [H, W, ...] (mmcv imflip 'horizontal')."""
    return tf.reverse(x, axis=[1])


def train_example_indices(num_examples: int, *, global_batch_size: int, seed: int, num_steps: int,
                          start_step: int = 0, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Example indices int64 [num_steps, b] the training stream of one process uses."""
    b = global_batch_size // process_count
    k = tf.range(start_step * b, (start_step + num_steps) * b, dtype=tf.int64)
    g = _stream_positions(k, global_batch_size=global_batch_size, per_process=b, process_index=process_index)
    idx = tf.map_fn(lambda x: _example_index(x, num_examples, seed), g)
    return idx.numpy().reshape(num_steps, b)


# Files and configs of the command tests (test_checkpoint, test_cli, test_workdir, ...)


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def write_config_file(tmp_path, data_dir, **overrides) -> pathlib.Path:
    """A config file for the commands: the shrunk synthetic config with ``overrides``."""
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.py')))}.py"
    lines = ["import sys", f"sys.path.insert(0, {str(REPO / 'tests')!r})", "from test_train import shrunk_synthetic_config",
             "def get_config():", f"    c = shrunk_synthetic_config({str(data_dir)!r})"]
    lines += [f"    c.{k} = {v!r}" for k, v in overrides.items()]
    lines += ["    return c", ""]
    path.write_text("\n".join(lines))
    return path


def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in (step_dir / "model").rglob("*") if p.is_file() and "d" in p.parent.name),
                  key=lambda p: p.stat().st_size, reverse=True)


def cfg_with(tmp_path, root, **overrides) -> pathlib.Path:
    """A config file of the ``trained`` run (eval_every 0, max_images 1) with ``overrides``."""
    return write_config_file(tmp_path, root / "data", eval_every=0, **{"eval.max_images": 1, **overrides})


def copy_run(root: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(root / "run", dest, symlinks=True)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def fixture_config(root, **changes):
    """The ``trained`` run's config with ``changes`` (``total_steps`` and so on)."""
    from test_train import shrunk_synthetic_config
    config = shrunk_synthetic_config(root / "data", total_steps=changes.pop("total_steps", 4))
    config.eval_every = 0
    config.eval.max_images = 1
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def flip(path: pathlib.Path) -> None:
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])
    path.write_bytes(bytes(blob))


def one_error_line_of(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]
