"""``python -m hrdecoder_jax.evaluate``: the reference lesion metrics of a checkpoint, with its reports.

The loop is ``hrdecoder_jax.evaluation.evaluate``; this module adds the report writers and the command,
which restores an Orbax checkpoint written by training or by ``convert``::

    python -m hrdecoder_jax.evaluate --config configs/idrid.py --workdir runs/idrid \\
        [--checkpoint best|latest|STEP] [--split test] [--output DIR] [--config.eval.max_images=5]

prints the per-lesion table and writes ``metrics.json`` (which also records the step, checkpoint folder and
workdir it scored), ``per_image.csv`` and ``pr_curves.png`` into ``--output`` (default
``WORKDIR/eval_<split>_<step>/``). Each file is written under a temporary name and renamed when complete,
after the table is printed: an interruption or a full disk never leaves a partial file, and the error
names the file.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Any

import numpy as np

from hrdecoder_jax import LESIONS
from hrdecoder_jax.evaluation import evaluate, jsonable  # noqa: F401  (jsonable: part of the API)

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
    from hrdecoder_jax.workdir import atomic_write
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
    from hrdecoder_jax.workdir import atomic_write
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=os.path.splitext(path)[1].lstrip(".") or "png")


def write_outputs(results: dict[str, Any], out_dir: str, *, title: str = "",
                  scored: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``metrics.json`` (with ``scored``, what was evaluated), ``per_image.csv`` and ``pr_curves.png``
    into ``out_dir``, each complete or not at all (``workdir.atomic_write``); returns their paths."""
    from hrdecoder_jax.workdir import atomic_write
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("metrics.json", "per_image.csv", "pr_curves.png")}
    with atomic_write(paths["metrics.json"]) as f:
        json.dump(metrics_json(results, scored), f, indent=2)
    write_per_image_csv(results, paths["per_image.csv"])
    plot_pr_curves(results, paths["pr_curves.png"], title=title)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def define_flags(fv) -> None:
    from absl import flags

    from hrdecoder_jax import cli
    flags.DEFINE_string("workdir", None, "Training or convert directory holding the Orbax checkpoint.", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    cli.define_checkpoint_flag(fv)
    flags.DEFINE_string("split", None, "Split to score (default config.eval.split).", flag_values=fv)
    flags.DEFINE_string("output", None, "Output folder (default WORKDIR/eval_<split>_<step>).", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Print one line per image.", flag_values=fv)


def run(fv) -> int:
    from hrdecoder_jax import checkpoint, cli, config_utils
    from hrdecoder_jax.data import open_split
    from hrdecoder_jax.metrics import format_table

    config = fv.config
    config_utils.validate_config(config)
    split = fv.split or config.eval.split
    which = cli.checkpoint_choice(fv.checkpoint)
    # Where the outputs go is checked before the model runs (the step is known only after restoring,
    # so the default folder's parent, the workdir, is what is checked first).
    workdir = os.path.expanduser(fv.workdir)
    if fv.output:
        cli.check_writable_dir(fv.output, "--output")
    elif os.path.isdir(workdir):
        cli.check_writable_dir(workdir, "the workdir (default --output)")
    model, meta = checkpoint.restore_for_inference(config, workdir, which)
    step = meta.get("step", 0)
    print(f"restored {fv.workdir} ({fv.checkpoint}, step {step})", file=sys.stderr, flush=True)
    dataset = open_split(config.data, split)
    run_dir = workdir                       # a step's own folder as --workdir: its run's folder, not inside it
    scored_dir = os.path.dirname(meta.get("checkpoint") or "")
    if os.path.basename(scored_dir) in (checkpoint.LATEST_DIR, checkpoint.BEST_DIR) and \
            os.path.abspath(workdir) == meta.get("checkpoint"):
        run_dir = os.path.dirname(scored_dir)
    out_dir = cli.check_writable_dir(fv.output or os.path.join(run_dir, f"eval_{split}_{step}"), "--output")
    results = evaluate(model, config, dataset=dataset, progress=fv.progress)
    # The table first: whatever happens to the files, the result is on the screen.
    print(f"{config.data.name} {split} split, step {step}, {results['num_images']} images "
          f"({results['seconds']:.1f}s):")
    print(format_table(results), end="", flush=True)
    scored = {"step": step, "checkpoint": meta.get("checkpoint"), "workdir": os.path.abspath(workdir),
              "which": fv.checkpoint, "split": split, "dataset": config.data.name}
    paths = write_outputs(results, out_dir, title=f"{config.data.name} {split}, step {step}, "
                                                  f"{results['num_images']} images", scored=scored)
    print(f"wrote {', '.join(paths.values())}", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.evaluate`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    return cli.main("evaluate", __doc__, define_flags, run, argv, purpose="inference")


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.evaluate")
