"""Lesion probability maps and an overlay for fundus photographs of any size.

    python -m hrdecoder_jax.predict --config configs/idrid.py --workdir runs/idrid \\
        --input photo.jpg|folder --output predictions/ [--checkpoint best|latest|STEP] [--save_npy]

For every JPEG/PNG/TIFF (a folder is scanned non-recursively, by extension): the photo is resized to
``config.data.test_scale`` (bilinear without antialias, as the evaluation pipeline), normalised with the
config's mean/std, run through ``inference`` (slide or whole by ``config.model.test_cfg``), and the
probabilities are resized back to the photo's size. Writes, per photo ``<stem>``:

* ``<stem>_EX.png``, ``_HE.png``, ``_SE.png``, ``_MA.png``: 8-bit greyscale, value ``round(255 * p)``;
* ``<stem>_overlay.png``: the photo with the pixels where ``p > 0.5`` tinted (EX yellow, HE red, SE cyan,
  MA green; a later lesion wins where several overlap) and a legend in the top-left corner;
* ``<stem>_probs.npy`` (``--save_npy``): float32 ``[H, W, 4]`` probabilities in the order EX, HE, SE, MA.

A file that cannot be read is reported on one line (``skipped FILE: reason``) and skipped; the exit
status is non-zero only when no file could be processed.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np

from hrdecoder_jax import LESIONS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
OVERLAY_COLOURS = {"EX": (255, 230, 0), "HE": (230, 20, 20), "SE": (0, 230, 255), "MA": (30, 230, 30)}
OVERLAY_ALPHA = 0.6
THRESHOLD = 0.5


class UnreadableImageError(ValueError):
    """A file that is not a readable image (the message names it)."""


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    """``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` of any numeric dtype -> uint8 ``[H, W, 3]``."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar TIFF
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"not an image array: shape {array.shape}")
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


def read_image(path: str) -> np.ndarray:
    """The photo at ``path`` as uint8 RGB ``[H, W, 3]`` (PIL; tifffile for TIFFs PIL cannot read).

    Raises ``UnreadableImageError`` naming the file."""
    from PIL import Image, ImageOps

    errors = []
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGB", "L", "RGBA", "P", "LA", "CMYK", "YCbCr", "1"):
                return np.asarray(im.convert("RGB"))
            return _to_uint8_rgb(np.asarray(im))  # 16-bit / float greyscale
    except Exception as e:  # noqa: BLE001 - any decoder failure means: try the next reader, then report
        errors.append(f"{type(e).__name__}: {e}")
    if path.lower().endswith((".tif", ".tiff")):
        try:
            import tifffile

            return _to_uint8_rgb(tifffile.imread(path))
        except Exception as e:  # noqa: BLE001
            errors.append(f"tifffile: {type(e).__name__}: {e}")
    raise UnreadableImageError(f"{path}: not a readable image ({'; '.join(errors)})")


def list_inputs(path: str) -> list[str]:
    """``path`` itself if it is a file, else the image files (by extension) directly in the folder, sorted."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path)
                      if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n)))
    if os.path.exists(path):
        return [path]
    raise FileNotFoundError(f"{path}: no such file or folder")


# ----------------------------------------------------------------------------------------------------------
# Model side
# ----------------------------------------------------------------------------------------------------------


def preprocess(image: np.ndarray, data_config) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[1, th, tw, 3]`` at ``test_scale = (tw, th)``: exactly the
    evaluation pipeline's image path (cv2-style bilinear resize, uint8 re-quantisation, mean/std)."""
    import tensorflow as tf

    from hrdecoder_jax.data import augment

    tw, th = (int(v) for v in data_config.test_scale)
    img = augment.resize_bilinear(tf.constant(image), (th, tw))
    if data_config.get("quantize_uint8", True):
        img = augment.quantize_uint8(img)
    return augment.normalize(img, data_config.mean, data_config.std).numpy()[None]


def predict_probabilities(model_forward: Callable, image: np.ndarray, config) -> np.ndarray:
    """float32 ``[H, W, 4]`` sigmoid probabilities (EX, HE, SE, MA) of the uint8 photo ``image [H, W, 3]``."""
    import jax.numpy as jnp

    from hrdecoder_jax.inference import inference, probabilities

    logits = inference(model_forward, jnp.asarray(preprocess(image, config.data)), config.model.test_cfg)
    return np.asarray(probabilities(logits, image.shape[:2])[0], np.float32)


# ----------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def overlay(image: np.ndarray, probs: np.ndarray, *, threshold: float = THRESHOLD,
            alpha: float = OVERLAY_ALPHA, legend: bool = True) -> np.ndarray:
    """uint8 ``[H, W, 3]``: ``image`` with each lesion's ``probs > threshold`` pixels tinted in its colour."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    for c, lesion in enumerate(LESIONS):
        mask = probs[..., c] > threshold
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(OVERLAY_COLOURS[lesion], np.float32)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if not legend:
        return out
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    h, w = out.shape[:2]
    size = max(8, min(h, w) // 28)
    font = _font(size)
    pad = max(2, size // 3)
    labels = [f"{lesion} p>{threshold:g}" for lesion in LESIONS]
    text_w = max(draw.textlength(t, font=font) for t in labels)
    box_w = int(pad * 3 + size + text_w)
    box_h = int(pad + len(labels) * (size + pad))
    draw.rectangle([0, 0, min(box_w, w - 1), min(box_h, h - 1)], fill=(0, 0, 0))
    for i, (lesion, text) in enumerate(zip(LESIONS, labels)):
        y = pad + i * (size + pad)
        draw.rectangle([pad, y, pad + size, y + size], fill=OVERLAY_COLOURS[lesion])
        draw.text((2 * pad + size, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def predict_file(model_forward: Callable, path: str, config, out_dir: str, save_npy: bool = False) -> dict[str, str]:
    """Predict one photo and write its outputs into ``out_dir``; returns ``{kind: path}`` of what was written
    (kinds ``EX, HE, SE, MA, overlay`` and ``probs`` with ``save_npy``).

    ``model_forward``: ``inference.make_forward(model)`` (or any ``images -> logits`` function).
    Raises ``UnreadableImageError`` for a file that is not a readable image.
    """
    from PIL import Image

    image = read_image(path)
    probs = predict_probabilities(model_forward, image, config)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    written = {}
    for c, lesion in enumerate(LESIONS):
        written[lesion] = os.path.join(out_dir, f"{stem}_{lesion}.png")
        grey = np.round(255.0 * np.clip(probs[..., c], 0.0, 1.0)).astype(np.uint8)
        Image.fromarray(grey).save(written[lesion])
    written["overlay"] = os.path.join(out_dir, f"{stem}_overlay.png")
    Image.fromarray(overlay(image, probs)).save(written["overlay"])
    if save_npy:
        written["probs"] = os.path.join(out_dir, f"{stem}_probs.npy")
        np.save(written["probs"], probs.astype(np.float32))
    return written


def predict_paths(model_forward: Callable, paths: list[str], config, out_dir: str, *, save_npy: bool = False,
                  log=None) -> tuple[list[str], list[str]]:
    """``predict_file`` on each path; unreadable files are reported through ``log`` and skipped (an error
    writing the outputs stops). Returns ``(done, skipped)`` paths."""
    import time

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    done, skipped = [], []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            predict_file(model_forward, path, config, out_dir, save_npy=save_npy)
        except UnreadableImageError as e:     # writing errors are not the input's fault: they stop the run
            log(f"skipped {path}: {e}")
            skipped.append(path)
            continue
        done.append(path)
        log(f"[{i + 1}/{len(paths)}] {path} {time.perf_counter() - t0:.1f}s")
    return done, skipped


def define_flags(fv) -> None:
    from absl import flags

    from hrdecoder_jax import cli
    flags.DEFINE_string("workdir", None, "Directory holding the Orbax checkpoint (training or convert).", flag_values=fv)
    cli.define_checkpoint_flag(fv)
    flags.DEFINE_string("input", None, "A photo, or a folder of JPEG/PNG/TIFF photos.", flag_values=fv)
    flags.DEFINE_string("output", None, "Folder for the outputs.", flag_values=fv)
    flags.DEFINE_bool("save_npy", False, "Also write <stem>_probs.npy (float32 [H, W, 4]).", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "input", "output"], flag_values=fv)


def run(fv) -> int:
    from hrdecoder_jax import checkpoint, cli
    from hrdecoder_jax.inference import make_forward

    paths = list_inputs(fv.input)
    if not paths:
        raise cli.CommandError(f"no JPEG/PNG/TIFF files in {fv.input}")
    out_dir = cli.check_writable_dir(fv.output, "--output")        # before any model runs
    model, meta = checkpoint.restore_for_inference(fv.config, fv.workdir, cli.checkpoint_choice(fv.checkpoint))
    print(f"restored {fv.workdir} ({fv.checkpoint}, step {meta.get('step')})", file=sys.stderr, flush=True)
    done, skipped = predict_paths(make_forward(model), paths, fv.config, out_dir, save_npy=fv.save_npy)
    print(f"wrote predictions of {len(done)} file(s) to {fv.output}"
          + (f"; skipped {len(skipped)} unreadable" if skipped else ""), flush=True)
    return 0 if done else 1


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.predict`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    return cli.main("predict", __doc__, define_flags, run, argv, purpose="inference")


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.predict")
