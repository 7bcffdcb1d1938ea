"""Write a synthetic dataset to disk in a real dataset's layout, so the real loaders run end to end.

    python -m hrdecoder_jax.tools.write_layout --layout idrid --out DIR [--zip] \\
        [--num-train N --num-test N --height H --width W --seed S]

``DIR`` must be new or empty: writing into a folder that holds files (a real download, another layout)
is refused rather than mixing two datasets.

Layouts:

* ``idrid``: the official "A. Segmentation" download: JPEG images (quality 95), red (255,0,0) RGB
  TIFF masks, the first image's EX mask as RGBA (alpha 255), and the SE mask of every third image
  (index 1, 4, 7, ...) left out as in the real release. ``--zip`` writes ``A. Segmentation.zip``.
* ``mmseg``: the reference repository's layout, ``images/{train,test}`` and
  ``labels/{train,test}/{EX,HE,SE,MA}/<name>_<LES>.tif`` as grey-76 masks (SE left out likewise).
* ``mmseg-png``: ``images/{train,test}`` and fused single-channel ``labels/{train,test}/<name>.png``
  (0 bg, 1 EX, 2 HE, 3 SE, 4 MA; overlapping pixels keep the last class, as the reference converter).
* ``ddr``: ``lesion_segmentation/{train,valid,test}/{image,label/{EX,HE,MA,SE}}`` with binary 0/255
  grey TIFF masks named like the images.

Images come from :func:`hrdecoder_jax.data.synthetic.generate_fundus` with the per-example seed of
:func:`~hrdecoder_jax.data.synthetic.example_seed`, so :meth:`WrittenExample.expected_masks` can
recompute exactly what a loader must decode without keeping the images in memory.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import zipfile

import numpy as np

from hrdecoder_jax import LESIONS
from hrdecoder_jax.data.synthetic import example_seed, generate_fundus

LAYOUTS = ("idrid", "mmseg", "mmseg-png", "ddr")
USES_CONFIG = False   # the command takes no --config
_IDRID_LESION_DIRS = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates", "SE": "4. Soft Exudates"}
_IDRID_SPLIT_DIRS = {"train": "a. Training Set", "test": "b. Testing Set"}


@dataclasses.dataclass(frozen=True)
class WrittenExample:
    """One written image: where it went and how to regenerate what the loaders must return."""

    split: str
    name: str
    seed: int
    height: int
    width: int
    lesion_scale: float
    image_path: str  # relative to the output folder (or member of the zip)
    missing: tuple[str, ...]  # lesions whose mask file was deliberately not written
    fused: bool  # masks written as one fused 0..4 label map (overlaps lost)

    def generated(self) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H,W,3] before JPEG compression, masks uint8 [H,W,4] as generated)."""
        return generate_fundus(self.seed, self.height, self.width, lesion_scale=self.lesion_scale)

    def expected_masks(self, masks: np.ndarray | None = None) -> np.ndarray:
        """uint8 [H,W,4] 0/1: what a loader must decode from the written files."""
        m = (self.generated()[1] if masks is None else masks).copy()
        for les in self.missing:
            m[..., LESIONS.index(les)] = 0
        if self.fused:
            fused = _fuse(m)
            m = np.stack([fused == i + 1 for i in range(len(LESIONS))], axis=-1).astype(np.uint8)
        return m


def _fuse(masks: np.ndarray) -> np.ndarray:
    """uint8 [H,W] label map 0..4, classes written in order EX, HE, SE, MA so the last one wins."""
    fused = np.zeros(masks.shape[:2], np.uint8)
    for i in range(len(LESIONS)):
        fused[masks[..., i] > 0] = i + 1
    return fused


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiff(arr: np.ndarray) -> bytes:
    return _encode(arr, "TIFF", compression="tiff_lzw")


class LayoutError(ValueError):
    """The output folder cannot take the dataset (the message names it)."""


class _Sink:
    """Writes files under a folder or into a zip archive, each complete or not at all (the zip under a
    temporary name until it is closed)."""

    def __init__(self, out: pathlib.Path, zip_name: str | None):
        from hrdecoder_jax.workdir import atomic_write

        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._zip_file = atomic_write(out / zip_name, "wb") if zip_name else None
        self.zip = zipfile.ZipFile(self._zip_file.__enter__(), "w") if zip_name else None

    def put(self, rel: str, data: bytes, compress: bool) -> None:
        from hrdecoder_jax.workdir import write_file

        if self.zip is not None:
            self.zip.writestr(rel, data, compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        else:
            path = self.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, data)

    def close(self, failed: BaseException | None = None) -> None:
        if self.zip is not None:
            self.zip.close()
            if failed is None:
                self._zip_file.__exit__(None, None, None)
            else:
                self._zip_file.__exit__(type(failed), failed, failed.__traceback__)


def check_out(out: pathlib.Path) -> None:
    """``out`` must be a new or empty folder: writing a dataset into one that holds files would mix two
    datasets (and overwrite a real download's images of the same names). Raises ``LayoutError``."""
    if out.exists() and not out.is_dir():
        raise LayoutError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise LayoutError(f"--out {out} is not empty ({shown}); write_layout writes a whole dataset and never "
                          "into an existing one (that would mix two datasets): choose a new or empty folder")


def write_layout(out, layout: str = "idrid", *, num_train: int = 6, num_test: int = 3, num_valid: int = 3,
                 height: int = 356, width: int = 536, seed: int = 0, as_zip: bool = False,
                 lesion_scale: float = 1.0, jpeg_quality: int = 95) -> list[WrittenExample]:
    """Write a synthetic dataset in ``layout`` (one of LAYOUTS) under folder ``out``, which must be new or
    empty (``LayoutError`` otherwise: it never writes into an existing dataset).

    ``num_valid`` only applies to ``ddr``. With ``as_zip`` everything goes into one archive in
    ``out`` ("A. Segmentation.zip", "lesion_segmentation.zip" or "idrid_mmseg.zip"), whose top
    folder is the layout's top folder. Returns one WrittenExample per image, train first.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"write_layout: unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    out = pathlib.Path(os.fspath(out))
    check_out(out)
    if layout == "idrid":
        top, zip_name = "A. Segmentation/", "A. Segmentation.zip"
    elif layout == "ddr":
        top, zip_name = "lesion_segmentation/", "lesion_segmentation.zip"
    else:
        top, zip_name = "", "idrid_mmseg.zip"
    splits = [("train", num_train), ("valid", num_valid), ("test", num_test)] if layout == "ddr" else \
        [("train", num_train), ("test", num_test)]
    sink = _Sink(out, zip_name if as_zip else None)
    written = []
    counter = 0
    failed = None
    try:
        for split, n in splits:
            for i in range(n):
                counter += 1
                ex_seed = example_seed(seed, split, i)
                image, masks = generate_fundus(ex_seed, height, width, lesion_scale=lesion_scale)
                jpeg = _encode(image, "JPEG", quality=jpeg_quality)
                if layout == "ddr":
                    # DDR names look like "007-1774-100"; a running number keeps them unique across splits.
                    name = f"007-{counter:04d}-100"
                    img_rel = f"{top}{split}/image/{name}.jpg"
                    sink.put(img_rel, jpeg, compress=False)
                    for c, les in enumerate(LESIONS):
                        sink.put(f"{top}{split}/label/{les}/{name}.tif", _tiff(masks[..., c] * np.uint8(255)), True)
                    missing = ()
                else:
                    name = f"IDRiD_{counter:02d}"
                    missing = ("SE",) if (counter - 1) % 3 == 1 else ()
                    if layout == "idrid":
                        img_rel = f"{top}1. Original Images/{_IDRID_SPLIT_DIRS[split]}/{name}.jpg"
                    else:
                        img_rel = f"{top}images/{split}/{name}.jpg"
                    sink.put(img_rel, jpeg, compress=False)
                    if layout == "mmseg-png":
                        missing = ()
                        sink.put(f"{top}labels/{split}/{name}.png", _encode(_fuse(masks), "PNG"), True)
                    for c, les in enumerate(LESIONS):
                        if layout == "mmseg-png" or les in missing:
                            continue
                        m = masks[..., c]
                        if layout == "idrid":
                            rgb = np.zeros(m.shape + (3,), np.uint8)
                            rgb[..., 0] = m * np.uint8(255)
                            if counter == 1 and les == "EX":  # one RGBA mask, as some real files are
                                rgb = np.concatenate([rgb, np.full(m.shape + (1,), 255, np.uint8)], axis=-1)
                            rel = f"{top}2. All Segmentation Groundtruths/{_IDRID_SPLIT_DIRS[split]}/" \
                                  f"{_IDRID_LESION_DIRS[les]}/{name}_{les}.tif"
                            sink.put(rel, _tiff(rgb), True)
                        else:
                            sink.put(f"{top}labels/{split}/{les}/{name}_{les}.tif", _tiff(m * np.uint8(76)), True)
                written.append(WrittenExample(split=split, name=name, seed=ex_seed, height=height, width=width,
                                              lesion_scale=lesion_scale, image_path=img_rel, missing=missing,
                                              fused=layout == "mmseg-png"))
    except BaseException as e:
        failed = e
        raise
    finally:
        sink.close(failed)
    return written


def define_flags(fv) -> None:
    from absl import flags
    flags.DEFINE_enum("layout", "idrid", LAYOUTS, "Which dataset's layout.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder, new or empty (the manual dir to point the builder at).",
                        flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_bool("zip", False, "Write one zip archive instead of a folder tree.", flag_values=fv)
    flags.DEFINE_integer("num_train", 6, "Training images.", flag_values=fv)
    flags.DEFINE_integer("num_test", 3, "Test images.", flag_values=fv)
    flags.DEFINE_integer("num_valid", 3, "Validation images (ddr only).", flag_values=fv)
    flags.DEFINE_integer("height", 356, "Image height.", flag_values=fv)
    flags.DEFINE_integer("width", 536, "Image width.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Dataset seed (the same seed writes the same images).", flag_values=fv)
    flags.DEFINE_float("lesion_scale", 1.0, "Lesion size factor.", flag_values=fv)


def run(a) -> int:
    from hrdecoder_jax import cli
    try:
        check_out(pathlib.Path(a.out))
    except LayoutError as e:
        raise cli.CommandError(str(e)) from None
    written = write_layout(a.out, a.layout, num_train=a.num_train, num_test=a.num_test, num_valid=a.num_valid,
                           height=a.height, width=a.width, seed=a.seed, as_zip=a.zip, lesion_scale=a.lesion_scale)
    missing = [f"{w.name} {les}" for w in written for les in w.missing]
    print(f"wrote {len(written)} {a.layout} images of {a.height}x{a.width} to {a.out}"
          + (f"; masks left out: {', '.join(missing)}" if missing else ""))
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.tools.write_layout`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    return cli.main("tools.write_layout", __doc__, define_flags, run, argv, config=USES_CONFIG, purpose=None)


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.tools.write_layout")
