"""Datasets: tfds builders ``idrid``, ``ddr`` and ``synthetic_fundus`` (registered on import) and helpers.

Every example is ``{"image": uint8 [H, W, 3] RGB, "masks": uint8 [H, W, 4] 0/1 in channel order
EX, HE, SE, MA (multi-label), "name": str file stem}``. Importing this package only defines the
builder classes (tensorflow_datasets imports TensorFlow lazily); nothing is read or generated until
a builder is prepared.

Modules, in data-flow order: ``contract`` (the example format, its errors, the manual-download builder
base), ``manual`` (reading the downloads: folders, zips, layouts, mask decoding), ``idrid`` / ``ddr`` /
``synthetic`` (the builders; ``synthetic`` also holds the procedural generator), ``augment`` (the
paper's augmentation ops on tensors), ``pipeline`` (the tf.data training and evaluation pipelines).
``open_split`` is how the rest of the package opens a config's split.
"""

from __future__ import annotations

import os
import re

from hrdecoder_jax import LESIONS
from hrdecoder_jax.config_utils import field
from hrdecoder_jax.data.contract import DatasetError, DatasetNotFoundError
from hrdecoder_jax.data.synthetic import (SyntheticFundus, SyntheticFundusConfig, example_seed, generate_fundus,
                                          synthetic_config)
from hrdecoder_jax.data.idrid import Idrid
from hrdecoder_jax.data.ddr import Ddr

__all__ = [
    "LESIONS", "DatasetError", "DatasetNotFoundError", "Idrid", "Ddr", "SyntheticFundus", "SyntheticFundusConfig",
    "synthetic_config", "generate_fundus", "example_seed", "get_builder", "load_split", "num_examples", "image_decoders",
    "open_split",
]


def get_builder(name: str, *, data_dir, manual_dir=None, prepare: bool = True, **builder_kwargs):
    """The tfds builder ``name`` ("idrid", "ddr", "synthetic_fundus", optionally "name/config") under
    ``data_dir``, prepared from ``manual_dir`` first if it is not yet (no network is ever used).

    ``builder_kwargs`` go to the builder, e.g. ``config="tiny"`` or ``config=synthetic_config(...)``.
    Raises DatasetError (one line naming the file or folder) for unusable input.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=os.fspath(data_dir), **builder_kwargs)
    record = os.path.join(os.fspath(builder.data_dir), "prepared_from.txt")   # the manual dir it was read from
    wanted = None if manual_dir is None else os.path.abspath(os.path.expanduser(os.fspath(manual_dir)))
    if builder.is_prepared():
        if wanted is not None and os.path.exists(record):
            with open(record) as f:
                source = f.read().strip()
            if source and source != wanted:
                raise DatasetError(f"{builder.data_dir} was prepared from {source}, not from manual_dir={wanted}; "
                                   "delete that folder (or set data.data_dir elsewhere) to prepare the new data")
    elif prepare:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=wanted, try_download_gcs=False))
        if wanted is not None:
            with open(record, "w") as f:
                f.write(wanted + "\n")
    return builder


def image_decoders() -> dict:
    """tfds ``decoders`` for ``as_dataset``: JPEG images decoded like Pillow and OpenCV (libjpeg ISLOW
    integer DCT with fancy upsampling), which the reference pipeline uses.

    Why: the tfds Image feature decodes with TF's default (fast integer) DCT, whose pixels differ from
    cv2/Pillow by up to about 9 grey levels (mean about 1) on the same JPEG. ``load_split`` uses this
    by default; pass it yourself to ``builder.as_dataset(..., decoders=image_decoders())``.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    @tfds.decode.make_decoder(output_dtype=tf.uint8)
    def _decode(serialized, feature):
        del feature
        img = tf.cond(
            tf.io.is_jpeg(serialized),
            lambda: tf.io.decode_jpeg(serialized, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_png(serialized, channels=3, dtype=tf.uint8))
        img.set_shape([None, None, 3])
        return img

    return {"image": _decode()}


def _check_split(builder, split: str) -> None:
    available = list(builder.info.splits.keys())
    for part in re.split(r"\+", split):
        base = part.strip().split("[")[0]
        if base not in available:
            raise DatasetNotFoundError(
                f"{builder.name}: no split '{base}' in {builder.data_dir} (available: {', '.join(sorted(available))})")


def load_split(name: str, split: str, *, data_dir, manual_dir=None, shuffle_files: bool = False, read_config=None,
               exact_jpeg: bool = True, **builder_kwargs):
    """``tf.data.Dataset`` of ``{"image": uint8 [H,W,3], "masks": uint8 [H,W,4], "name": tf.string}``
    for ``split`` (tfds split syntax such as "train[:10]" works), preparing the builder if needed.

    ``exact_jpeg``: decode JPEG images bit-exactly like cv2/Pillow (see :func:`image_decoders`);
    False uses tfds' default decoding (TF fast DCT, a few grey levels off).
    """
    builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir, **builder_kwargs)
    _check_split(builder, split)
    return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                              decoders=image_decoders() if exact_jpeg else None)


def num_examples(name: str, split: str, *, data_dir, manual_dir=None, **builder_kwargs) -> int:
    """Number of examples in ``split`` (prepares the builder if needed)."""
    builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir, **builder_kwargs)
    _check_split(builder, split)
    return int(builder.info.splits[split].num_examples)



def open_split(data_config, split: str):
    """The raw ``tf.data.Dataset`` of ``split`` for ``data_config`` (a config's ``data`` section).

    Handles the ``synthetic_fundus`` builder config (``data_config.synthetic``, generated on first use),
    ``data_dir`` (``~`` expanded; empty means ``~/tensorflow_datasets``) and ``manual_dir`` (where the
    downloaded IDRiD/DDR files are). Examples are ``{"image", "masks", "name"}`` as ``load_split`` returns.
    """
    name = data_config.name
    kwargs: dict[str, Any] = {}
    synthetic = field(data_config, "synthetic")
    if name == "synthetic_fundus" and synthetic is not None:
        kwargs["config"] = synthetic_config(**(synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic)))
    data_dir = os.path.expanduser(os.fspath(field(data_config, "data_dir", "") or "~/tensorflow_datasets"))
    manual_dir = field(data_config, "manual_dir")
    if manual_dir:
        manual_dir = os.path.expanduser(os.fspath(manual_dir))
    else:
        manual_dir = None
    return load_split(name, split, data_dir=data_dir, manual_dir=manual_dir, **kwargs)
