"""Slide-window blending compared: test metrics and a seam figure for each ``model.test_cfg.weighting``.

    python -m hrdecoder_jax.tools.window_seams --config configs/synthetic.py --workdir runs/synthetic \\
        [--checkpoint best|latest|STEP] [--split test] [--weightings uniform,gaussian] [--json FILE]

For each weighting it scores the split with the reference lesion metrics (``evaluation.evaluate``) and
measures seams on the blended logits at the test scale: the mean absolute difference of horizontally or
vertically neighbouring logits across a window border (a pixel pair whose two pixels are covered by
different sets of slide windows: the first or last row/column of some window, inside the image) and
elsewhere, pooled over lesions and images; ``ratio`` = border / elsewhere. A blend without seams has a
ratio near 1 (image content alone); a uniform average of windows that disagree near their borders has a
jump there.

HRDecoder's own HR windows (``hr_scale`` tiles of every slide window, fused with the LR logits inside the
model) have borders of their own, which no slide weighting touches. They are reported apart (``hr_border``:
pairs across an HR-window border that is no slide border) and left out of ``elsewhere``; where the two
coincide (the synthetic config with stride 128: both every 128 pixels) the slide figure holds both, and a
stride that is not a multiple of ``hr_scale`` separates them.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np

from hrdecoder_jax.config_utils import WINDOW_WEIGHTINGS
from hrdecoder_jax.workdir import write_file


def border_masks(image_size: Sequence[int], boxes: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the neighbour pairs that cross a window border: ``rows [H - 1]`` (pair of rows
    ``i, i + 1``) and ``cols [W - 1]`` (columns ``j, j + 1``), true where some window starts at ``i + 1``
    or ends after ``i`` (inside the image)."""
    h, w = image_size
    rows, cols = np.zeros(h - 1, bool), np.zeros(w - 1, bool)
    for y1, y2, x1, x2 in boxes:
        for edge, mask, n in ((y1, rows, h), (y2, rows, h), (x1, cols, w), (x2, cols, w)):
            if 0 < edge < n:
                mask[edge - 1] = True
    return rows, cols


def seam_sums(logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, prefix: str = "border",
              other_rows: np.ndarray | None = None, other_cols: np.ndarray | None = None) -> dict[str, float]:
    """Sums and counts of |neighbour differences| of ``logits [B, H, W, K]`` across the pairs the masks
    select (``<prefix>_sum``, ``<prefix>_n``) and across the others (``other_sum``, ``other_n``; only those
    ``other_rows``/``other_cols`` allow, when given)."""
    dy = np.abs(np.diff(logits, axis=1))               # [B, H - 1, W, K]
    dx = np.abs(np.diff(logits, axis=2))               # [B, H, W - 1, K]
    per_row = dy.sum(axis=(0, 2, 3))
    per_col = dx.sum(axis=(0, 1, 3))
    n_row = dy.shape[0] * dy.shape[2] * dy.shape[3]
    n_col = dx.shape[0] * dx.shape[1] * dx.shape[3]
    rest_rows = ~rows if other_rows is None else other_rows
    rest_cols = ~cols if other_cols is None else other_cols
    return {f"{prefix}_sum": float(per_row[rows].sum() + per_col[cols].sum()),
            f"{prefix}_n": int(rows.sum() * n_row + cols.sum() * n_col),
            "other_sum": float(per_row[rest_rows].sum() + per_col[rest_cols].sum()),
            "other_n": int(rest_rows.sum() * n_row + rest_cols.sum() * n_col)}


def hr_window_boxes(model_cfg, slide_boxes: Sequence[tuple]) -> list[tuple]:
    """HRDecoder's own windows (``hr_scale`` tiles of every slide window, fused inside the model), in image
    coordinates; none for the FCN baseline."""
    from hrdecoder_jax.models import slide_windows

    hr = model_cfg.get("hr_settings")
    if not hr:
        return []
    boxes = []
    for y1, y2, x1, x2 in slide_boxes:
        for a1, a2, b1, b2 in slide_windows((y2 - y1, x2 - x1), hr.hr_scale, hr.hr_scale):
            boxes.append((y1 + a1, y1 + a2, x1 + b1, x1 + b2))
    return boxes


def seam_figure(model_forward, config, dataset) -> dict[str, float]:
    """``border``, ``elsewhere`` (mean |neighbour difference| of the blended logits) and their ``ratio``."""
    import jax.numpy as jnp

    from hrdecoder_jax.data.pipeline import make_eval_dataset
    from hrdecoder_jax.inference import inference
    from hrdecoder_jax.models import slide_windows

    tc = config.model.test_cfg
    total: dict[str, float] = {}
    for batch in make_eval_dataset(dataset, config.data):
        logits = np.asarray(inference(model_forward, jnp.asarray(batch["image"]), tc), np.float64)
        size = logits.shape[1:3]
        boxes = slide_windows(size, tc.crop_size, tc.stride) if tc.mode == "slide" else []
        slide_rows, slide_cols = border_masks(size, boxes)
        hr_rows, hr_cols = border_masks(size, hr_window_boxes(config.model, boxes))
        sums = {**seam_sums(logits, slide_rows, slide_cols),          # every pair across a slide border
                **seam_sums(logits, hr_rows & ~slide_rows, hr_cols & ~slide_cols, prefix="hr",
                            other_rows=~(slide_rows | hr_rows), other_cols=~(slide_cols | hr_cols))}
        for k, v in sums.items():
            total[k] = total.get(k, 0) + v
    border = total["border_sum"] / max(total["border_n"], 1)
    hr_only = total["hr_sum"] / total["hr_n"] if total["hr_n"] else float("nan")
    other = total["other_sum"] / max(total["other_n"], 1)
    return {"border": border, "hr_border": hr_only, "elsewhere": other,
            "ratio": border / other if other else float("nan"), "border_pairs": total["border_n"],
            "hr_border_pairs": total["hr_n"], "other_pairs": total["other_n"]}


def define_flags(fv) -> None:
    from absl import flags

    from hrdecoder_jax import cli
    flags.DEFINE_string("workdir", None, "Directory holding the Orbax checkpoint.", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    cli.define_checkpoint_flag(fv)
    flags.DEFINE_string("split", None, "Split to score (default config.eval.split).", flag_values=fv)
    flags.DEFINE_string("weightings", ",".join(WINDOW_WEIGHTINGS), "Comma list of model.test_cfg.weighting "
                        "values to compare.", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.", flag_values=fv)
    flags.register_validator("weightings", lambda v: bool(v) and all(w.strip() in WINDOW_WEIGHTINGS
                                                                     for w in v.split(",")),
                             message=f"--weightings must be a comma list of {', '.join(WINDOW_WEIGHTINGS)}",
                             flag_values=fv)


def run(fv) -> int:
    from hrdecoder_jax import LESIONS, checkpoint, cli
    from hrdecoder_jax.data import open_split
    from hrdecoder_jax.evaluation import evaluate
    from hrdecoder_jax.inference import make_forward

    config = fv.config
    if config.model.test_cfg.mode != "slide":
        raise cli.CommandError(f"model.test_cfg.mode={config.model.test_cfg.mode!r}: window weighting needs "
                               "slide inference")
    split = fv.split or config.eval.split
    model, meta = checkpoint.restore_for_inference(config, fv.workdir, cli.checkpoint_choice(fv.checkpoint))
    forward = make_forward(model)
    dataset = open_split(config.data, split)
    rows = {}
    for weighting in [w.strip() for w in fv.weightings.split(",")]:
        cfg = config.copy_and_resolve_references()
        cfg.model.test_cfg.weighting = weighting
        results = evaluate(None, cfg, dataset=dataset, forward=forward, progress=False)
        seams = seam_figure(forward, cfg, dataset)
        rows[weighting] = {"IoU": {k: float(v) for k, v in zip(LESIONS, results["IoU"])},
                           "AUPR": {k: float(v) for k, v in zip(LESIONS, results["AUPR"])},
                           "mIoU": float(results["mIoU"]), "mAUPR": float(results["mAUPR"]),
                           "num_images": int(results["num_images"]), "seams": seams}
        print(f"{weighting}: mIoU {100 * rows[weighting]['mIoU']:.2f}, seams {seams['border']:.4f} at window "
              f"borders vs {seams['elsewhere']:.4f} elsewhere", file=sys.stderr, flush=True)
    tc = config.model.test_cfg
    print(f"{config.data.name} {split} split, step {meta.get('step')}, {next(iter(rows.values()))['num_images']} "
          f"images, windows {tuple(tc.crop_size)} stride {tuple(tc.stride)}, sigma_scale {tc.sigma_scale}:")
    print("| weighting | " + " | ".join(f"IoU {k}" for k in LESIONS) + " | mIoU | mAUPR | slide borders | "
          "HR-window borders | elsewhere | slide / elsewhere |")
    print("|---|" + "---:|" * (len(LESIONS) + 6))
    for weighting, r in rows.items():
        s = r["seams"]
        print(f"| {weighting} | " + " | ".join(f"{100 * r['IoU'][k]:.2f}" for k in LESIONS)
              + f" | {100 * r['mIoU']:.2f} | {100 * r['mAUPR']:.2f} | {s['border']:.4f} | {s['hr_border']:.4f} | "
                f"{s['elsewhere']:.4f} | {s['ratio']:.2f} |")
    if fv.json:
        write_file(fv.json, json.dumps({"step": meta.get("step"), "split": split, "rows": rows}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.tools.window_seams`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    return cli.main("tools.window_seams", __doc__, define_flags, run, argv, purpose="inference")


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.tools.window_seams")
