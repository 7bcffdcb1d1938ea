"""Exported artifacts of a trained model: the test-time function, StableHLO (``jax.export``) and ONNX
(``jax2onnx``), and the manifest beside them. The ``export`` command is built on this; ``serving`` loads the
StableHLO artifact with JAX alone.

The exported function is the whole test-time path at the config's test scale::

    uint8 RGB images [B, H, W, 3] (photos already resized to data.test_scale, see serving.photo_to_input)
      -> (x - mean) / std -> model.test_cfg inference (slide or whole, flip, window weighting)
      -> (probabilities [B, H, W, 4], logits [B, H, W, 4])       lesions EX, HE, SE, MA; NHWC; float32

``B`` is symbolic, ``H, W`` are fixed. The logits are there because the reference's last step resizes the
*logits* to the photo's size and applies the sigmoid after (``inference.probabilities``); resizing the
probabilities instead differs from it at lesion borders.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hrdecoder_jax import LESIONS, __version__
from hrdecoder_jax.config_utils import window_weighting
from hrdecoder_jax.ops import library
from hrdecoder_jax.serving import FORMAT_VERSION, MANIFEST, ONNX_FILE, STABLEHLO_FILE
from hrdecoder_jax.workdir import write_file

FORMATS = ("stablehlo", "onnx")
INPUT_NAME, OUTPUT_NAMES = "images", ("probabilities", "logits")
ONNX_OPSET = 21


class ExportError(ValueError):
    """An export that cannot be made (the message names the setting or the primitive)."""


# ----------------------------------------------------------------------------------------------------------
# The function
# ----------------------------------------------------------------------------------------------------------


def input_size(config) -> tuple[int, int]:
    """``(H, W)`` of the exported function's images: ``data.test_scale`` is ``(W, H)``."""
    w, h = (int(v) for v in config.data.test_scale)
    return h, w


def serving_function(model, config) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``uint8 images [B, H, W, 3] -> (probabilities, logits)``, each ``[B, H, W, 4]``, of ``model`` (put in
    eval mode) with ``config``'s normalisation and ``model.test_cfg``: what ``predict`` computes before its
    final resize to the photo's size. Traceable with a symbolic batch size."""
    from hrdecoder_jax.inference import inference, make_forward

    if not config.data.quantize_uint8:
        raise ExportError("data.quantize_uint8=False: the exported function takes uint8 images, which are the "
                          "quantised ones; export a config that quantises (the default)")
    window_weighting(config.model.test_cfg)
    model.eval()
    forward = make_forward(model)
    # mmcv's imnormalize, as data.augment.normalize: float32 (x - mean) times 1/std computed in float64.
    mean = np.asarray(config.data.mean, np.float32)
    stdinv = np.asarray([1.0 / s for s in config.data.std], np.float32)
    test_cfg = config.model.test_cfg

    def serve(images):
        # XLA's own operations only: the artifact runs where this package's CPU kernels are not registered.
        with library.backend_scope("xla"):
            x = (images.astype(jnp.float32) - mean) * stdinv
            logits = inference(forward, x, test_cfg)
        return jax.nn.sigmoid(logits), logits

    return serve


def input_spec(config, batch: int | str = "B") -> jax.ShapeDtypeStruct:
    """The images' shape and dtype; ``batch`` a number or the name of a symbolic dimension."""
    h, w = input_size(config)
    b = jax.export.symbolic_shape(batch)[0] if isinstance(batch, str) else int(batch)
    return jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8)


# ----------------------------------------------------------------------------------------------------------
# StableHLO
# ----------------------------------------------------------------------------------------------------------


def export_stablehlo(fn: Callable, spec: jax.ShapeDtypeStruct, platforms: Sequence[str] = ("cpu",)) -> bytes:
    """``jax.export`` of ``fn`` at ``spec`` for ``platforms``, serialised. A multi-platform export keeps
    ``lax.platform_dependent`` choices as a conditional on the platform, resolved when it is compiled."""
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
    return exported.serialize()


# ----------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------


def _platform_index(platforms, platform: str) -> int:
    """The branch ``lax.platform_dependent`` takes on ``platform`` (its default for an unnamed platform)."""
    for i, names in enumerate(platforms):
        if names is not None and platform in names:
            return i
    for i, names in enumerate(platforms):
        if names is None:
            return i
    raise ExportError(f"lax.platform_dependent has no branch for platform {platform!r} and no default")


_INLINED = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
            "custom_vjp_call_jaxpr", "remat", "checkpoint")


# Primitives newer than jax2onnx 0.12 knows, as the older ones they are equal to.
_REWRITES = {
    # lax.stack_p (JAX 0.10; jnp.stack binds it): a concatenation of the arrays with a new axis each.
    "stack": lambda *arrays, axis: jax.lax.concatenate([jax.lax.expand_dims(a, (axis,)) for a in arrays], axis),
}


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None:
            return (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
    return None


def _eval_for_platform(jaxpr, consts, args, platform: str) -> list:
    """Evaluate ``jaxpr`` (re-tracing it in the caller's trace) with every ``lax.platform_dependent`` choice
    made for ``platform``: ``platform_index`` becomes a constant and the conditional on it its branch. Calls
    (``jit``, custom derivatives) are inlined so that the choices inside them are made too, the primitives
    of ``_REWRITES`` are rewritten, and every other primitive is bound as it was."""
    from jax.extend import core as jcore

    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "platform_index":
            outvals = [np.int32(_platform_index(eqn.params["platforms"], platform))]
        elif name == "cond" and "branches_platforms" in eqn.params:
            index = invals[0]
            if isinstance(index, jax.core.Tracer):
                raise ExportError("a platform-dependent conditional whose platform is not known at export")
            branch = eqn.params["branches"][int(index)]
            outvals = _eval_for_platform(branch.jaxpr, branch.consts, invals[1:], platform)
        elif name in _REWRITES:
            outvals = [_REWRITES[name](*invals, **eqn.params)]
        elif name in _INLINED and _sub_jaxpr(eqn) is not None:
            sub, sub_consts = _sub_jaxpr(eqn)
            outvals = _eval_for_platform(sub, sub_consts, invals, platform)
        else:
            outvals = eqn.primitive.bind(*invals, **eqn.params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for v, val in zip(eqn.outvars, outvals):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def for_platform(fn: Callable, platform: str) -> Callable:
    """``fn`` with its ``lax.platform_dependent`` choices made for ``platform`` at trace time, as
    ``jax.export`` makes them when it lowers for one platform. For converters that read jaxprs (jax2onnx):
    ``platform='onnx'`` takes every default branch (the model's CPU fusion fences are XLA-specific; their
    default is the identity, the same function)."""
    def resolved(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat = _eval_for_platform(closed.jaxpr, closed.consts, jax.tree.leaves(args), platform)
        return jax.tree.unflatten(jax.tree.structure(out_shape), flat)
    return resolved


@contextlib.contextmanager
def _core_primitives_only():
    """Convert from JAX's core primitives only. Besides its converters of ``lax`` primitives, jax2onnx (0.12.x)
    swaps the Python-level APIs (``jax.numpy``, ``jax.nn``, ``jax.image``, Flax NNX and Equinox layers) for
    primitives of its own while it traces, and two of those break this model: its NNX convolution binds an
    unhashable padding list (JAX >= 0.7 rejects it) and its ``jnp.concatenate`` gives a concatenation of
    ``n`` arrays of batch ``B`` the batch ``B``. Without those plugins the same code traces to the ``lax``
    primitives it is made of, which jax2onnx converts one by one."""
    from jax2onnx.plugins import plugin_system

    plugin_system.import_all_plugins()
    registry = plugin_system.PLUGIN_REGISTRY
    patching = tuple(f"jax2onnx.plugins.{p}" for p in ("flax", "equinox", "dm_pix", "jax.numpy", "jax.nn",
                                                        "jax.image", "jax.random", "examples"))
    removed = {k: v for k, v in registry.items() if type(v).__module__.startswith(patching)}
    for k in removed:
        del registry[k]
    try:
        yield
    finally:
        registry.update(removed)


@contextlib.contextmanager
def _quiet(*names: str):
    """The named loggers at ERROR for a while (jax2onnx logs every plugin it skips, onnx_ir every value
    whose type it leaves out, each with a traceback)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(fn: Callable, spec: jax.ShapeDtypeStruct, path: str, *, opset: int = ONNX_OPSET) -> None:
    """``fn`` at ``spec`` as an ONNX model in ``path`` (``jax2onnx``; the ``onnx`` extra). The batch is the
    symbolic dimension ``B`` (intermediate shapes carry expressions of it, e.g. ``9*B`` for nine windows);
    input ``images``, outputs ``probabilities`` and ``logits``."""
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ExportError(f"--format onnx needs jax2onnx and onnx ({e}); install the extra: "
                          "pip install -c requirements-lock.txt -e '.[onnx]'") from None
    shape = tuple(d if isinstance(d, int) else str(d) for d in spec.shape)
    try:
        # jax2onnx also prints a DEBUG line per convolution to stdout.
        with _quiet("jax2onnx", "onnx_ir"), _core_primitives_only(), contextlib.redirect_stdout(io.StringIO()):
            model = to_onnx(for_platform(fn, "onnx"), inputs=[jax.ShapeDtypeStruct(shape, spec.dtype)],
                            model_name="hrdecoder", opset=opset, return_mode="proto",
                            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
    except NotImplementedError as e:
        raise ExportError(f"jax2onnx cannot convert the model: {str(e).splitlines()[0]}") from None
    onnx.save(model, path)


# ----------------------------------------------------------------------------------------------------------
# Manifest and files
# ----------------------------------------------------------------------------------------------------------


def config_digest(config) -> str:
    """SHA-256 of the config's canonical JSON (every field, sorted keys)."""
    text = config.to_json(sort_keys=True) if hasattr(config, "to_json") else json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest(config, *, config_name: str, step: int | None, which: str | int | None, formats: Sequence[str],
             platforms: Sequence[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``manifest.json`` of an export: everything a server needs to feed the artifact and read it back."""
    import jaxlib

    h, w = input_size(config)
    tc = config.model.test_cfg
    weighting, sigma_scale = window_weighting(tc)
    doc = {
        "format_version": FORMAT_VERSION,
        "artifacts": {fmt: {"stablehlo": STABLEHLO_FILE, "onnx": ONNX_FILE}[fmt] for fmt in formats},
        "config": {"name": config_name, "digest": "sha256:" + config_digest(config),
                   "model_type": config.model.type, "dtype": str(config.model.dtype or "float32")},
        "checkpoint": {"which": which, "step": step},
        "lesions": list(LESIONS),
        "layout": "NHWC",
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", h, w, 3], "channels": "RGB",
                  "test_scale": {"width": w, "height": h},
                  "from_photo": "resize the photo to (height, width) bilinearly with half-pixel centres and "
                                "no antialiasing (OpenCV INTER_LINEAR), round half up to uint8 "
                                "(hrdecoder_jax.serving.photo_to_input)"},
        "normalisation": {"mean": [float(v) for v in config.data.mean],
                          "std": [float(v) for v in config.data.std],
                          "rule": "(float32(x) - mean) * float32(1 / std), inside the artifact"},
        "test_cfg": {"mode": tc.mode, "crop_size": list(tc.crop_size), "stride": list(tc.stride),
                     "flip": bool(tc.get("flip", False)), "weighting": weighting, "sigma_scale": sigma_scale},
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": ["B", h, w, len(LESIONS)],
                     "what": "sigmoid(logits) at the test scale"},
                    {"name": "logits", "dtype": "float32", "shape": ["B", h, w, len(LESIONS)],
                     "what": "the blended logits at the test scale"}],
        "to_photo_size": {"resize": "bilinear", "align_corners": False, "antialias": False, "of": "logits",
                          "then": "sigmoid",
                          "why": "the reference resizes the logits to the photo's size and applies the sigmoid "
                                 "last; resizing the probabilities instead differs at lesion borders",
                          "code": "hrdecoder_jax.serving.logits_to_photo"},
        "platforms": list(platforms),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "hrdecoder_jax": __version__},
    }
    if extra:
        doc.update(extra)
    return doc


def check_output_dir(out_dir: str) -> str:
    """``out_dir`` as an absolute path if an export may be written there (absent, empty, or a previous
    export); raises ``ExportError`` naming it otherwise. Nothing is created."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"--output {out_dir} is a file; give a folder")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
            raise ExportError(f"--output {out_dir} holds other files (no {MANIFEST}); give an empty or new folder")
    return out_dir


def write_export(out_dir: str, files: dict[str, Callable[[str], None]], manifest_doc: dict[str, Any]) -> str:
    """Write an export folder as a whole: every ``files[name](path)`` and the manifest go into a temporary
    sibling folder, which then replaces ``out_dir`` (a previous export there is removed only after the new
    one is complete). ``out_dir`` must be absent, empty, or a previous export (it has a manifest)."""
    out_dir = check_output_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)            # mkdtemp's folders are private; the export is an ordinary one
    try:
        for name, write in files.items():
            write(os.path.join(tmp, name))
        write_file(os.path.join(tmp, MANIFEST), json.dumps(manifest_doc, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "export"))
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old:
            os.rename(os.path.join(old, "export"), out_dir)
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
