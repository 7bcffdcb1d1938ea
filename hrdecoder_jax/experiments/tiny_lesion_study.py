"""The paper's trade-off on data anyone can regenerate: FCN at low resolution, FCN at full resolution,
HRDecoder and Efficient-HRDecoder, same backbone, same head, same budget, on ``synthetic_fundus``.

  python -m hrdecoder_jax.experiments.tiny_lesion_study --out runs/study            # CPU default size
  python -m hrdecoder_jax.experiments.tiny_lesion_study --out runs/study --scale 4  # larger, for a GPU

Each model is the matching variant of ``configs/synthetic.py`` (a shallow W18 HRNetV2, the 32-channel
compress + 3x3 head, AdamW, batch 4):
``fcn_lr`` sees half-resolution images, ``fcn_hr`` full-resolution crops, ``hrdecoder``/``efficient`` the
full-resolution crops through an LR input of half their size. Every model trains ``--steps`` steps once
per seed of ``--seeds`` (the seed sets initialisation, data order, augmentation and crop draws; the
dataset is the same) and is evaluated on the full-resolution test images. Writes ``study.json`` (every
run), ``study.md`` (mean +- standard deviation over seeds of per-lesion IoU and AUPR, mIoU, mAUPR;
train-step memory, FLOPs, images/s) and ``study.png`` (mIoU and MA IoU against train-step memory with
error bars, the paper's Figure 1a on synthetic data). A run whose workdir already holds its result is
not trained again, so an interrupted study resumes.
"""
from __future__ import annotations

import json
import pathlib
import time

from hrdecoder_jax.workdir import atomic_write, write_file

MODELS = ("fcn_lr", "fcn_hr", "hrdecoder", "efficient")
USES_CONFIG = False   # the command takes no --config (each run loads configs/synthetic.py)
LABELS = {"fcn_lr": "FCN-LR", "fcn_hr": "FCN-HR", "hrdecoder": "HRDecoder", "efficient": "Efficient-HRDecoder"}
CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "synthetic.py"


def study_config(variant: str, *, steps: int, scale: float = 1, data_dir: str | None = None,
                 config_file: pathlib.Path = CONFIG):
    """``configs/synthetic.py:variant`` with the study's budget; ``scale`` multiplies every image size."""
    from hrdecoder_jax import cli
    config = cli.load_config(f"{config_file}:{variant}")
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
    """Train and evaluate one model (or read the result of a finished run), then measure its cost."""
    from hrdecoder_jax.benchmark import run_benchmark
    from hrdecoder_jax.train import train_and_evaluate

    done = out_dir / "study_run.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    result = train_and_evaluate(config, str(out_dir))
    seconds = time.perf_counter() - t0
    test = result["test"]
    # Memory of the step as trained (the whole batch on one device), FLOPs per test window.
    cost = run_benchmark(config, what=("memory_train", "flops_infer"), repeats=1, batch=config.global_batch_size)
    row = {
        "model": LABELS[variant], "variant": variant, "seed": int(config.seed),
        "IoU": [float(v) for v in test["IoU"]], "AUPR": [float(v) for v in test["AUPR"]],
        "mIoU": float(test["mIoU"]), "mAUPR": float(test["mAUPR"]),
        "train_memory_bytes": cost.get("train_mem_peak_estimate_bytes"),
        "infer_flops": cost.get("infer_flops_per_image"),
        "train_images_per_s": result["train"].get("images_per_s"),
        "train_seconds": seconds, "steps": config.total_steps, "batch": config.global_batch_size,
        "train_image": list(config.data.crop_size),
    }
    write_file(done, json.dumps(row, indent=2))
    return row


def summarise(runs: list[dict]) -> list[dict]:
    """One row per model: mean and (sample) standard deviation over its seeds of every metric."""
    import numpy as np

    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        row = {k: mine[0][k] for k in ("model", "variant", "train_memory_bytes", "infer_flops", "steps", "batch",
                                       "train_image")}
        row["seeds"] = [r["seed"] for r in mine]
        for key in ("IoU", "AUPR", "mIoU", "mAUPR", "train_images_per_s"):
            values = np.asarray([r[key] for r in mine], np.float64)
            row[key] = values.mean(axis=0).tolist()
            row[key + "_std"] = (values.std(axis=0, ddof=1) if len(mine) > 1 else np.zeros_like(values[0])).tolist()
        rows.append(row)
    return rows


def write_report(runs: list[dict], out_dir: pathlib.Path) -> None:
    """``study.json`` (every run), the markdown table ``study.md`` and the plot ``study.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(runs)
    write_file(out_dir / "study.json", json.dumps({"runs": runs, "summary": rows}, indent=2))
    lesions = ("EX", "HE", "SE", "MA")
    n_seeds = max(len(r["seeds"]) for r in rows)
    head = (["model"] + [f"IoU {x}" for x in lesions] + [f"AUPR {x}" for x in lesions]
            + ["mIoU", "mAUPR", f"train-step memory (batch {rows[0]['batch']})", "FLOPs / test window",
               "train img/s"])

    def pm(mean, std):
        return f"{100 * mean:.2f} ± {100 * std:.2f}" if n_seeds > 1 else f"{100 * mean:.2f}"

    lines = [f"Mean ± standard deviation over {n_seeds} seed(s) ({', '.join(map(str, rows[0]['seeds']))}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = r["train_memory_bytes"]
        cells = ([r["model"]] + [pm(m, s) for m, s in zip(r["IoU"], r["IoU_std"])]
                 + [pm(m, s) for m, s in zip(r["AUPR"], r["AUPR_std"])]
                 + [pm(r["mIoU"], r["mIoU_std"]), pm(r["mAUPR"], r["mAUPR_std"]),
                    "-" if mem is None else f"{mem / 2**20:.0f} MiB",
                    "-" if r["infer_flops"] is None else f"{r['infer_flops'] / 1e9:.1f} G",
                    "-" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.2f}"])
        lines.append("| " + " | ".join(cells) + " |")
    write_file(out_dir / "study.md", "\n".join(lines) + "\n")

    # Two panels: mIoU and MA IoU (the tiny lesions the method is about) against train-step memory, with
    # the seed standard deviation as error bars.
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    shown = [r for r in rows if r["train_memory_bytes"] is not None]
    mems = [r["train_memory_bytes"] / 2**20 for r in shown]
    for ax, (title, value) in zip(axes, (("test mIoU (%)", lambda r: (r["mIoU"], r["mIoU_std"])),
                                         ("test IoU of MA (%)", lambda r: (r["IoU"][3], r["IoU_std"][3])))):
        for i, (r, x) in enumerate(zip(shown, mems)):
            y, e = (100 * v for v in value(r))
            ax.errorbar([x], [y], yerr=[e], fmt="o", ms=7, capsize=4, color=f"C{i}",
                        label=f"{r['model']} ({r['train_image'][0]} px crops)")
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if mems:
            ax.set_xlim(0, max(mems) * 1.3)   # room for the labels of the rightmost point
        ax.set_xlabel(f"train-step memory, batch {rows[0]['batch']} (MiB, XLA estimate)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"synthetic_fundus: accuracy vs training memory (same backbone, head and steps; "
                 f"mean ± std over {n_seeds} seeds)", fontsize=9)
    fig.tight_layout()
    with atomic_write(out_dir / "study.png", "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def run_study(out_dir: str, *, steps: int = 1200, scale: float = 1, models=MODELS, seeds=(0, 1, 2),
              data_dir: str | None = None, config_file: pathlib.Path = CONFIG) -> list[dict]:
    """Every model of ``models`` once per seed of ``seeds``; returns the runs (see ``summarise``)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        for variant in models:
            print(f"[study] {LABELS[variant]}, seed {seed}: {steps} steps", flush=True)
            config = study_config(variant, steps=steps, scale=scale, data_dir=data_dir, config_file=config_file)
            config.seed = int(seed)
            runs.append(run_model(variant, config, out / variant / f"seed{seed}"))
            write_report(runs, out)            # a partial report survives an interruption
    print((out / "study.md").read_text(), flush=True)
    return runs


def define_flags(fv) -> None:
    from absl import flags
    flags.DEFINE_string("out", None, "Output folder (one workdir per model and seed, study.*).", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_integer("steps", 1200, "Training steps per run (1200: about 30 min per seed for all four "
                         "models on 2 CPU cores).", flag_values=fv)
    flags.DEFINE_integer("scale", 1, "Multiply every image size (GPU runs).", flag_values=fv)
    flags.DEFINE_list("models", list(MODELS), "Subset of " + ",".join(MODELS) + ".", flag_values=fv)
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds, one run each.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the config's).", flag_values=fv)
    flags.register_validator("models", lambda v: set(v) <= set(MODELS),
                             message="--models takes a subset of " + ",".join(MODELS), flag_values=fv)
    flags.register_validator("seeds", lambda v: all(str(x).isdigit() for x in v),
                             message="--seeds takes integers", flag_values=fv)


def run(fv) -> int:
    run_study(fv.out, steps=fv.steps, scale=fv.scale, models=fv.models, seeds=[int(v) for v in fv.seeds],
              data_dir=fv.data_dir)
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.experiments.tiny_lesion_study`` (``argv``: the arguments only)."""
    from hrdecoder_jax import cli
    return cli.main("experiments.tiny_lesion_study", __doc__, define_flags, run, argv, config=USES_CONFIG,
                    purpose="train")


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.experiments.tiny_lesion_study")
