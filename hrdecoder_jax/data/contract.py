"""The example contract every dataset builder of this package follows, its errors, and the base class of the
builders for manually downloaded datasets (``idrid``, ``ddr``).

Every example is ``{"image": uint8 [H, W, 3] RGB, "masks": uint8 [H, W, 4] 0/1 in channel order EX, HE,
SE, MA (multi-label: overlaps kept), "name": the image file stem}``. In the tfds files, JPEG images keep
their original bytes (no re-encoding loss); other images and the masks are stored PNG-encoded (lossless).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from hrdecoder_jax import LESIONS  # noqa: F401  (channel order of "masks"; fused labels use 1..4)


class DatasetError(ValueError):
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


class ManualLesionBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared split discovery of the manual-directory builders (``idrid``, ``ddr``). Subclasses give
    ``name``, ``_info``, ``SPLIT_NAMES`` (split -> accepted folder names) and ``EXPECTED`` (what the
    error message says should be there). Stays abstract (no ``_info``), so tfds does not register it."""

    code_path = _no_code_path
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    SPLIT_NAMES: dict = {}
    EXPECTED: str = ""

    def _split_generators(self, dl_manager):
        from hrdecoder_jax.data import manual as _m
        layout = _m.find_layout(_m.manual_dir_of(dl_manager), dataset=self.name, split_names=self.SPLIT_NAMES,
                                expected=self.EXPECTED)
        for split_files in layout.splits.values():
            _m.log_missing(self.name, split_files)
        return {s: self._generate_examples(layout, s) for s in layout.splits}

    def _generate_examples(self, layout, split):
        from hrdecoder_jax.data import manual as _m
        yield from _m.generate_examples(layout, split)

