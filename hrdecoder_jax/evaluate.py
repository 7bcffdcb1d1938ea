"""Evaluation: the reference lesion metrics of a model on a dataset split, streamed one image at a time.

Python API (also used by training for its periodic validation, on the model in memory)::

    from hrdecoder_jax.evaluate import evaluate, open_split
    results = evaluate(model, config)                 # config.eval.split, config.eval.max_images
    results = evaluate(model, config, dataset=ds)     # any tf.data.Dataset of raw examples

Command line (restores an Orbax checkpoint written by training or by ``convert``)::

    python -m hrdecoder_jax.evaluate --config configs/idrid.py --workdir runs/idrid \\
        [--checkpoint best|latest|STEP] [--split test] [--output DIR] [--config.eval.max_images=5]

prints the per-lesion table and writes ``metrics.json``, ``per_image.csv`` and ``pr_curves.png`` into
``--output`` (default ``WORKDIR/eval_<split>_<step>/``).

Memory: each image goes through ``inference`` -> ``probabilities`` -> ``LesionMetricAccumulator.update`` and
is dropped; the accumulator keeps counts and a few scalars per image, so host memory does not grow with
the number of images (see ``docs/evaluation.md`` for a measurement at IDRiD resolution).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from hrdecoder_jax import LESIONS

PR_COLOURS = {"EX": "#d4a800", "HE": "#d62728", "SE": "#17becf", "MA": "#2ca02c"}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def _get(cfg, key, default=None):
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def open_split(data_config, split: str):
    """The raw ``tf.data.Dataset`` of ``split`` for ``data_config`` (a config's ``data`` section).

    Handles the ``synthetic_fundus`` builder config (``data_config.synthetic``, generated on first use),
    ``data_dir`` (``~`` expanded; empty means ``~/tensorflow_datasets``) and ``manual_dir`` (where the
    downloaded IDRiD/DDR files are). Examples are ``{"image", "masks", "name"}`` as ``load_split`` returns.
    """
    from hrdecoder_jax.data import load_split, synthetic_config

    name = data_config.name
    kwargs: dict[str, Any] = {}
    synthetic = _get(data_config, "synthetic")
    if name == "synthetic_fundus" and synthetic is not None:
        kwargs["config"] = synthetic_config(**(synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic)))
    data_dir = os.path.expanduser(os.fspath(_get(data_config, "data_dir", "") or "~/tensorflow_datasets"))
    manual_dir = _get(data_config, "manual_dir")
    if manual_dir:
        manual_dir = os.path.expanduser(os.fspath(manual_dir))
    else:
        manual_dir = None
    return load_split(name, split, data_dir=data_dir, manual_dir=manual_dir, **kwargs)


def _label_of(batch: dict) -> np.ndarray:
    """``[H, W]`` int32 fused label of a ``make_eval_dataset`` element (``label`` or multilabel ``masks``)."""
    if "label" in batch:
        return np.asarray(batch["label"][0], np.int32)
    masks = np.asarray(batch["masks"][0])
    label = np.zeros(masks.shape[:2], np.int32)
    for c in range(masks.shape[-1]):  # overwrite order EX, HE, SE, MA: the last one wins, as the reference
        label[masks[..., c] > 0] = c + 1
    return label


def _name_of(batch: dict, index: int) -> str:
    name = batch.get("name")
    if name is None:
        return f"image_{index:04d}"
    name = name[0]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name or f"image_{index:04d}"




# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate(model, config, *, split: str | None = None, max_images: int | None = None, progress: bool = True,
             forward: Callable | None = None, dataset=None) -> dict[str, Any]:
    """Reference lesion metrics of ``model`` (an ``nnx.Module``, put in eval mode by the caller or here)
    on ``split`` (default ``config.eval.split``) of ``config.data``, or on ``dataset`` (a raw
    ``tf.data.Dataset`` as ``open_split`` returns) when given.

    Each image: the eval pipeline (test-scale resize, normalisation), ``inference`` by
    ``config.model.test_cfg`` (slide or whole), ``probabilities`` at the original size, then the
    streaming accumulator. ``forward``: a compiled forward (``inference.make_forward(model)``) to reuse;
    by default one is made here (``model`` may then be None only if ``forward`` is given).
    ``progress``: print ``[i/n] name seconds`` lines to stderr.

    Returns ``LesionMetricAccumulator.compute()``'s dict (fractions; ``format_table`` prints it) plus
    ``names`` (image names in order), ``pr_curve`` (``thresholds``, ``precision [K, 4]``, ``recall [K, 4]``
    on the fine grid) and ``pr_curve_reference`` (the same on the reference's 11 thresholds).
    """
    import jax
    from flax import nnx

    from hrdecoder_jax.data.pipeline import make_eval_dataset
    from hrdecoder_jax.inference import inference, make_forward, probabilities
    from hrdecoder_jax.metrics import LesionMetricAccumulator

    if forward is None:
        if model is None:
            raise ValueError("evaluate needs a model or a forward function")
        if isinstance(model, nnx.Module):
            model.eval()
            forward = make_forward(model)
        else:
            forward = model
    eval_cfg = _get(config, "eval", {})
    if dataset is None:
        split = split or _get(eval_cfg, "split", "test")
        dataset = open_split(config.data, split)
    if max_images is None:
        max_images = _get(eval_cfg, "max_images")
    if max_images is not None:
        dataset = dataset.take(int(max_images))
    total = int(dataset.cardinality())
    total_text = str(total) if total >= 0 else "?"
    test_cfg = config.model.test_cfg
    accumulator = LesionMetricAccumulator(num_fine_thresholds=_get(eval_cfg, "num_fine_thresholds"))
    names: list[str] = []
    t_start = time.perf_counter()
    for i, batch in enumerate(make_eval_dataset(dataset, config.data)):
        t0 = time.perf_counter()
        logits = inference(forward, jax.numpy.asarray(batch["image"]), test_cfg)
        orig_size = tuple(int(s) for s in batch["orig_size"][0])
        probs = probabilities(logits, orig_size)[0]                 # [H0, W0, 4]
        if progress:
            probs.block_until_ready()
        accumulator.update(jax.numpy.moveaxis(probs, -1, 0), _label_of(batch))
        del logits, probs
        names.append(_name_of(batch, i))
        if progress:
            print(f"[{i + 1}/{total_text}] {names[-1]} {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    if not names:
        raise ValueError("the evaluation split has no images")
    results = accumulator.compute()
    results["names"] = names
    results["pr_curve"] = accumulator.pr_curve("fine")
    results["pr_curve_reference"] = accumulator.pr_curve("reference")
    results["seconds"] = time.perf_counter() - t_start
    return results


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def jsonable(obj):
    """``obj`` with numpy arrays/scalars as lists/floats and NaN as None, for ``json.dump``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if math.isnan(value) else value
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, bytes):
        return obj.decode()
    return obj


def metrics_json(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of ``metrics.json``: per-lesion dicts, class means, PR curves, image count."""
    from hrdecoder_jax.metrics import METRIC_NAMES

    doc: dict[str, Any] = {"lesions": list(LESIONS), "num_images": int(results["num_images"])}
    for name in METRIC_NAMES + ("AUPR_fine",):
        doc[name] = {lesion: float(v) for lesion, v in zip(LESIONS, results[name])}
        doc["m" + name] = float(results["m" + name])
    if "pr_curve" in results:
        doc["pr_curve"] = results["pr_curve"]
    doc["units"] = "fractions (the table prints x100; MAE as e-2)"
    return jsonable(doc)


def write_per_image_csv(results: dict[str, Any], path: str) -> None:
    """``name`` and per-lesion IoU/F1/MAE (fractions, NaN empty) of each image, in evaluation order."""
    per_image = results["per_image"]
    names = results.get("names") or [f"image_{i:04d}" for i in range(results["num_images"])]
    columns = [(m, c, lesion) for m in ("IoU", "F1", "MAE") for c, lesion in enumerate(LESIONS)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name"] + [f"{m}_{lesion}" for m, _, lesion in columns])
        for i, name in enumerate(names):
            row = [name]
            for m, c, _ in columns:
                v = float(per_image[m][i, c])
                row.append("" if math.isnan(v) else f"{v:.6g}")
            writer.writerow(row)


def plot_pr_curves(results: dict[str, Any], path: str, *, title: str = "") -> None:
    """``pr_curves.png``: the precision-recall curve of each lesion (fine grid, line; the reference's 11
    thresholds, dots) with its AUPR (reference protocol) in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    fine, ref = results["pr_curve"], results.get("pr_curve_reference")
    for c, lesion in enumerate(LESIONS):
        colour = PR_COLOURS[lesion]
        aupr = results["AUPR"][c]
        label = f"{lesion}  AUPR {100 * aupr:.2f}" if np.isfinite(aupr) else f"{lesion}  AUPR n/a"
        ax.plot(fine["recall"][:, c], fine["precision"][:, c], color=colour, lw=1.6, label=label)
        if ref is not None:
            ax.plot(ref["recall"][:, c], ref["precision"][:, c], "o", color=colour, ms=3)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"Precision-recall, {results['num_images']} images", fontsize=10)
    ax.legend(loc="lower left", fontsize=8, title="line: 101 thresholds, dots: 11", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(results: dict[str, Any], out_dir: str, *, title: str = "") -> dict[str, str]:
    """Write ``metrics.json``, ``per_image.csv`` and ``pr_curves.png`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("metrics.json", "per_image.csv", "pr_curves.png")}
    with open(paths["metrics.json"], "w") as f:
        json.dump(metrics_json(results), f, indent=2)
    write_per_image_csv(results, paths["per_image.csv"])
    plot_pr_curves(results, paths["pr_curves.png"], title=title)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def restore(config, workdir: str, which: str | int = "latest"):
    """A model of ``config.model`` filled from the checkpoint in ``workdir``, in eval mode; and the meta.

    The model is built abstractly (``nnx.eval_shape``: shapes only, no random initialisation, which
    takes ~20 s of eager CPU work even for the tiny config) and every variable then comes from the
    checkpoint; if anything stays unfilled, it falls back to a normal build.
    """
    import jax
    from flax import nnx

    from hrdecoder_jax import checkpoint
    from hrdecoder_jax.models import build_model

    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    meta = checkpoint.restore_model(workdir, model, which)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))):
        model = build_model(config.model, rngs=nnx.Rngs(0))
        meta = checkpoint.restore_model(workdir, model, which)
    model.eval()
    return model, meta


def _which(text: str) -> str | int:
    return int(text) if str(text).isdigit() else str(text)


def main(argv=None) -> None:
    """Entry point of ``python -m hrdecoder_jax.evaluate`` (``argv``: the full argv, program name first)."""
    from absl import app, flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file (model, data and eval sections).",
                                    flag_values=flag_values, lock_config=False, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Training or convert directory holding the Orbax checkpoint.",
                        flag_values=flag_values)
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.", flag_values=flag_values)
    flags.DEFINE_string("split", None, "Split to score (default config.eval.split).", flag_values=flag_values)
    flags.DEFINE_string("output", None, "Output folder (default WORKDIR/eval_<split>_<step>).",
                        flag_values=flag_values)
    flags.DEFINE_bool("progress", True, "Print one line per image.", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)

    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise SystemExit(f"{e}\n{flag_values.main_module_help() if hasattr(flag_values, 'main_module_help') else ''}")
    if len(rest) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(rest[1:])}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _hide_gpus_from_tensorflow()

    from hrdecoder_jax.checkpoint import CheckpointError

    config = flag_values.config
    split = flag_values.split or _get(config.eval, "split", "test")
    try:
        model, meta = restore(config, flag_values.workdir, _which(flag_values.checkpoint))
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    step = meta.get("step", 0)
    print(f"restored {flag_values.workdir} ({flag_values.checkpoint}, step {step})", file=sys.stderr, flush=True)
    try:
        dataset = open_split(config.data, split)
    except Exception as e:  # noqa: BLE001 - dataset errors name the folder already
        raise SystemExit(f"error: cannot open split '{split}' of '{config.data.name}': {e}") from None
    results = evaluate(model, config, dataset=dataset, progress=flag_values.progress)
    out_dir = flag_values.output or os.path.join(os.path.expanduser(flag_values.workdir), f"eval_{split}_{step}")
    paths = write_outputs(results, out_dir, title=f"{config.data.name} {split}, step {step}, "
                                                  f"{results['num_images']} images")
    from hrdecoder_jax.metrics import format_table

    print(f"{config.data.name} {split} split, step {step}, {results['num_images']} images "
          f"({results['seconds']:.1f}s):")
    print(format_table(results), end="")
    print(f"wrote {', '.join(paths.values())}", flush=True)


def _hide_gpus_from_tensorflow() -> None:
    """tf.data only runs on the CPU; keep TensorFlow off the accelerators JAX uses."""
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # noqa: BLE001 - already initialised or no TF GPU support: harmless
        pass


if __name__ == "__main__":
    main()
