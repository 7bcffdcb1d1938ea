#!/usr/bin/env python
"""Train the original HRDecoder and ours with the same recipe on the same files, several seeds, and compare.

A development tool beside the project (the package never imports it or the original). Run with this
project's interpreter; the original runs as a subprocess of its own interpreter:

  python launch/reference/same_training.py [--original DIR] --out runs/same [--seeds 0,1,2] [--iters 600]

``DIR`` (default ``$HRD_ORIGINAL``) is the folder ``setup_original.sh`` made: the original's source and its
environment, whose interpreter runs ``train_reference.py``.

1. writes the synthetic fundus dataset (48 train / 16 test, 512 x 512) once, in the reference
   repository's layout (``python -m hrdecoder_jax.tools.write_layout --layout mmseg-png``);
2. for each seed trains the ORIGINAL with its own mmseg machinery (``train_reference.py``) and OURS
   (``python -m hrdecoder_jax.train --config configs/synthetic.py`` reading the same files through the
   ``idrid`` builder), both: shallow HRNetV2-W18, 32-channel 1x1-compress + 3x3 head, hr_scale 128 with
   2 crops on 256 px crops of 512 px images (resize ratio 0.5-1, flip, rotation), AdamW 2e-3 / 1e-4, 50
   warm-up iterations then poly decay, batch 4, the test split evaluated every ``--eval-every``
   iterations with each implementation's lesion metrics, slide inference 256/128; the loss curves are
   means over ``--log-every`` iterations (mmcv's logger for the original; ours logs every step);
3. writes ``OUT/same_training.md`` (mean +- std over seeds of per-lesion IoU and AUPR, mIoU, mAUPR, per
   implementation), ``OUT/same_training.json`` and ``OUT/same_training.png`` (training loss and test mIoU
   against iterations, mean and min-max band over seeds).

Finished runs are skipped, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch" / "reference"))    # loaded by path too (the docs' command test)
import original  # noqa: E402  (launch/reference/original.py: only its path helpers run in this process)

LESIONS = ("EX", "HE", "SE", "MA")
IMPLS = ("original", "hrdecoder-jax")


def run(cmd, log: pathlib.Path, env=None) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        sys.exit(f"error: the command above failed (exit {rc}); see {log}")


def train_original(args, data: pathlib.Path, seed: int) -> pathlib.Path:
    work = pathlib.Path(args.out) / "original" / f"seed{seed}"
    if not (work / "final_metrics.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HRD_ORIGINAL=args.original)
        run([args.reference_python, REPO / "launch" / "reference" / "train_reference.py", "--data", data,
             "--work-dir", work, "--seed", seed, "--iters", args.iters, "--eval-every", args.eval_every,
             "--log-every", args.log_every], work / "stdout.log", env=env)
    return work


def _our_results(work: pathlib.Path) -> pathlib.Path | None:
    """The ``metrics.json`` of our run's final test evaluation (``eval_test_<step>/``, the last step's)."""
    found = sorted(work.glob("eval_test_*/metrics.json"), key=lambda p: int(p.parent.name.rsplit("_", 1)[1]))
    return found[-1] if found else None


def train_ours(args, data: pathlib.Path, seed: int) -> pathlib.Path:
    work = pathlib.Path(args.out) / "hrdecoder-jax" / f"seed{seed}"
    if not _our_results(work):
        work.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "hrdecoder_jax.train", "--config", REPO / "configs" / "synthetic.py",
             "--workdir", work, f"--config.seed={seed}", "--config.data.name=idrid",
             f"--config.data.manual_dir={data}", f"--config.data.data_dir={pathlib.Path(args.out) / 'tfds'}",
             "--config.data.validate_on=test", f"--config.total_steps={args.iters}",
             f"--config.eval_every={args.eval_every}", "--config.log_every=1",
             f"--config.checkpoint_every={args.eval_every}"], pathlib.Path(args.out) / f"ours_seed{seed}.log")
    return work


def curves_original(work: pathlib.Path) -> dict:
    logs = sorted(work.glob("*.log.json"))
    loss = {}
    for line in logs[-1].read_text().splitlines():
        row = json.loads(line)
        if row.get("mode") == "train" and "loss" in row:
            loss[int(row["iter"])] = float(row["loss"])
    evals = {}
    for line in (work / "eval_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        evals[int(row["iter"])] = float(row["mIoU"])
    final = json.loads((work / "final_metrics.json").read_text())
    return {"loss": loss, "test_miou": evals,
            "final": {"IoU": final["IoU"], "AUPR": final["AUPR"], "mIoU": final["mIoU"], "mAUPR": final["mAUPR"]}}


def curves_ours(work: pathlib.Path, log_every: int) -> dict:
    """Our run logs every step; the loss curve is the mean over each ``log_every`` interval, as mmcv's
    text logger reports the original's."""
    per_step, evals = {}, {}
    for line in (work / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train":
            per_step[int(row["step"])] = float(row["total"])
        elif row.get("kind") in ("val", "validation") and "mIoU" in row:
            evals[int(row["step"])] = float(row["mIoU"])
    loss = {s: statistics.mean(per_step[i] for i in range(s - log_every + 1, s + 1))
            for s in range(log_every, max(per_step) + 1, log_every)
            if all(i in per_step for i in range(s - log_every + 1, s + 1))}
    final = json.loads(_our_results(work).read_text())
    nan0 = lambda per_lesion: [0.0 if per_lesion[k] is None else float(per_lesion[k]) for k in final["lesions"]]
    iou, aupr = nan0(final["IoU"]), nan0(final["AUPR"])
    return {"loss": loss, "test_miou": evals,
            "final": {"IoU": iou, "AUPR": aupr, "mIoU": sum(iou) / 4, "mAUPR": sum(aupr) / 4}}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict) -> list[dict]:
    rows = []
    for impl in IMPLS:
        finals = [r["final"] for r in runs[impl]]
        row = {"implementation": impl, "seeds": len(finals)}
        for k, name in enumerate(LESIONS):
            row[f"IoU {name}"] = mean_std([f["IoU"][k] for f in finals])
            row[f"AUPR {name}"] = mean_std([f["AUPR"][k] for f in finals])
        row["mIoU"] = mean_std([f["mIoU"] for f in finals])
        row["mAUPR"] = mean_std([f["mAUPR"] for f in finals])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = [f"IoU {n}" for n in LESIONS] + [f"AUPR {n}" for n in LESIONS] + ["mIoU", "mAUPR"]
    lines = ["| implementation | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f"{100 * r[c][0]:.2f} ± {100 * r[c][1]:.2f}" for c in cols]
        lines.append(f"| {r['implementation']} ({r['seeds']} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl, colour in zip(IMPLS, ("tab:orange", "tab:blue")):
        for ax, key, smooth in ((axes[0], "loss", True), (axes[1], "test_miou", False)):
            steps = sorted(set.intersection(*(set(r[key]) for r in runs[impl])))
            if not steps:
                continue
            values = np.array([[r[key][s] for s in steps] for r in runs[impl]])
            if key == "test_miou":
                values = 100 * values
            ax.plot(steps, values.mean(0), color=colour, label=f"{impl} (mean of {len(values)} seeds)",
                    marker=None if smooth else "o")
            ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2)
    axes[0].set(xlabel="iteration", ylabel="training loss (L_fuse + 0.1 L_HR)", title="training loss")
    axes[1].set(xlabel="iteration", ylabel="test mIoU (%)", title="test mIoU during training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Same recipe, same data: the original HRDecoder vs hrdecoder-jax (band: min-max over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    original.add_location_arguments(p)
    p.add_argument("--out", default="runs/same")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--only", choices=["original", "ours", "report"], default=None,
                   help="run one side only, or only write the report from finished runs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.original, args.reference_python = original.located(args)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)        # a fresh clone has no runs/ yet
    args.out = str(out)
    data = out / "data"
    if not (data / "images").exists():
        # Written beside and renamed when complete: an interrupted write leaves no half dataset behind.
        partial = out / "data.partial"
        shutil.rmtree(partial, ignore_errors=True)
        run([sys.executable, "-m", "hrdecoder_jax.tools.write_layout", "--layout", "mmseg-png", "--out", partial,
             "--num_train", 48, "--num_test", 16, "--height", 512, "--width", 512], out / "write_layout.log")
        partial.rename(data)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {impl: [] for impl in IMPLS}
    for seed in seeds:
        if args.only in (None, "original"):
            train_original(args, data, seed)
        if args.only in (None, "ours"):
            train_ours(args, data, seed)
    for seed in seeds:
        w = out / "original" / f"seed{seed}"
        if (w / "final_metrics.json").exists():
            runs["original"].append(curves_original(w))
        w = out / "hrdecoder-jax" / f"seed{seed}"
        if _our_results(w):
            runs["hrdecoder-jax"].append(curves_ours(w, args.log_every))
    if not all(runs.values()):
        print("not every implementation has a finished run yet; no report")
        return 0
    rows = summarise(runs)
    text = table(rows)
    (out / "same_training.md").write_text(text)
    (out / "same_training.json").write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    plot(runs, out / "same_training.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
