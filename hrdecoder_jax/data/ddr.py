"""``ddr`` tfds builder: the DDR lesion-segmentation part, read from a manual directory.

Accepted below the manual dir (directly, nested up to two folders deep, or inside a ``.zip`` there):
``lesion_segmentation/{train,valid,test}/{image/*.jpg, label/{EX,HE,MA,SE}/*.tif}`` with the known
variants: ``val``/``valid``/``validation``, ``image``/``images``/``img``, ``label``/``labels``, any
case; also the mmseg layout ``images/{train,val,test}`` + ``labels/{train,val,test}/{EX,HE,SE,MA}``.
Masks are binary 0/255 TIFFs named like their image. Split ``valid`` is named so whatever its folder.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from hrdecoder_jax.data import masks as _m
from hrdecoder_jax.data.synthetic import _no_code_path, features

SPLIT_NAMES = {
    "train": ("train", "training"),
    "valid": ("valid", "val", "validation", "valid set", "validation set"),
    "test": ("test", "testing"),
}
EXPECTED = ("the DDR 'lesion_segmentation' folder with {train,valid,test}/image/*.jpg and "
            "{train,valid,test}/label/{EX,HE,MA,SE}/*.tif")


class Ddr(tfds.core.GeneratorBasedBuilder):
    """DDR lesion segmentation (757 annotated images, usually split 383 train / 149 valid / 225 test)."""

    name = "ddr"
    code_path = _no_code_path
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the DDR dataset from the nkicsl/DDR-dataset GitHub repository (links in its README), extract "
        "it and put the 'lesion_segmentation' folder (or the whole extracted dataset) into the manual dir.")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="DDR lesion segmentation: fundus images with EX, HE, SE, MA masks; masks: uint8 [H,W,4] "
                        "0/1, multi-label.",
            features=features(),
            homepage="https://github.com/nkicsl/DDR-dataset",
        )

    def _split_generators(self, dl_manager):
        layout = _m.find_layout(_m.manual_dir_of(dl_manager), dataset=self.name, split_names=SPLIT_NAMES,
                                expected=EXPECTED)
        for sf in layout.splits.values():
            _m.log_missing(self.name, sf)
        return {s: self._generate_examples(layout, s) for s in layout.splits}

    def _generate_examples(self, layout, split):
        yield from _m.generate_examples(layout, split)
