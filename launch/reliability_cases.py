"""Run every bad input and interruption of docs/reliability.md against the commands, and print the table.

    python launch/reliability_cases.py [--out docs/reliability_table.md] [--keep DIR]

Each case runs a real ``python -m hrdecoder_jax.<command>`` in a scratch folder on a toy model (width 4,
64 px synthetic images, a few steps), and reports the exit code and the ``error:``/notice line the user
sees. A development tool: it takes a few minutes on a CPU and writes only into its scratch folder (and
``--out``).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

# The toy model of configs/synthetic.py:toy (width 4, 64 px) so every case runs in seconds; whole-image
# tests, no validation, and the optimiser settings the recorded table was made with.
CONFIG = '''from hrdecoder_jax import cli


def get_config():
    c = cli.load_config({toy!r})
    c.data.data_dir = {data!r}
    c.eval_every = 0
    c.model.test_cfg.mode = "whole"
    c.optimizer.update(lr=1e-3, weight_decay=5e-4)
    return c
'''


class Cases:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.cfg = root / "toy.py"
        self.cfg.write_text(CONFIG.format(toy=str(REPO / "configs" / "synthetic.py:toy"), data=str(root / "data")))
        self.rows: list[tuple[str, int, str, str]] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HRDECODER_JAX_CACHE=str(root / "xla_cache"))

    def cmd(self, command: str, *args: str) -> list[str]:
        return [sys.executable, "-m", f"hrdecoder_jax.{command}", *args]

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=900, **kw)

    def record(self, case: str, result, kept: str, pick=("error:",)) -> None:
        lines = [line for line in (result.stderr + result.stdout).splitlines()
                 if any(line.startswith(p) or p in line for p in pick)]
        line = lines[-1] if lines else "(no message)"
        line = line.replace(str(self.root), "…")
        self.rows.append((case, result.returncode, line, kept))
        print(f"[{result.returncode:>3}] {case}: {line}", flush=True)

    def train(self, work: str, *extra: str, **kw):
        return self.run(self.cmd("train", f"--config={self.cfg}", f"--workdir={self.root / work}", *extra), **kw)


def flip_bytes(path: pathlib.Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "model").rglob("*") if p.is_file() and "d" in p.parent.name]
    return max(files, key=lambda p: p.stat().st_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--keep", default=None, help="scratch folder to use and keep (default: a temporary one)")
    return parser


def round_two(c: Cases, root: pathlib.Path, copy_run, conv, from_tiny: pathlib.Path) -> None:
    """The cases of the second audit (issue 19)."""
    import json

    from PIL import Image

    run = root / "run"
    ev = lambda work, *extra: c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={work}", "--noprogress",
                                          *extra))

    # 1. A checkpoint of another model whose shapes fit.
    c.record("`evaluate` an HRDecoder checkpoint with `--config.model.type=FCN` (the same parameter shapes)",
             ev(run, "--config.model.type=FCN", f"--output={root / 'fcn'}"), "the checkpoint (refused, not scored)")
    photos = root / "photos"
    c.record("the same, `predict`", c.run(c.cmd("predict", f"--config={c.cfg}", f"--workdir={run}",
                                                 "--config.model.type=FCN", f"--input={photos / 'good.png'}",
                                                 f"--output={root / 'fcn_p'}")), "the checkpoint (refused)")
    c.record("`evaluate` with another `model.hr_settings.hr_scale` (every shape the same)",
             ev(run, "--config.model.hr_settings.hr_scale=(64,64)", "--config.model.hr_settings.scale_ratio=(1.0,1.0)",
                f"--output={root / 'hr64'}"), "the checkpoint (refused)")

    # 5. Resumes with a changed model, optimizer or config; every checkpoint damaged.
    w = copy_run("wide")
    res = c.train("wide", "--config.model.backbone.extra.stage2.num_channels=(8,16)", "--config.total_steps=6")
    c.record("resume with a changed model width (`...stage2.num_channels=(8,16)`)", res,
             f"every checkpoint in place ({sorted(os.listdir(w / 'checkpoints'))}; "
             f"{'a' if (w / 'corrupt').exists() else 'no'} `corrupt/`)")
    res = c.train("wide", "--config.optimizer.name=sgd", "--config.total_steps=6")
    c.record("resume with another optimizer (`--config.optimizer.name=sgd`, the run used AdamW)", res,
             f"every checkpoint in place ({sorted(os.listdir(w / 'checkpoints'))})")
    res = c.train("wide", "--config.total_steps=6")
    c.record("then the run's own config with `--config.total_steps=6`", res,
             "resumes from step 4; `config.json` keeps total_steps "
             f"{json.loads((w / 'config.json').read_text())['total_steps']}", pick=("[resume] changed",))
    w = copy_run("all_corrupt")
    for step in ("2", "4"):
        flip_bytes(largest_data_file(w / "checkpoints" / step))
    c.train("all_corrupt", "--config.total_steps=6")
    res = c.train("all_corrupt", "--config.total_steps=6")
    c.record("every checkpoint damaged, training resumes (run twice)", res,
             f"`checkpoints/` {sorted(os.listdir(w / 'checkpoints'))}, `corrupt/` {sorted(os.listdir(w / 'corrupt'))}; "
             "the second run stops at step 2 again instead of starting from scratch")
    c.record("a checkpoint past `total_steps` (`--config.total_steps=2` on a run that reached 4)",
             c.train("run", "--config.total_steps=2"), "everything", pick=("[done]",))

    # 6. A torn last line of metrics.jsonl.
    w = copy_run("torn")
    with open(w / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "va')
    res = c.train("torn", "--config.eval_every=2")
    rows_ok = all(json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines())
    c.record("a torn last line in `metrics.jsonl`, the finished run re-run (it reads the log)", res,
             f"the complete lines; every line is JSON again: {rows_ok}", pick=("[log]",))

    # 7. What evaluate's metrics.json records.
    out = root / "scored"
    res = ev(run, "--checkpoint=2", f"--output={out}")
    doc = json.loads((out / "metrics.json").read_text())
    shown = ", ".join(f'"{k}": {json.dumps(doc[k])}' for k in ("step", "checkpoint", "workdir")).replace(str(root), "…")
    c.rows.append(("`evaluate --checkpoint=2`: what `metrics.json` records", res.returncode, shown,
                   "written under a temporary name, renamed when complete, after the table is printed"))

    # 4. predict: output names, outputs as inputs, a broken link.
    both = root / "both"
    both.mkdir()
    from hrdecoder_jax.data import generate_fundus
    Image.fromarray(generate_fundus(1, 64, 64)[0]).save(both / "a.jpg")
    Image.fromarray(generate_fundus(2, 64, 64)[0]).save(both / "a.png")
    os.symlink(root / "nowhere.jpg", both / "gone.jpg")
    pred = lambda: c.run(c.cmd("predict", f"--config={c.cfg}", f"--workdir={run}", f"--input={both}",
                               f"--output={both}"))
    res = pred()
    names = sorted(p.name for p in both.iterdir())
    c.record("`predict` on a folder with `a.jpg`, `a.png` and a broken link, `--output` the same folder", res,
             f"{len(names)} files: `a.jpg_EX.png` ... `a.png_overlay.png`, `predictions.json`",
             pick=("wrote predictions",))
    c.rows.append(("the same: the broken link", res.returncode,
                   next((l for l in res.stderr.splitlines() if "gone.jpg" in l), "(no message)").replace(str(root), "…"),
                   "the other images' outputs"))
    res = pred()
    c.record("the same command again", res, f"{len(list(both.iterdir()))} files (was {len(names)})",
             pick=("left out",))

    # 8. write_layout into a folder that holds a dataset.
    real = root / "download"
    (real / "images" / "train").mkdir(parents=True)
    (real / "images" / "train" / "IDRiD_01.jpg").write_bytes(b"a real photograph")
    c.record("`tools.write_layout --layout mmseg --out` a folder holding a download",
             c.run(c.cmd("tools.write_layout", "--layout=mmseg", f"--out={real}", "--num_train=1", "--num_test=1")),
             "the folder, untouched")

    # 3. A 16-bit greyscale image in a dataset folder.
    from hrdecoder_jax.data import load_split
    from hrdecoder_jax.predict import read_image
    from hrdecoder_jax.tools.write_layout import write_layout
    lay = root / "layout16"
    write_layout(str(lay), "mmseg-png", num_train=1, num_test=1, height=64, width=64, seed=0)
    (lay / "images" / "train" / "IDRiD_01.jpg").unlink()
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(grey).save(lay / "images" / "train" / "IDRiD_01.png")
    ex = next(load_split("idrid", "train", data_dir=root / "tfds16", manual_dir=lay).as_numpy_iterator())
    same = np.array_equal(ex["image"], read_image(str(lay / "images" / "train" / "IDRiD_01.png")))
    c.rows.append(("a 16-bit greyscale PNG (`I;16`, a 0..65535 ramp) in a dataset folder", 0,
                   f"prepared as a 0..{ex['image'].max()} ramp ({len(np.unique(ex['image']))} grey levels); "
                   f"equal to what `predict` reads: {same}", "the image's grey levels"))

    # All four masks of an image missing.
    lay = root / "layout_bare"
    write_layout(str(lay), "mmseg", num_train=2, num_test=1, height=64, width=64, seed=0)
    for mask in (lay / "labels" / "train").rglob("IDRiD_02_*.tif"):
        mask.unlink()
    c.record("an image whose four masks are all missing", c.train("bare", "--config.data.name=idrid",
             f"--config.data.manual_dir={lay}", f"--config.data.data_dir={root / 'tfds_bare'}"), "nothing prepared")

    # 2. data.cache shared by runs on two datasets.
    cache = root / "cache"
    first = [c.train(f"cache{seed}", f"--config.data.cache={cache}", "--config.total_steps=1",
                     f"--config.data.synthetic.seed={seed}", f"--config.data.data_dir={root / 'data_cache'}")
             for seed in (0, 1)]
    losses = [next((l.split("total ")[1].split()[0] for l in r.stdout.splitlines() if l.startswith("[train] step 1/")),
                   "?") for r in first]
    c.rows.append(("`data.cache` shared by a run on another dataset (synthetic seed 0, then seed 1)",
                   first[1].returncode, f"first losses {losses[0]} and {losses[1]}: each run trains on its own images",
                   f"one cache per dataset: {len(list(cache.glob('*/_COMPLETE')))} sub-folders of `data.cache`"))

    # 9. A two-process run on a fresh data_dir.
    res = c.run([sys.executable, str(pathlib.Path(__file__).resolve().parent / "local_multiprocess.py"),
                 "--num_processes", "2", "--devices_per_process", "2", "--", f"--config={c.cfg}",
                 f"--workdir={root / 'multi'}", f"--config.data.data_dir={root / 'data_multi'}",
                 "--config.total_steps=2"])
    c.rows.append(("a two-process run (`launch/local_multiprocess.py`) on a fresh `data_dir`", res.returncode,
                   next((l for l in res.stdout.splitlines() if l.startswith("[train] step 2/")), "(no message)"),
                   "the dataset, prepared once by process 0"))

    # 10. A checkpoint of the original's own training (numpy scalars in meta).
    import torch
    tensors = {k: torch.from_numpy(v) for k, v in np.load(from_tiny).items()}
    meta = {"iter": 20000, "hook_msgs": {"best_score": np.float64(0.3781), "best_ckpt": "best_mIoU_iter_20000.pth"}}
    torch.save({"meta": meta, "state_dict": tensors}, root / "mmcv.pth")
    c.record("`convert` a checkpoint of mmcv's training (numpy scalars in `meta`)", conv(root / "mmcv.pth", "cv_mmcv"),
             "the Orbax workdir", pick=("error:", "loaded "))
    c.record("`evaluate --checkpoint best` on a convert workdir",
             c.run(c.cmd("evaluate", "--config=configs/tiny.py", f"--workdir={root / 'cv_mmcv'}", "--checkpoint=best"),
                   cwd=from_tiny.parents[2]), "")

    # 11. Set-up errors.
    c.record("`JAX_PLATFORMS=cuda` on a machine without a GPU backend",
             subprocess.run(c.cmd("convert", "--config=configs/tiny.py", f"--torch_checkpoint={from_tiny}",
                                  f"--workdir={root / 'cv_cuda'}"), capture_output=True, text=True,
                            env=dict(c.env, JAX_PLATFORMS="cuda"), cwd=from_tiny.parents[2], timeout=900), "")
    (root / "broken_syntax.py").write_text("def get_config(:\n    pass\n")
    c.record("a config file with a syntax error", c.run(c.cmd("train", f"--config={root / 'broken_syntax.py'}",
                                                               f"--workdir={root / 'x'}")), "nothing written")
    (root / "broken_name.py").write_text("from hrdecoder_jax import config_utils\n\n\ndef get_config():\n"
                                         "    c = config_utils.base_config()\n    c.seed = undefined_name\n    return c\n")
    c.record("a config file with a name error", c.run(c.cmd("train", f"--config={root / 'broken_name.py'}",
                                                             f"--workdir={root / 'x'}")), "nothing written")
    (root / "no_data.py").write_text("from hrdecoder_jax import config_utils\n\n\ndef get_config():\n"
                                     "    return config_utils.base_config()\n")
    c.record("a config file without a `data` section", c.run(c.cmd("train", f"--config={root / 'no_data.py'}",
                                                                    f"--workdir={root / 'x'}")), "nothing written")
    c.record("`evaluate --config.eval.max_images=0`", ev(run, "--config.eval.max_images=0"), "nothing evaluated")
    c.record("`--config.data.val_count=100` (7 training images)", c.train("vc", "--config.data.val_count=100"),
             "nothing trained")
    (root / "a_file").exists() or (root / "a_file").write_text("x")
    c.record("`benchmark --json` under a file", c.run(c.cmd("benchmark", f"--config={c.cfg}", "--what=infer",
                                                           f"--json={root / 'a_file' / 'b.json'}")),
             "nothing measured (checked first)")
    res = c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={root / 'empty'}"))
    c.rows.append(("what a command prints on stderr before its own lines (`evaluate` on an empty workdir)",
                   res.returncode, f"{len(res.stderr.strip().splitlines())} line(s), the error: no TensorFlow banner",
                   ""))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="hrd_reliability_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    c = Cases(root)
    t0 = time.time()

    # A finished reference run that the other cases damage copies of.
    done = c.train("run")
    assert done.returncode == 0, done.stderr[-2000:]

    def copy_run(name: str) -> pathlib.Path:
        shutil.copytree(root / "run", root / name, symlinks=True)
        (root / name / ".lock").unlink(missing_ok=True)
        return root / name

    c.record("re-run the command of a finished run", c.train("run"),
             "everything; prints the stored test metrics, saves nothing", pick=("already finished",))

    w = copy_run("corrupt_eval")
    flip_bytes(largest_data_file(w / "checkpoints" / "4"))
    c.record("64 bytes flipped in a checkpoint data file, `evaluate --checkpoint latest`",
             c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={w}", "--checkpoint=latest")),
             "the checkpoint (refused, not used)")
    from PIL import Image
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photos / "good.png")
    c.record("the same, `predict`", c.run(c.cmd("predict", f"--config={c.cfg}", f"--workdir={w}",
                                                 "--checkpoint=latest", f"--input={photos}", f"--output={root / 'p'}")),
             "the checkpoint (refused)")
    w = copy_run("corrupt_train")
    flip_bytes(largest_data_file(w / "checkpoints" / "4"))
    c.record("the same, training resumes (`--config.total_steps=6`)", c.train("corrupt_train", "--config.total_steps=6"),
             "step 4 moved to `corrupt/4`; resumes from step 2 and finishes", pick=("falling back",))
    w = copy_run("missing_file")
    largest_data_file(w / "checkpoints" / "4").unlink()
    c.record("a checkpoint data file deleted, `evaluate`",
             c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={w}", "--checkpoint=latest")), "the other steps")
    w = copy_run("truncated_file")
    f = largest_data_file(w / "checkpoints" / "4")
    f.write_bytes(f.read_bytes()[:100])
    c.record("a checkpoint data file truncated, `evaluate`",
             c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={w}", "--checkpoint=latest")), "the other steps")
    c.record("`evaluate --checkpoint=7` (no such step)",
             c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={root / 'run'}", "--checkpoint=7")), "")
    c.record("`evaluate` on a workdir without checkpoints",
             c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={root / 'empty'}")), "")

    # Two processes on one workdir.
    first = subprocess.Popen(c.cmd("train", f"--config={c.cfg}", f"--workdir={root / 'shared'}",
                                   "--config.total_steps=100000", "--config.checkpoint_every=100000"),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=c.env)
    for line in first.stdout:
        if line.startswith("[train] step 1/"):
            break
    c.record("a second `train` on a workdir in use", c.train("shared"), "the first run, untouched")
    first.send_signal(signal.SIGINT)
    rest = first.stdout.read()
    first.wait()
    c.rows.append(("Ctrl-C during training", first.returncode,
                   next((l for l in rest.splitlines() if "received signal" in l), "(no message)"),
                   "a checkpoint of the step reached; re-running resumes"))
    print(c.rows[-1], flush=True)
    w = copy_run("stale")
    (w / ".lock").write_text('{"command": "train", "host": "elsewhere", "pid": 999999, "started": "2026-01-01 00:00:00"}')
    c.record("a stale lock of a dead process", c.train("stale"), "the run; the lock is taken over",
             pick=("taking over",))

    # Config and flag errors.
    c.record("a config typo `--config.totl_steps=5`", c.train("typo", "--config.totl_steps=5"), "nothing written")
    c.record("`--config.data.crop_size=(256,)`", c.train("crop", "--config.data.crop_size=(256,)"), "nothing written")
    c.record("`--config.model.hr_settings.hr_scale=(30,30)`", c.train("hr", "--config.model.hr_settings.hr_scale=(30,30)"),
             "nothing written")
    c.record("an unknown flag `--bogus`", c.train("bogus", "--bogus"), "")
    c.record("a config file that does not exist",
             c.run(c.cmd("train", "--config=configs/no_such.py", f"--workdir={root / 'x'}")), "")
    c.record("`--checkpoint=newest`",
             c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={root / 'run'}", "--checkpoint=newest")), "")
    c.record("`--config.model.dtype=float64` without 64-bit JAX",
             c.train("f64", "--config.model.dtype=float64"), "nothing written")
    c.record("a missing IDRiD `manual_dir`",
             c.train("idrid", "--config.data.name=idrid", f"--config.data.manual_dir={root / 'nowhere'}"), "")

    # Unwritable outputs, before any work.
    (root / "a_file").write_text("x")
    c.record("`train --workdir` under a file", c.run(c.cmd("train", f"--config={c.cfg}", f"--workdir={root / 'a_file' / 'w'}")), "")
    c.record("`evaluate --output` not writable",
             c.run(c.cmd("evaluate", f"--config={c.cfg}", f"--workdir={root / 'run'}", f"--output={root / 'a_file' / 'o'}")),
             "nothing evaluated")
    c.record("`predict --output` not writable",
             c.run(c.cmd("predict", f"--config={c.cfg}", f"--workdir={root / 'run'}", f"--input={root / 'a_file'}",
                         f"--output={root / 'a_file' / 'o'}")), "nothing predicted")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    c.record("`predict` on a folder with an unreadable image among good ones",
             c.run(c.cmd("predict", f"--config={c.cfg}", f"--workdir={root / 'run'}", f"--input={photos}",
                         f"--output={root / 'pred'}")), "the other images' outputs", pick=("error:", "skipped", "unreadable"))

    # convert.
    from_tiny = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_w18_256_hr128_seed0_state_dict.npz"
    foreign = root / "foreign.npz"
    np.savez(foreign, **{"encoder.layer1.weight": np.zeros((3, 3), np.float32)})
    conv = lambda src, work, *extra: c.run(c.cmd("convert", "--config=configs/tiny.py", f"--torch-checkpoint={src}",
                                                 f"--workdir={root / work}", *extra), cwd=from_tiny.parents[2])
    c.record("`convert` of a state_dict that shares no tensor with the model", conv(foreign, "cv1"),
             "nothing written (`--allow_partial` to accept)")
    sd = dict(np.load(from_tiny))
    sd["decode_head.conv_seg.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    np.savez(root / "shape.npz", **sd)
    c.record("`convert` with a shape mismatch", conv(root / "shape.npz", "cv2"), "nothing written")
    (root / "garbage.pth").write_bytes(b"not a checkpoint" * 10)
    c.record("`convert` of a file that is not a checkpoint", conv(root / "garbage.pth", "cv3"), "nothing written")
    (root / "truncated.npz").write_bytes(from_tiny.read_bytes()[:100000])
    c.record("`convert` of a truncated .npz", conv(root / "truncated.npz", "cv4"), "nothing written")
    c.record("`convert` of a missing file", conv(root / "missing.pth", "cv5"), "nothing written")
    ok = conv(from_tiny, "cv6")
    assert ok.returncode == 0, ok.stderr[-2000:]
    c.record("`convert` twice into one workdir", conv(from_tiny, "cv6"), "the first conversion")
    c.record("`convert --workdir` under a file", c.run(c.cmd("convert", "--config=configs/tiny.py",
             f"--torch_checkpoint={from_tiny}", f"--workdir={root / 'a_file' / 'w'}"), cwd=from_tiny.parents[2]), "")

    # Data.
    from hrdecoder_jax.tools.write_layout import write_layout
    lay = root / "layout"
    write_layout(str(lay), "mmseg-png", num_train=2, num_test=1, height=64, width=64, seed=0)
    prepared = c.train("md", "--config.data.name=idrid", f"--config.data.manual_dir={lay}",
                       f"--config.data.data_dir={root / 'tfds'}")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    lay2 = root / "layout2"
    write_layout(str(lay2), "mmseg-png", num_train=2, num_test=1, height=64, width=64, seed=1)
    c.record("the same `data_dir` prepared from another `manual_dir`",
             c.train("md2", "--config.data.name=idrid", f"--config.data.manual_dir={lay2}",
                     f"--config.data.data_dir={root / 'tfds'}"), "the data prepared from the first")

    round_two(c, root, copy_run, conv, from_tiny)

    elapsed = time.time() - t0
    table = ["| case | exit | what the user sees | what is kept |", "|---|---:|---|---|"]
    table += [f"| {case} | {rc} | `{line.replace('|', '/')}` | {kept} |" for case, rc, line, kept in c.rows]
    text = "\n".join(table) + "\n"
    print(text)
    print(f"{len(c.rows)} cases in {elapsed:.0f} s; scratch folder {root}")
    if args.out:
        pathlib.Path(args.out).write_text(text)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
