"""The reports of an evaluation, written by the ``evaluate`` command and by training's final evaluation.

* ``write_outputs``: ``metrics.json`` (``metrics_json``: what was scored, per-lesion values, class means, PR
  curves), ``per_image.csv`` and ``pr_curves.png`` into one folder (``evaluate``'s
  ``WORKDIR/eval_<split>_<step>/``).
* ``read_metrics``: a ``metrics.json`` back as results (NaN restored), for the table of a finished run.

Training's final test evaluation writes the same three files into the same folder as ``evaluate`` would
(``WORKDIR/eval_<split>_<step>/``): one schema for a run's test results.

Every file is written through ``workdir.atomic_write``: complete or not at all.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np

from hrdecoder_jax import LESIONS
from hrdecoder_jax.workdir import atomic_write

PR_COLOURS = {"EX": "#d4a800", "HE": "#d62728", "SE": "#17becf", "MA": "#2ca02c"}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def metrics_json(results: dict[str, Any], scored: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document of ``metrics.json``: what was scored (``scored``: e.g. step, checkpoint, workdir,
    split), per-lesion dicts, class means, PR curves, image count."""
    from hrdecoder_jax.metrics import METRIC_NAMES

    doc: dict[str, Any] = dict(scored or {})
    doc.update({"lesions": list(LESIONS), "num_images": int(results["num_images"])})
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
    with atomic_write(path, "w", newline="") as f:
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
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=os.path.splitext(path)[1].lstrip(".") or "png")


def write_outputs(results: dict[str, Any], out_dir: str, *, title: str = "",
                  scored: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``metrics.json`` (with ``scored``, what was evaluated), ``per_image.csv`` and ``pr_curves.png``
    into ``out_dir``, each complete or not at all (``workdir.atomic_write``); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("metrics.json", "per_image.csv", "pr_curves.png")}
    with atomic_write(paths["metrics.json"]) as f:
        json.dump(metrics_json(results, scored), f, indent=2)
    write_per_image_csv(results, paths["per_image.csv"])
    plot_pr_curves(results, paths["pr_curves.png"], title=title)
    return paths


def read_metrics(path: str) -> dict[str, Any]:
    """A ``metrics.json`` of ``write_outputs`` as the results it was written from (per-lesion arrays in
    ``LESIONS`` order, class means, image count, PR curve; null back to NaN): enough for ``format_table``."""
    from hrdecoder_jax.metrics import METRIC_NAMES

    with open(path) as f:
        doc = json.load(f)
    value = lambda v: np.nan if v is None else float(v)
    results: dict[str, Any] = {"num_images": int(doc["num_images"])}
    for name in METRIC_NAMES + ("AUPR_fine",):
        results[name] = np.asarray([value(doc[name][lesion]) for lesion in LESIONS], np.float64)
        results["m" + name] = value(doc["m" + name])
    if "pr_curve" in doc:
        results["pr_curve"] = doc["pr_curve"]
    return results


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
