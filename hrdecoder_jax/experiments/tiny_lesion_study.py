"""The paper's trade-off on data anyone can regenerate: FCN at low resolution, FCN at full resolution,
HRDecoder and Efficient-HRDecoder, same backbone, same head, same budget, on ``synthetic_fundus``.

  python -m hrdecoder_jax.experiments.tiny_lesion_study --out runs/study            # CPU default size
  python -m hrdecoder_jax.experiments.tiny_lesion_study --out runs/study --scale 4  # larger, for a GPU

Each model is the matching variant of ``configs/synthetic.py`` (a shallow W18 HRNetV2, the 32-channel
compress + 3x3 head, AdamW, batch 4):
``fcn_lr`` sees half-resolution images, ``fcn_hr`` full-resolution crops, ``hrdecoder``/``efficient`` the
full-resolution crops through an LR input of half their size. Every model trains ``--steps`` steps and
is evaluated on the full-resolution test images. Writes ``study.json``, ``study.md`` (per-lesion IoU and
AUPR, mIoU, mAUPR, train-step memory, FLOPs, images/s) and ``study.png`` (mIoU against train-step
memory, the paper's Figure 1a on synthetic data).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import time

MODELS = ("fcn_lr", "fcn_hr", "hrdecoder", "efficient")
LABELS = {"fcn_lr": "FCN-LR", "fcn_hr": "FCN-HR", "hrdecoder": "HRDecoder", "efficient": "Efficient-HRDecoder"}
CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "synthetic.py"


def study_config(variant: str, *, steps: int, scale: float = 1, data_dir: str | None = None,
                 config_file: pathlib.Path = CONFIG):
    """``configs/synthetic.py:variant`` with the study's budget; ``scale`` multiplies every image size."""
    spec = importlib.util.spec_from_file_location("study_cfg", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.total_steps = steps
    config.eval_every = 0                   # one evaluation at the end: the same budget for every model
    config.checkpoint_every = steps
    config.log_every = max(1, steps // 10)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(1, steps // 10))
    if data_dir:
        config.data.data_dir = data_dir
    if scale != 1:
        _scale_sizes(config, scale)
    return config


def _scale_sizes(config, s: float) -> None:
    """Multiply every image, crop, window and hr_scale size by ``s`` (keep the results multiples of 32)."""
    def f(v):
        return int(round(v * s))
    d = config.data
    d.synthetic.height, d.synthetic.width = f(d.synthetic.height), f(d.synthetic.width)
    d.img_scale = tuple(f(v) for v in d.img_scale)
    d.test_scale = tuple(f(v) for v in d.test_scale)
    d.crop_size = tuple(f(v) for v in d.crop_size)
    t = config.model.test_cfg
    t.crop_size = tuple(f(v) for v in t.crop_size)
    t.stride = tuple(f(v) for v in t.stride)
    if config.model.hr_settings is not None:
        config.model.hr_settings.hr_scale = tuple(f(v) for v in config.model.hr_settings.hr_scale)


def run_model(variant: str, config, out_dir: pathlib.Path) -> dict:
    """Train and evaluate one model, then measure its cost; returns one table row."""
    from hrdecoder_jax.benchmark import run_benchmark
    from hrdecoder_jax.train import train_and_evaluate

    t0 = time.perf_counter()
    result = train_and_evaluate(config, str(out_dir / variant))
    seconds = time.perf_counter() - t0
    test = result["test"]
    # Memory of the step as trained (the whole batch on one device), FLOPs per test window.
    cost = run_benchmark(config, what=("memory_train", "flops_infer"), repeats=1, batch=config.global_batch_size)
    return {
        "model": LABELS[variant], "variant": variant,
        "IoU": [float(v) for v in test["IoU"]], "AUPR": [float(v) for v in test["AUPR"]],
        "mIoU": float(test["mIoU"]), "mAUPR": float(test["mAUPR"]),
        "train_memory_bytes": cost.get("train_mem_peak_estimate_bytes"),
        "infer_flops": cost.get("infer_flops_per_image"),
        "train_images_per_s": result["train"].get("images_per_s"),
        "train_seconds": seconds, "steps": config.total_steps, "batch": config.global_batch_size,
        "train_image": list(config.data.crop_size),
    }


def write_report(rows: list[dict], out_dir: pathlib.Path) -> None:
    """``study.json``, the markdown table ``study.md`` and the plot ``study.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "study.json").write_text(json.dumps(rows, indent=2))
    lesions = ("EX", "HE", "SE", "MA")
    head = (["model"] + [f"IoU {x}" for x in lesions] + [f"AUPR {x}" for x in lesions]
            + ["mIoU", "mAUPR", f"train-step memory (batch {rows[0]['batch']})", "FLOPs / test window",
               "train img/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = r["train_memory_bytes"]
        cells = ([r["model"]] + [f"{100 * v:.2f}" for v in r["IoU"]] + [f"{100 * v:.2f}" for v in r["AUPR"]]
                 + [f"{100 * r['mIoU']:.2f}", f"{100 * r['mAUPR']:.2f}",
                    "-" if mem is None else f"{mem / 2**20:.0f} MiB",
                    "-" if r["infer_flops"] is None else f"{r['infer_flops'] / 1e9:.1f} G",
                    "-" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.2f}"])
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "study.md").write_text("\n".join(lines) + "\n")

    # Two panels: mIoU and MA IoU (the tiny lesions the method is about) against train-step memory.
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    shown = [r for r in rows if r["train_memory_bytes"] is not None]
    mems = [r["train_memory_bytes"] / 2**20 for r in shown]
    for ax, (title, value) in zip(axes, (("test mIoU (%)", lambda r: r["mIoU"]),
                                         ("test IoU of MA (%)", lambda r: r["IoU"][3]))):
        for i, (r, x) in enumerate(zip(shown, mems)):
            y = 100 * value(r)
            ax.scatter([x], [y], s=60, color=f"C{i}", label=f"{r['model']} ({r['train_image'][0]} px crops)")
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if mems:
            ax.set_xlim(0, max(mems) * 1.3)   # room for the labels of the rightmost point
        ax.set_xlabel(f"train-step memory, batch {rows[0]['batch']} (MiB, XLA estimate)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("synthetic_fundus: accuracy vs training memory (same backbone, head and steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "study.png")
    plt.close(fig)


def run_study(out_dir: str, *, steps: int = 1200, scale: float = 1, models=MODELS, data_dir: str | None = None,
              config_file: pathlib.Path = CONFIG) -> list[dict]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in models:
        print(f"[study] {LABELS[variant]}: {steps} steps", flush=True)
        config = study_config(variant, steps=steps, scale=scale, data_dir=data_dir, config_file=config_file)
        rows.append(run_model(variant, config, out))
        write_report(rows, out)            # a partial report survives an interruption
    print((out / "study.md").read_text(), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (one workdir per model, study.*)")
    parser.add_argument("--steps", type=int, default=1200,
                        help="training steps per model (1200: about 30 min for all four on 2 CPU cores)")
    parser.add_argument("--scale", type=int, default=1, help="multiply every image size (GPU runs)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--data_dir", default=None, help="tfds data_dir (default: the config's)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    run_study(args.out, steps=args.steps, scale=args.scale, models=models, data_dir=args.data_dir)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
