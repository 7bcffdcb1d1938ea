"""``idrid`` tfds builder: the IDRiD "A. Segmentation" part, read from a manual directory.

Accepted below the manual dir (directly, nested up to two folders deep, or inside a ``.zip`` there):

* the official download, zip or extracted: ``A. Segmentation/1. Original Images/{a. Training Set,
  b. Testing Set}/IDRiD_xx.jpg`` and ``2. All Segmentation Groundtruths/{a. Training Set,b. Testing
  Set}/{1. Microaneurysms,2. Haemorrhages,3. Hard Exudates,4. Soft Exudates}/IDRiD_xx_{MA,HE,EX,SE}.tif``
  (``5. Optic Disc`` is ignored);
* the mmseg layout of the reference repository: ``images/{train,test}/*.jpg`` with
  ``labels/{train,test}/{EX,HE,SE,MA}/*.tif`` or fused ``labels/{train,test}/*.png`` (0..4).

Examples follow the contract of :mod:`hrdecoder_jax.data.contract`; JPEG images keep their bytes.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from hrdecoder_jax.data.contract import features
from hrdecoder_jax.data.manual import ManualLesionBuilder

SPLIT_NAMES = {
    "train": ("train", "training", "training set", "a. Training Set"),
    "test": ("test", "testing", "testing set", "b. Testing Set"),
}
EXPECTED = ("the IDRiD 'A. Segmentation' download (zip or folder with '1. Original Images' and "
            "'2. All Segmentation Groundtruths') or the mmseg layout 'images/{train,test}' + "
            "'labels/{train,test}/{EX,HE,SE,MA}' (or fused 'labels/{train,test}/*.png')")


class Idrid(ManualLesionBuilder):
    """IDRiD lesion segmentation (54 train / 27 test images of 4288x2848 in the official release)."""

    name = "idrid"
    SPLIT_NAMES = SPLIT_NAMES
    EXPECTED = EXPECTED
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download 'A. Segmentation.zip' of the Indian Diabetic Retinopathy Image Dataset (IDRiD) from IEEE "
        "DataPort and put the zip, or its extracted 'A. Segmentation' folder, into the manual dir. The mmseg "
        "layout (images/{train,test}, labels/{train,test}/{EX,HE,SE,MA}) is accepted too.")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="IDRiD segmentation part: fundus images with hard exudate (EX), haemorrhage (HE), soft "
                        "exudate (SE) and microaneurysm (MA) masks; masks: uint8 [H,W,4] 0/1, multi-label.",
            features=features(),
            homepage="https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid",
        )
