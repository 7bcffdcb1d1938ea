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

``<stem>`` is the file name without its extension, or with it (``a.jpg``) where two inputs share a stem
(``a.jpg`` and ``a.png``), so no two inputs write the same file and no output overwrites an input. Every
file is written under a temporary name and renamed when complete. ``predictions.json`` in the output folder
lists what predict wrote there; a folder given as ``--input`` leaves those files out, so ``--output`` may
be the input folder and a later run never predicts its own outputs.

A file that cannot be read (a broken link included) is reported on one line (``skipped FILE: reason``) and
skipped; the exit status is non-zero only when no file could be processed.
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
    """``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` of any numeric dtype -> uint8 ``[H, W, 3]``
    (``data.manual.to_uint8_rgb``, which the dataset builders use too)."""
    from hrdecoder_jax.data.manual import to_uint8_rgb
    return to_uint8_rgb(array)


def read_image(path: str) -> np.ndarray:
    """The photo at ``path`` as uint8 RGB ``[H, W, 3]`` (PIL, decoded like the dataset builders decode
    their images: ``data.manual.pil_to_rgb``; tifffile for TIFFs PIL cannot read).

    Raises ``UnreadableImageError`` naming the file."""
    from PIL import Image, ImageOps

    from hrdecoder_jax.data.manual import pil_to_rgb

    if os.path.islink(path) and not os.path.exists(path):
        raise UnreadableImageError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
    errors = []
    try:
        with Image.open(path) as im:
            return pil_to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # noqa: BLE001 - any decoder failure means: try the next reader, then report
        errors.append(f"{type(e).__name__}: {e}")
    if path.lower().endswith((".tif", ".tiff")):
        try:
            import tifffile

            return _to_uint8_rgb(tifffile.imread(path))
        except Exception as e:  # noqa: BLE001
            errors.append(f"tifffile: {type(e).__name__}: {e}")
    raise UnreadableImageError(f"{path}: not a readable image ({'; '.join(errors)})")


MANIFEST = "predictions.json"   # in an output folder: the files predict wrote there, and from which input


def recorded_outputs(folder: str) -> dict[str, str]:
    """``{output file name: input path}`` of what predict wrote into ``folder`` (its ``predictions.json``)."""
    import json
    try:
        with open(os.path.join(os.path.expanduser(folder), MANIFEST)) as f:
            outputs = json.load(f).get("outputs", {})
        return {str(k): str(v) for k, v in outputs.items()} if isinstance(outputs, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def list_inputs(path: str) -> list[str]:
    """``path`` itself if it is a file, else the image files (by extension) directly in the folder, sorted,
    less the outputs an earlier predict wrote there (``recorded_outputs``). A broken link is listed (its read
    reports it)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        outputs = recorded_outputs(path)
        return sorted(os.path.join(path, n) for n in os.listdir(path)
                      if n.lower().endswith(IMAGE_EXTENSIONS) and n not in outputs
                      and not os.path.isdir(os.path.join(path, n)))
    if os.path.exists(path) or os.path.islink(path):
        return [path]
    raise FileNotFoundError(f"{path}: no such file or folder")


def output_stems(paths: list[str]) -> dict[str, str]:
    """The ``<stem>`` of each input's outputs: its file name without the extension, or with it where two
    inputs share a stem (compared without case, as on a case-insensitive file system); what still meets
    another gets ``-2``, ``-3``, ..."""
    from collections import Counter

    base = {p: os.path.splitext(os.path.basename(p))[0] for p in paths}
    shared = Counter(b.lower() for b in base.values())
    stems, taken = {}, set()
    for p in paths:
        stem = base[p] if shared[base[p].lower()] == 1 else os.path.basename(p)
        candidate, n = stem, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.lower())
        stems[p] = candidate
    return stems


def output_names(stem: str, save_npy: bool = False) -> dict[str, str]:
    """``{kind: file name}`` of the outputs of one input (kinds EX, HE, SE, MA, overlay, probs)."""
    names = {lesion: f"{stem}_{lesion}.png" for lesion in LESIONS}
    names["overlay"] = f"{stem}_overlay.png"
    if save_npy:
        names["probs"] = f"{stem}_probs.npy"
    return names


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


def predict_file(model_forward: Callable, path: str, config, out_dir: str, save_npy: bool = False,
                 stem: str | None = None) -> dict[str, str]:
    """Predict one photo and write its outputs into ``out_dir``; returns ``{kind: path}`` of what was written
    (kinds ``EX, HE, SE, MA, overlay`` and ``probs`` with ``save_npy``). ``stem``: of the output names
    (default: the file name without its extension). Each file is complete or absent
    (``workdir.atomic_write``).

    ``model_forward``: ``inference.make_forward(model)`` (or any ``images -> logits`` function).
    Raises ``UnreadableImageError`` for a file that is not a readable image.
    """
    from PIL import Image

    from hrdecoder_jax.workdir import atomic_write

    image = read_image(path)
    probs = predict_probabilities(model_forward, image, config)
    os.makedirs(out_dir, exist_ok=True)
    stem = stem or os.path.splitext(os.path.basename(path))[0]
    written = {kind: os.path.join(out_dir, name) for kind, name in output_names(stem, save_npy).items()}
    for c, lesion in enumerate(LESIONS):
        grey = np.round(255.0 * np.clip(probs[..., c], 0.0, 1.0)).astype(np.uint8)
        with atomic_write(written[lesion], "wb") as f:
            Image.fromarray(grey).save(f, format="PNG")
    with atomic_write(written["overlay"], "wb") as f:
        Image.fromarray(overlay(image, probs)).save(f, format="PNG")
    if save_npy:
        with atomic_write(written["probs"], "wb") as f:
            np.save(f, probs.astype(np.float32))
    return written


def predict_paths(model_forward: Callable, paths: list[str], config, out_dir: str, *, save_npy: bool = False,
                  log=None) -> tuple[list[str], list[str]]:
    """``predict_file`` on each path, with the output stems of ``output_stems`` (inputs that share a stem
    keep their extension); unreadable files are reported through ``log`` and skipped (an error writing the
    outputs stops). Returns ``(done, skipped)`` paths."""
    import time

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    stems = output_stems(paths)
    done, skipped = [], []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        try:
            predict_file(model_forward, path, config, out_dir, save_npy=save_npy, stem=stems[path])
        except UnreadableImageError as e:     # writing errors are not the input's fault: they stop the run
            log(f"skipped {path}: {e}")
            skipped.append(path)
            continue
        done.append(path)
        log(f"[{i + 1}/{len(paths)}] {path} {time.perf_counter() - t0:.1f}s")
    return done, skipped


def _record_outputs(out_dir: str, paths: list[str], stems: dict[str, str], save_npy: bool, source: str) -> None:
    """Add this run's outputs to ``out_dir/predictions.json`` (before they are written: a run stopped midway
    leaves no output that a later run could take for a photo)."""
    import json

    from hrdecoder_jax.workdir import write_file

    outputs = recorded_outputs(out_dir)
    for path in paths:
        for name in output_names(stems[path], save_npy).values():
            outputs[name] = os.path.abspath(path)
    doc = {"what": "files written by python -m hrdecoder_jax.predict (a folder given as --input leaves them out)",
           "checkpoint": source, "outputs": dict(sorted(outputs.items()))}
    write_file(os.path.join(out_dir, MANIFEST), json.dumps(doc, indent=1) + "\n")


def define_flags(fv) -> None:
    from absl import flags

    from hrdecoder_jax import cli
    flags.DEFINE_string("workdir", None, "Directory holding the Orbax checkpoint (training or convert).", flag_values=fv)
    cli.define_checkpoint_flag(fv)
    flags.DEFINE_string("input", None, "A photo, or a folder of JPEG/PNG/TIFF photos.", flag_values=fv)
    flags.DEFINE_string("output", None, "Folder for the outputs.", flag_values=fv)
    flags.DEFINE_bool("save_npy", False, "Also write <stem>_probs.npy (float32 [H, W, 4]).", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "input", "output"], flag_values=fv)


def _photos(path: str) -> list[str]:
    """The photos ``--input`` names (``list_inputs``), saying which earlier outputs were left out; an earlier
    output named on its own is refused."""
    from hrdecoder_jax import cli

    paths = list_inputs(path)
    if os.path.isdir(os.path.expanduser(path)):
        recorded = recorded_outputs(path)
        left_out = [n for n in os.listdir(os.path.expanduser(path)) if n in recorded]
        if left_out:
            print(f"left out {len(left_out)} output file(s) of an earlier predict in {path} (listed in its "
                  f"{MANIFEST})", file=sys.stderr, flush=True)
    elif os.path.basename(paths[0]) in recorded_outputs(os.path.dirname(os.path.abspath(paths[0]))):
        raise cli.CommandError(f"{path} is an output of an earlier predict (listed in {MANIFEST} beside it), "
                               "not a photo")
    if not paths:
        raise cli.CommandError(f"no JPEG/PNG/TIFF files in {path}")
    return paths


def _check_no_input_overwritten(paths: list[str], stems: dict[str, str], out_dir: str, save_npy: bool) -> None:
    """Refuse, before any work, an output name that is one of the inputs (``--output`` = the input folder)."""
    from hrdecoder_jax import cli

    inputs = {os.path.realpath(p): p for p in paths}
    for path in paths:
        for name in output_names(stems[path], save_npy).values():
            hit = inputs.get(os.path.realpath(os.path.join(out_dir, name)))
            if hit is not None:
                raise cli.CommandError(f"the output {name} of {path} would overwrite the input {hit}; choose "
                                       "another --output")


def run(fv) -> int:
    from hrdecoder_jax import checkpoint, cli, config_utils
    from hrdecoder_jax.inference import make_forward

    config_utils.validate_config(fv.config)
    paths = _photos(fv.input)
    out_dir = cli.check_writable_dir(fv.output, "--output")        # before any model runs
    stems = output_stems(paths)
    _check_no_input_overwritten(paths, stems, out_dir, fv.save_npy)
    model, meta = checkpoint.restore_for_inference(fv.config, fv.workdir, cli.checkpoint_choice(fv.checkpoint))
    print(f"restored {fv.workdir} ({fv.checkpoint}, step {meta.get('step')})", file=sys.stderr, flush=True)
    _record_outputs(out_dir, paths, stems, fv.save_npy, meta.get("checkpoint") or fv.workdir)
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
