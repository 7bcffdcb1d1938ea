"""The example contract every dataset builder of this package follows, and its errors.

Every example is ``{"image": uint8 [H, W, 3] RGB, "masks": uint8 [H, W, 4] 0/1 in channel order EX, HE,
SE, MA (multi-label: overlaps kept), "name": the image file stem}``. In the tfds files, JPEG images keep
their original bytes (no re-encoding loss); other images and the masks are stored PNG-encoded (lossless).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from hrdecoder_jax import LESIONS  # noqa: F401  (channel order of "masks"; fused labels use 1..4)
from hrdecoder_jax.errors import ExpectedError


class DatasetError(ExpectedError, ValueError):
    """A dataset file or folder is unusable; the message is one line naming it and what was expected."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A required folder or file (manual dir, layout, split) does not exist."""


@tfds.core.utils.classproperty
@classmethod
def _no_code_path(cls):
    """Replacement for ``DatasetBuilder.code_path``. tfds only uses it to find a checksums file beside
    the builder's code, and for a builder inside an installed package it reaches for the
    ``importlib_resources`` backport, which is not installed. These builders download nothing."""
    return None


def features():
    """The FeaturesDict of every builder (the example contract)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "masks": tfds.features.Image(shape=(None, None, len(LESIONS)), dtype=np.uint8, encoding_format="png"),
        "name": tfds.features.Text(),
    })
