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

import hashlib
import json
import logging
import os
import re
from typing import Any

from hrdecoder_jax import LESIONS
from hrdecoder_jax.config_utils import field
from hrdecoder_jax.data.contract import DatasetError, DatasetNotFoundError
from hrdecoder_jax.data.ddr import Ddr
from hrdecoder_jax.data.idrid import Idrid
from hrdecoder_jax.data.synthetic import (
    SyntheticFundus,
    SyntheticFundusConfig,
    example_seed,
    generate_fundus,
    synthetic_config,
)

log = logging.getLogger("hrdecoder_jax.data")

__all__ = [
    "LESIONS", "DatasetError", "DatasetNotFoundError", "Idrid", "Ddr", "SyntheticFundus", "SyntheticFundusConfig",
    "synthetic_config", "generate_fundus", "example_seed", "get_builder", "load_split", "num_examples", "image_decoders",
    "open_split", "data_fingerprint", "prepared_record",
]


PREPARED_RECORD = "prepared.json"   # in a prepared builder's folder: its manual_dir and a fingerprint of its files
_LEGACY_RECORD = "prepared_from.txt"   # the manual_dir alone (data prepared before the fingerprint existed)


def get_builder(name: str, *, data_dir, manual_dir=None, prepare: bool = True, **builder_kwargs):
    """The tfds builder ``name`` ("idrid", "ddr", "synthetic_fundus", optionally "name/config") under
    ``data_dir``, prepared from ``manual_dir`` first if it is not yet (no network is ever used).

    Prepared once, whoever asks: the preparation runs under a file lock beside the builder's folder, so
    processes of one host or of a shared file system that ask at the same time wait for the first one.
    The prepared folder records its ``manual_dir`` and a fingerprint of its files (``prepared.json``); asking
    for it with another ``manual_dir`` is refused.

    ``builder_kwargs`` go to the builder, e.g. ``config="tiny"`` or ``config=synthetic_config(...)``.
    Raises DatasetError (one line naming the file or folder) for unusable input.
    """
    import tensorflow_datasets as tfds

    def make():
        return tfds.builder(name, data_dir=os.fspath(data_dir), **builder_kwargs)

    builder = make()
    wanted = None if manual_dir is None else os.path.abspath(os.path.expanduser(os.fspath(manual_dir)))
    if not builder.is_prepared() and prepare:
        builder = _prepare_once(make, builder, wanted)
    if builder.is_prepared() and wanted is not None:
        source = prepared_record(builder).get("manual_dir")
        if source and source != wanted:
            raise DatasetError(f"{builder.data_dir} was prepared from {source}, not from manual_dir={wanted}; "
                               "delete that folder (or set data.data_dir elsewhere) to prepare the new data")
    return builder


def _prepare_once(make, builder, manual_dir: str | None):
    """Prepare ``builder`` unless another process is doing it (then wait for it), and return the prepared
    builder. The lock is a ``flock`` on a file beside the builder's folder: it holds between the processes of
    one host and on shared file systems that support locks (``train`` also lets process 0 of a multi-process
    run prepare first while the others wait at a barrier)."""
    import fcntl

    import tensorflow_datasets as tfds

    folder = os.fspath(builder.data_dir)
    lock_path = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.prepare.lock")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("[data] waiting: another process is preparing %s in %s (it holds %s)", builder.name,
                        folder, lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:     # a file system without locks: prepare unguarded, as before
            log.warning("[data] %s cannot be locked (%s); preparing without the lock", lock_path, e.strerror)
        builder = make()                         # another process may have prepared it meanwhile
        if builder.is_prepared():
            return builder
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False))
        _write_record(builder, manual_dir)
        return builder
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)


def _fingerprint_files(folder: str) -> str:
    """BLAKE2b of the prepared data files in ``folder`` (names, sizes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not os.path.isfile(path) or not (".tfrecord" in entry or ".array_record" in entry):
            continue
        h.update(f"{entry}\0{os.path.getsize(path)}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _write_record(builder, manual_dir: str | None) -> dict:
    from hrdecoder_jax.workdir import write_file
    folder = os.fspath(builder.data_dir)
    record = {"manual_dir": manual_dir, "fingerprint": _fingerprint_files(folder)}
    try:
        write_file(os.path.join(folder, PREPARED_RECORD), json.dumps(record, indent=1) + "\n")
    except OSError as e:           # a read-only data_dir (a shared copy): the fingerprint is computed each time
        log.warning("[data] cannot write %s (%s); its fingerprint is computed again each time",
                    os.path.join(folder, PREPARED_RECORD), e.strerror)
    return record


def prepared_record(builder) -> dict:
    """``{"manual_dir", "fingerprint"}`` of a prepared builder: what it was prepared from and a fingerprint
    of the files it holds. Data prepared before the record existed gets one now (its manual_dir from the
    former ``prepared_from.txt``)."""
    folder = os.fspath(builder.data_dir)
    try:
        with open(os.path.join(folder, PREPARED_RECORD)) as f:
            record = json.load(f)
        if isinstance(record, dict) and record.get("fingerprint"):
            return record
    except (OSError, ValueError):
        pass
    manual_dir = None
    try:
        with open(os.path.join(folder, _LEGACY_RECORD)) as f:
            manual_dir = f.read().strip() or None
    except OSError:
        pass
    return _write_record(builder, manual_dir)


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



def _builder_args(data_config) -> tuple[str, str, str | None, dict]:
    """``(name, data_dir, manual_dir, builder kwargs)`` of a config's ``data`` section."""
    name = data_config.name
    kwargs: dict[str, Any] = {}
    synthetic = field(data_config, "synthetic")
    if name == "synthetic_fundus" and synthetic is not None:
        kwargs["config"] = synthetic_config(**(synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic)))
    data_dir = os.path.expanduser(os.fspath(data_config.data_dir or "~/tensorflow_datasets"))   # "": tfds's default
    manual_dir = data_config.manual_dir
    manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None
    return name, data_dir, manual_dir, kwargs


def open_split(data_config, split: str):
    """The raw ``tf.data.Dataset`` of ``split`` for ``data_config`` (a config's ``data`` section).

    Handles the ``synthetic_fundus`` builder config (``data_config.synthetic``, generated on first use),
    ``data_dir`` (``~`` expanded; empty means ``~/tensorflow_datasets``) and ``manual_dir`` (where the
    downloaded IDRiD/DDR files are). Examples are ``{"image", "masks", "name"}`` as ``load_split`` returns.
    """
    name, data_dir, manual_dir, kwargs = _builder_args(data_config)
    return load_split(name, split, data_dir=data_dir, manual_dir=manual_dir, **kwargs)


def data_fingerprint(data_config) -> str:
    """The fingerprint of the prepared data ``data_config`` reads (``prepared_record``; prepares it if
    needed), together with what the folder is: two configs share it only when they read the same files."""
    name, data_dir, manual_dir, kwargs = _builder_args(data_config)
    builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir, **kwargs)
    record = prepared_record(builder)
    return f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}:{record['fingerprint']}"
