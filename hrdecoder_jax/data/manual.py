"""The reader of manually downloaded datasets (IDRiD, DDR, the reference repository's layouts): file trees
(folder or zip), layout detection, image / mask decoding, the example generator, and ``ManualLesionBuilder``,
the tfds builder base class of ``idrid`` and ``ddr`` that runs them.

Nothing here imports TensorFlow: decoding uses Pillow (tifffile as a fallback for TIFFs Pillow
cannot read), so the helpers are cheap to import and to test.

Examples follow :mod:`hrdecoder_jax.data.contract`; JPEG files (RGB or grey) and 8-bit RGB PNG files keep
their original bytes, anything else is decoded and stored PNG-encoded.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
import re
import zipfile
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from hrdecoder_jax import LESIONS
from hrdecoder_jax.data.contract import DatasetError, DatasetNotFoundError, _no_code_path

log = logging.getLogger("hrdecoder_jax.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# JPEG is deliberately absent: lossy masks would turn compression noise into lesion pixels.
MASK_EXTS = (".tif", ".tiff", ".png", ".gif", ".bmp")
FUSED_EXTS = (".png",)


# ---------------------------------------------------------------------------------------------
# Name normalisation: the downloads come with decorated folder names ("1. Original Images",
# "a. Training Set") and with case / plural variants ("Images", "img", "val", "valid").


def norm(name: str) -> str:
    """Lower-case, drop a leading enumeration like "1. " or "a. ", keep only letters and digits."""
    name = name.strip().lower()
    name = re.sub(r"^[0-9a-z]\.\s*", "", name)
    return re.sub(r"[^0-9a-z]", "", name)


IMAGE_KIND = frozenset({"image", "images", "img", "imgs", "imgdir", "originalimages", "originalimage"})
LABEL_KIND = frozenset({
    "label", "labels", "annotation", "annotations", "ann", "anndir", "mask", "masks", "gt",
    "groundtruth", "groundtruths", "allsegmentationgroundtruths", "segmentationgroundtruths",
})
LESION_DIRS = {
    "EX": frozenset({"ex", "hardexudate", "hardexudates", "exudates"}),
    "HE": frozenset({"he", "haemorrhage", "haemorrhages", "hemorrhage", "hemorrhages"}),
    "SE": frozenset({"se", "softexudate", "softexudates", "cottonwoolspots"}),
    "MA": frozenset({"ma", "microaneurysm", "microaneurysms"}),
}
# Folders that may sit beside the lesion folders and are not lesions (IDRiD ships optic-disc masks).
IGNORED_LABEL_DIRS = frozenset({"od", "opticdisc", "opticdiscs"})
JUNK = re.compile(r"^(\.|__macosx$|thumbs\.db$|desktop\.ini$)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# File trees: one interface over an extracted folder and a zip archive.


@dataclasses.dataclass
class Node:
    """A folder of a :class:`Tree`: sub-folders and files by their original names."""

    rel: str
    dirs: dict[str, "Node"] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> rel path

    def child(self, names: frozenset[str] | Sequence[str]) -> "Node | None":
        """The sub-folder whose normalised name is in ``names`` (first in sorted order)."""
        for key in sorted(self.dirs):
            if norm(key) in names:
                return self.dirs[key]
        return None


class Tree:
    """Files below a root (a folder or a zip), addressed by '/'-separated relative paths."""

    def __init__(self, paths: Sequence[str], display_root: str):
        self.display_root = display_root
        self.root = Node("")
        for rel in paths:
            parts = [p for p in rel.replace("\\", "/").split("/") if p]
            if not parts or any(JUNK.match(p) for p in parts):
                continue
            node = self.root
            for i, part in enumerate(parts[:-1]):
                node = node.dirs.setdefault(part, Node("/".join(parts[: i + 1])))
            node.files[parts[-1]] = rel

    def display(self, rel: str) -> str:
        return f"{self.display_root}/{rel}" if rel else self.display_root

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def nodes(self, max_depth: int) -> Iterator[Node]:
        """Breadth-first folders down to ``max_depth`` levels below the root (root included)."""
        level = [self.root]
        for _ in range(max_depth + 1):
            yield from level
            level = [n.dirs[k] for n in level for k in sorted(n.dirs)]


class DirTree(Tree):
    def __init__(self, root: pathlib.Path):
        self.path = root
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not JUNK.match(d)]
            rel_dir = os.path.relpath(dirpath, root)
            for f in filenames:
                paths.append(f if rel_dir == "." else f"{rel_dir}/{f}".replace(os.sep, "/"))
        super().__init__(paths, str(root))

    def read(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read {self.display(rel)}: {e.strerror or e}") from e


class ZipTree(Tree):
    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{path} is not a readable zip archive ({e})") from e
        names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        super().__init__(names, f"{path}!")

    def read(self, rel: str) -> bytes:
        try:
            return self._zip.read(rel)
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC error, truncated archive
            raise DatasetError(f"cannot read {self.display(rel)} from the zip archive ({e})") from e


# ---------------------------------------------------------------------------------------------
# Decoding.


def _open(data: bytes, where: str, what: str):
    """Open and fully decode with Pillow; a corrupt or truncated file raises DatasetError."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # forces the full decode: truncated JPEG/TIFF/PNG data fails here
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, Image.UnidentifiedImageError):
            reason = "not a recognised image format"
        else:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"{where}: corrupt or truncated {what} ({reason})") from e


# Pillow modes whose own conversion to RGB is exact (8 bits per channel, palettes, CMYK, YCbCr).
PIL_RGB_MODES = ("RGB", "L", "RGBA", "P", "LA", "CMYK", "YCbCr", "1")


def to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    """``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` of any numeric dtype -> uint8 ``[H, W, 3]``: 16-bit and
    12-bit integers scaled to 0..255 (by 65535, or by 4095 when no value exceeds it), floats in 0..1 by 255."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar TIFF
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"not an image array: shape {np.shape(array)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 2:  # grey + alpha
        a = np.repeat(a[..., :1], 3, axis=-1)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        top = 255 if a.max(initial=0) <= 255 else (4095 if a.max() <= 4095 else np.iinfo(a.dtype).max)
        return np.clip(np.round(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    a = a.astype(np.float64)
    scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0
    return np.clip(np.round(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)


def pil_to_rgb(img) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of a decoded Pillow image, whatever its mode: the image decoder of both the
    dataset builders and ``predict``. 8-bit modes go through Pillow's conversion; 16-bit, 32-bit and float
    greyscale (``I;16``, ``I``, ``F``), which Pillow's conversion clips to white, are scaled
    (``to_uint8_rgb``)."""
    if img.mode in PIL_RGB_MODES:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return to_uint8_rgb(np.asarray(img))


def decode_image(data: bytes, where: str) -> tuple[np.ndarray, bytes | np.ndarray]:
    """Decode an image file.

    Returns ``(rgb, stored)``: ``rgb`` uint8 [H, W, 3]; ``stored`` what goes into the tfds Image
    feature: the original bytes for RGB/grey JPEG and 8-bit RGB PNG (TF decodes them to the same
    pixels as ``rgb`` up to JPEG decoder rounding), else ``rgb`` itself (tfds encodes it as PNG).
    """
    img = _open(data, where, "image")
    fmt, mode = img.format, img.mode
    try:
        rgb = pil_to_rgb(img)
    except ValueError as e:
        raise DatasetError(f"{where}: cannot be read as an RGB image ({e})") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DatasetError(f"{where}: expected an RGB image, got shape {rgb.shape}")
    keep = (fmt == "JPEG" and mode in ("RGB", "L")) or (fmt == "PNG" and mode == "RGB")
    return rgb, (data if keep else rgb)


def _mask_from_array(a: np.ndarray, alpha_last: bool, where: str = "") -> np.ndarray:
    """Lesion where any colour channel is non-zero. The alpha channel of an RGBA / grey+alpha mask is
    ignored while the colours carry the mask (IDRiD's RGBA masks are opaque everywhere); when the colours
    are black everywhere but the alpha varies, the alpha carries it: lesion where alpha is non-zero
    (with a log line naming the file), so no drawn mask decodes to an empty one in silence."""
    if a.ndim == 2:
        return a != 0
    if a.ndim == 3:
        if alpha_last and a.shape[2] in (2, 4):
            colours, alpha = a[..., :-1], a[..., -1]
            lesion = np.any(colours != 0, axis=2)
            if not lesion.any() and alpha.min() != alpha.max():
                log.warning("%s: black mask whose alpha channel varies; using the alpha channel as the mask",
                            where or "mask")
                return alpha != 0
            return lesion
        return np.any(a != 0, axis=2)
    raise ValueError(f"unexpected mask array shape {a.shape}")


def decode_mask(data: bytes, where: str) -> np.ndarray:
    """Decode a binary lesion mask to bool [H, W]: any non-zero colour channel is lesion.

    Handles binary 0/255 grey (DDR), grey 76 and red (255,0,0) RGB (IDRiD), RGBA / grey+alpha (see
    ``_mask_from_array`` for the alpha rule), palette, 1-bit and 16-bit images.
    """

    try:
        img = _open(data, where, "mask")
    except DatasetError:
        # Pillow lacks some TIFF compressions / sample formats; tifffile reads those.
        if data[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            raise
        try:
            import tifffile

            arr = tifffile.imread(io.BytesIO(data))
            expected = int(np.prod(arr.shape)) * arr.dtype.itemsize
            if expected == 0:
                raise ValueError("empty image")
            return _mask_from_array(np.squeeze(arr), alpha_last=True, where=where)
        except Exception as e:  # noqa: BLE001 - any tifffile failure means the file is unusable
            raise DatasetError(f"{where}: corrupt or truncated mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
        mode = "RGB"
    arr = np.asarray(img)
    return _mask_from_array(arr, alpha_last=mode in ("RGBA", "LA", "La", "RGBa", "PA"), where=where)


def decode_fused(data: bytes, where: str) -> np.ndarray:
    """Decode a fused single-channel label map (0 bg, 1 EX, 2 HE, 3 SE, 4 MA) to uint8 [H, W, 4] 0/1.

    Overlaps were already lost when the map was written (the last class wins), so each pixel sets at
    most one channel.
    """
    img = _open(data, where, "label map")
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise DatasetError(f"{where}: expected a single-channel 0..4 label map, got mode {img.mode}")
    arr = np.asarray(img).astype(np.int64)
    bad = np.unique(arr[(arr < 0) | (arr > len(LESIONS))])
    if bad.size:
        raise DatasetError(
            f"{where}: label values {bad[:8].tolist()} outside 0..4 (expected 0 bg, 1 EX, 2 HE, 3 SE, 4 MA)")
    return np.stack([arr == i + 1 for i in range(len(LESIONS))], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Layout detection.


@dataclasses.dataclass
class SplitFiles:
    """The files of one split: ``images`` stem -> rel path; ``masks`` stem -> {lesion: rel path} for
    per-lesion folders, or ``fused`` stem -> rel path of a 0..4 label map."""

    split: str
    image_dir: str
    label_dir: str
    images: dict[str, str]
    masks: dict[str, dict[str, str]]
    fused: dict[str, str] | None
    missing: list[tuple[str, str]]  # (stem, lesion) with no mask file: an empty mask (no image misses all four)


@dataclasses.dataclass
class Layout:
    tree: Tree
    kind: str  # "kind-first" (images/<split>, labels/<split>) or "split-first" (<split>/image, <split>/label)
    splits: dict[str, SplitFiles]


def _find_in_root(node: Node, split_names: Mapping[str, frozenset[str]]):
    """``(kind, {split: (image_node, label_node, image_parent, label_parent)})`` if ``node`` looks like
    a dataset root, else None. Missing folders come back as None so the caller can name the parent."""
    img, lab = node.child(IMAGE_KIND), node.child(LABEL_KIND)
    if img is not None and lab is not None:
        return "kind-first", {s: (img.child(n), lab.child(n), img, lab) for s, n in split_names.items()}
    split_nodes = {s: node.child(n) for s, n in split_names.items()}
    if any(sn is not None and sn.child(IMAGE_KIND) is not None for sn in split_nodes.values()):
        out = {}
        for s, sn in split_nodes.items():
            out[s] = (None, None, node, node) if sn is None else (sn.child(IMAGE_KIND), sn.child(LABEL_KIND), sn, sn)
        return "split-first", out
    return None


def _zip_candidates(root: pathlib.Path) -> list[pathlib.Path]:
    zips = sorted(p for p in root.glob("*") if p.suffix.lower() == ".zip" and p.is_file())
    zips += sorted(p for p in root.glob("*/*") if p.suffix.lower() == ".zip" and p.is_file()
                   and not JUNK.match(p.parent.name))
    return zips


def find_layout(manual_dir, *, dataset: str, split_names: Mapping[str, Sequence[str]], expected: str,
                max_depth: int = 2) -> Layout:
    """Locate the dataset below ``manual_dir``: the folder itself, nested up to ``max_depth`` levels,
    or a ``.zip`` in it (or one level down) with the same structure inside.

    ``split_names`` maps each canonical split to the accepted (normalised) folder names; ``expected``
    is the layout description used in error messages. Raises DatasetNotFoundError naming the folder.
    """
    root = pathlib.Path(os.fspath(manual_dir)).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"{dataset}: manual directory {root} does not exist (expected {expected})")
    if not root.is_dir():
        raise DatasetNotFoundError(f"{dataset}: manual directory {root} is not a folder (put the download inside it; expected {expected})")
    names = {s: frozenset(norm(n) for n in ns) for s, ns in split_names.items()}
    tree = DirTree(root)
    if not tree.root.dirs and not tree.root.files:
        raise DatasetNotFoundError(f"{dataset}: manual directory {root} is empty (expected {expected})")
    found = _search(tree, names, max_depth)
    if found is None:
        for z in _zip_candidates(root):
            zt = ZipTree(z)
            found = _search(zt, names, max_depth)
            if found is not None:
                tree = zt
                break
    if found is None:
        raise DatasetNotFoundError(f"{dataset}: no dataset layout found in {root} (expected {expected})")
    node, kind, pairs = found
    splits = {}
    for s, (img, lab, img_parent, lab_parent) in pairs.items():
        want = "/".join(sorted(split_names[s]))
        if kind == "kind-first":
            if img is None:
                raise DatasetNotFoundError(f"{dataset}: split '{s}' missing: no folder {{{want}}} in {tree.display(img_parent.rel)}")
            if lab is None:
                raise DatasetNotFoundError(f"{dataset}: split '{s}' missing: no folder {{{want}}} in {tree.display(lab_parent.rel)}")
        else:
            if img is None and lab is None and img_parent is node:
                raise DatasetNotFoundError(f"{dataset}: split '{s}' missing: no folder {{{want}}} in {tree.display(node.rel)}")
            if img is None:
                raise DatasetNotFoundError(f"{dataset}: no image folder (image/images/img) in {tree.display(img_parent.rel)}")
            if lab is None:
                raise DatasetNotFoundError(f"{dataset}: no label folder (label/labels) in {tree.display(lab_parent.rel)}")
        splits[s] = _collect_split(tree, s, img, lab, dataset)
    return Layout(tree=tree, kind=kind, splits=splits)


def _search(tree: Tree, names, max_depth: int):
    for node in tree.nodes(max_depth):
        r = _find_in_root(node, names)
        if r is not None:
            return (node, *r)
    return None


def _stem(name: str) -> tuple[str, str]:
    base, ext = os.path.splitext(name)
    return base, ext.lower()


def _collect_split(tree: Tree, split: str, img: Node, lab: Node, dataset: str) -> SplitFiles:
    images: dict[str, str] = {}
    by_key: dict[str, str] = {}  # lower-case stem -> stem (file systems and zips differ in case)
    for fname in sorted(img.files):
        stem, ext = _stem(fname)
        if ext not in IMAGE_EXTS:
            continue
        if stem.lower() in by_key:
            raise DatasetError(f"{dataset}: two images named {stem} in {tree.display(img.rel)}")
        images[stem] = img.files[fname]
        by_key[stem.lower()] = stem
    if not images:
        raise DatasetNotFoundError(
            f"{dataset}: no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {tree.display(img.rel)}")

    lesion_nodes = {}
    for key in sorted(lab.dirs):
        n = norm(key)
        for les, accepted in LESION_DIRS.items():
            if n in accepted:
                if les in lesion_nodes:
                    raise DatasetError(f"{dataset}: two {les} folders in {tree.display(lab.rel)}")
                lesion_nodes[les] = lab.dirs[key]

    masks: dict[str, dict[str, str]] = {s: {} for s in images}
    missing: list[tuple[str, str]] = []
    orphans: list[str] = []
    fused = None
    if lesion_nodes:
        absent = [les for les in LESIONS if les not in lesion_nodes]
        if absent:
            # A zip holds no empty folders, so a lesion without any file in this split has no folder
            # either; its masks are missing like single missing files (and listed by log_missing).
            log.warning("%s/%s: no %s folder in %s; those masks are missing", dataset, split, "/".join(absent),
                        tree.display(lab.rel))
        for les, node in lesion_nodes.items():
            for fname in sorted(node.files):
                stem, ext = _stem(fname)
                if ext not in MASK_EXTS:
                    continue
                key = stem.lower()
                if key not in by_key and key.endswith("_" + les.lower()):
                    key = key[: -len(les) - 1]  # IDRiD_01_MA -> IDRiD_01
                if key not in by_key:
                    orphans.append(tree.display(node.files[fname]))
                    continue
                owner = by_key[key]
                if les in masks[owner]:
                    raise DatasetError(f"{dataset}: two {les} masks for {owner} in {tree.display(node.rel)}")
                masks[owner][les] = node.files[fname]
        missing = [(s, les) for s in images for les in LESIONS if les not in masks[s]]
    else:
        fused = {}
        for fname in sorted(lab.files):
            stem, ext = _stem(fname)
            if ext not in FUSED_EXTS:
                continue
            if stem.lower() in by_key:
                fused[by_key[stem.lower()]] = lab.files[fname]
            else:
                orphans.append(tree.display(lab.files[fname]))
        if not fused:
            raise DatasetNotFoundError(
                f"{dataset}: no lesion folders ({', '.join(LESIONS)}) and no fused .png label maps in {tree.display(lab.rel)}")
        missing = []               # an image without its label map is refused below
    if orphans:
        log.warning("%s/%s: %d mask file(s) match no image and are ignored: %s", dataset, split,
                    len(orphans), ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else ""))
    # An image with no mask at all is not annotated (a stray file, or masks that went elsewhere): as mmseg and
    # nnU-Net, which need a label file for every image, refuse it rather than score it as lesion-free.
    bare = [s for s in images if (s not in fused if fused is not None else not masks[s])]
    if bare:
        listed = ", ".join(bare[:5]) + (f" and {len(bare) - 5} more" if len(bare) > 5 else "")
        raise DatasetError(f"{dataset}/{split}: {len(bare)} image(s) in {tree.display(img.rel)} have no mask at all "
                           f"in {tree.display(lab.rel)} ({listed}); an image without annotation would count as "
                           "lesion-free: remove it, or add its masks (an all-black mask marks a lesion-free image)")
    return SplitFiles(split=split, image_dir=tree.display(img.rel), label_dir=tree.display(lab.rel),
                      images=images, masks=masks, fused=fused, missing=missing)


def log_missing(dataset: str, sf: SplitFiles) -> None:
    """Warn (python logging, which absl also routes) which masks are missing and so left empty."""
    if sf.missing:
        listed = ", ".join(f"{s} {les}" for s, les in sf.missing)
        log.warning("%s/%s: %d missing mask file(s) in %s, treated as empty masks: %s", dataset, sf.split,
                    len(sf.missing), sf.label_dir, listed)


def generate_examples(layout: Layout, split: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(key, {"image", "masks", "name"})`` for one split (contract in the module docstring)."""
    tree, sf = layout.tree, layout.splits[split]
    for stem, rel in sf.images.items():
        where = tree.display(rel)
        rgb, stored = decode_image(tree.read(rel), where)
        h, w = rgb.shape[:2]
        if sf.fused is not None:
            if stem in sf.fused:
                mrel = sf.fused[stem]
                m = decode_fused(tree.read(mrel), tree.display(mrel))
                _check_size(m.shape[:2], (h, w), tree.display(mrel), where)
            else:
                m = np.zeros((h, w, len(LESIONS)), np.uint8)
        else:
            m = np.zeros((h, w, len(LESIONS)), np.uint8)
            for c, les in enumerate(LESIONS):
                mrel = sf.masks[stem].get(les)
                if mrel is None:
                    continue  # documented missing mask: empty, listed by log_missing
                one = decode_mask(tree.read(mrel), tree.display(mrel))
                _check_size(one.shape, (h, w), tree.display(mrel), where)
                m[..., c] = one
        yield stem, {"image": stored, "masks": m, "name": stem}


def _check_size(got, want, mask_where: str, image_where: str) -> None:
    if tuple(got) != tuple(want):
        raise DatasetError(
            f"{mask_where}: mask is {got[1]}x{got[0]} (WxH) but its image {os.path.basename(image_where)} is {want[1]}x{want[0]}")


def manual_dir_of(dl_manager):
    """The configured manual dir without tfds' own existence check (its error is multi-line)."""
    path = getattr(dl_manager, "_manual_dir", None)
    if path is None:
        return dl_manager.manual_dir
    return pathlib.Path(os.fspath(path))


# ---------------------------------------------------------------------------------------------
# The builder base class: what idrid and ddr share


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
        layout = find_layout(manual_dir_of(dl_manager), dataset=self.name, split_names=self.SPLIT_NAMES,
                             expected=self.EXPECTED)
        for split_files in layout.splits.values():
            log_missing(self.name, split_files)
        return {s: self._generate_examples(layout, s) for s in layout.splits}

    def _generate_examples(self, layout, split):
        yield from generate_examples(layout, split)
