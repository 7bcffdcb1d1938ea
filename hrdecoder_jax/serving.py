"""Run an exported model (``python -m hrdecoder_jax.export``) with JAX and NumPy alone: no Flax, no
TensorFlow, no config file, no checkpoint. This module imports nothing else of the package, so a server
can copy it beside the artifact::

    from hrdecoder_jax.serving import load          # or: hrdecoder_jax.export.load
    model = load("exported/")                        # manifest.json + model.stablehlo
    probs = model.predict(photo)                     # uint8 RGB [H, W, 3] -> float32 [H, W, 4] (EX, HE, SE, MA)

``predict`` is what ``python -m hrdecoder_jax.predict`` computes: the photo resized to the test scale
(``photo_to_input``), the artifact, and its logits resized back to the photo's size with the sigmoid last
(``logits_to_photo``). ``model(images)`` runs the artifact alone on a batch already at the test scale.

Compile options matter on CPUs as they do for the package's commands: XLA's default YNNPACK reductions
lose float32 precision, ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce``
(set before JAX starts) gives the numbers ``predict`` gives.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST = "manifest.json"
STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A folder that is not a usable export (the message names the folder and what is wrong)."""


# ----------------------------------------------------------------------------------------------------------
# Photo -> the artifact's input
# ----------------------------------------------------------------------------------------------------------


def _half_pixel_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR's source pixels along one axis: ``src = (o + 0.5) * n_in / n_out - 0.5`` (float64)
    clamped to ``[0, n_in - 1]``, ``i0 = floor(src)``, ``i1 = min(i0 + 1, n_in - 1)``, float32 weight
    ``src - i0`` (as ``data.augment.bilinear_indices``)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (float(n_in) / float(n_out)) - 0.5
    src = np.clip(src, 0.0, n_in - 1.0)
    i0 = np.floor(src)
    frac = (src - i0).astype(np.float32)
    i0 = i0.astype(np.int64)
    return i0, np.minimum(i0 + 1, n_in - 1), frac


def _lerp(x: np.ndarray, i0, i1, frac, axis: int) -> np.ndarray:
    a = np.take(x, i0, axis=axis).astype(np.float32)
    b = np.take(x, i1, axis=axis).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    return a + (b - a) * frac.reshape(shape)


def photo_to_input(photo: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 RGB ``[H0, W0, 3]`` -> uint8 ``[h, w, 3]`` at ``size = (h, w)``, the artifact's input: the
    evaluation pipeline's resize (bilinear, half-pixel centres, no antialias, float32) and its rounding half
    up to the uint8 grid, bit for bit."""
    photo = np.asarray(photo)
    if photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f"photo must be RGB [H, W, 3], got shape {photo.shape}")
    h, w = (int(v) for v in size)
    r0, r1, rf = _half_pixel_indices(photo.shape[0], h)
    c0, c1, cf = _half_pixel_indices(photo.shape[1], w)
    # The source box the resize reads, and the interpolation order the pipeline picks from the sizes alone
    # (first along the axis that shrinks the intermediate more: the order changes the float32 rounding).
    src = photo[r0[0]:r1[-1] + 1, c0[0]:c1[-1] + 1]
    r0, r1, c0, c1 = r0 - r0[0], r1 - r0[0], c0 - c0[0], c1 - c0[0]
    src_h, src_w = int(r1[-1]) + 1, int(c1[-1]) + 1
    if h * src_w <= src_h * w:
        out = _lerp(_lerp(src, r0, r1, rf, 0), c0, c1, cf, 1)
    else:
        out = _lerp(_lerp(src, c0, c1, cf, 1), r0, r1, rf, 0)
    return np.clip(np.floor(out + np.float32(0.5)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# The artifact's logits -> probabilities at the photo's size
# ----------------------------------------------------------------------------------------------------------


def _align_corners_false_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch ``interpolate(bilinear, align_corners=False)`` along one axis for float32 data: ``scale =
    float32(n_in) / float32(n_out)``, ``src = max(scale * (o + 0.5) - 0.5, 0)`` rounded once (a fused
    multiply-add), ``i0 = min(floor(src), n_in - 1)``, ``i1 = min(i0 + 1, n_in - 1)``, ``lam = src - i0``."""
    scale = np.float32(n_in) / np.float32(n_out)
    centres = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), lam


@functools.partial(jax.jit, static_argnames=("size",))
def _resize_sigmoid(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    out = logits.astype(jnp.float32)
    for axis, n_out in ((1, size[0]), (2, size[1])):
        i0, i1, lam = _align_corners_false_indices(out.shape[axis], n_out)
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        lam = jnp.asarray(lam).reshape(shape)
        out = (1 - lam) * jnp.take(out, jnp.asarray(i0), axis=axis) + lam * jnp.take(out, jnp.asarray(i1), axis=axis)
    return jax.nn.sigmoid(out)


def logits_to_photo(logits, size: Sequence[int]) -> jax.Array:
    """Logits ``[B, h, w, K]`` -> probabilities ``[B, H0, W0, K]`` at ``size = (H0, W0)``: bilinear resize
    (``align_corners=False``, no antialias), then the sigmoid, as the reference's last step."""
    return _resize_sigmoid(jnp.asarray(logits), (int(size[0]), int(size[1])))


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def read_manifest(directory: str) -> dict[str, Any]:
    """The ``manifest.json`` of an export folder; raises ``ArtifactError`` naming the folder."""
    path = os.path.join(os.path.expanduser(directory), MANIFEST)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: no {MANIFEST}; not an export of python -m hrdecoder_jax.export") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {doc.get('format_version')!r}, this loader reads "
                            f"{FORMAT_VERSION}")
    return doc


class ExportedModel:
    """A loaded StableHLO export (see ``load``)."""

    def __init__(self, directory: str, manifest: dict[str, Any], exported):
        self.directory, self.manifest, self.exported = directory, manifest, exported
        size = manifest["input"]["test_scale"]
        self.input_size = (int(size["height"]), int(size["width"]))
        self.lesions = tuple(manifest["lesions"])
        self._call = jax.jit(exported.call)

    def __call__(self, images) -> tuple[jax.Array, jax.Array]:
        """uint8 images ``[B, h, w, 3]`` at the test scale -> ``(probabilities, logits)``, ``[B, h, w, 4]``."""
        images = jnp.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != (*self.input_size, 3) or images.dtype != jnp.uint8:
            raise ValueError(f"images must be uint8 [B, {self.input_size[0]}, {self.input_size[1]}, 3] "
                             f"(photo_to_input), got {images.dtype} {tuple(images.shape)}")
        return self._call(images)

    def predict(self, photo: np.ndarray) -> np.ndarray:
        """float32 ``[H0, W0, 4]`` probabilities of the uint8 RGB photo ``[H0, W0, 3]``, as ``predict``."""
        _, logits = self(photo_to_input(photo, self.input_size)[None])
        return np.asarray(logits_to_photo(logits, np.shape(photo)[:2])[0], np.float32)


def load(directory: str) -> ExportedModel:
    """Load the StableHLO artifact of an export folder (``manifest.json`` + ``model.stablehlo``)."""
    manifest = read_manifest(directory)
    name = manifest.get("artifacts", {}).get("stablehlo")
    if not name:
        raise ArtifactError(f"{directory}: the export has no StableHLO artifact (formats: "
                            f"{', '.join(manifest.get('artifacts', {})) or 'none'}); export with --format stablehlo")
    path = os.path.join(os.path.expanduser(directory), name)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ArtifactError(f"{path}: {e.strerror or e}") from None
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # noqa: BLE001 - flatbuffer and version errors come in many types
        raise ArtifactError(f"{path}: not a readable jax.export artifact ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    platform = jax.export.default_export_platform()
    if platform not in exported.platforms:
        raise ArtifactError(f"{path}: exported for {', '.join(exported.platforms)}, this process runs on "
                            f"{platform}; export again with --platforms {platform}")
    return ExportedModel(os.path.expanduser(directory), manifest, exported)
