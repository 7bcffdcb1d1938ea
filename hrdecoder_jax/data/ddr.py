"""``ddr`` tfds builder: the DDR lesion-segmentation part, read from a manual directory.

Accepted below the manual dir (directly, nested up to two folders deep, or inside a ``.zip`` there):
``lesion_segmentation/{train,valid,test}/{image/*.jpg, label/{EX,HE,MA,SE}/*.tif}`` with the known
variants: ``val``/``valid``/``validation``, ``image``/``images``/``img``, ``label``/``labels``, any
case; also the mmseg layout ``images/{train,val,test}`` + ``labels/{train,val,test}/{EX,HE,SE,MA}``.
Masks are binary 0/255 TIFFs named like their image. Split ``valid`` is named so whatever its folder.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from hrdecoder_jax.data.contract import features
from hrdecoder_jax.data.manual import ManualLesionBuilder

SPLIT_NAMES = {
    "train": ("train", "training"),
    "valid": ("valid", "val", "validation", "valid set", "validation set"),
    "test": ("test", "testing"),
}
EXPECTED = ("the DDR 'lesion_segmentation' folder with {train,valid,test}/image/*.jpg and "
            "{train,valid,test}/label/{EX,HE,MA,SE}/*.tif")


class Ddr(ManualLesionBuilder):
    """DDR lesion segmentation (757 annotated images, usually split 383 train / 149 valid / 225 test)."""

    name = "ddr"
    SPLIT_NAMES = SPLIT_NAMES
    EXPECTED = EXPECTED
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
