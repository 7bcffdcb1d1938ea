"""Nothing silent, nothing stuck: each failure of the reliability review, reproduced and handled.

Every command's expected failures end in one line ``error: ...`` on stderr (``cli``); corrupt checkpoints
are refused or skipped; a workdir is locked; a finished run re-runs; masks, weights and configs that
would have been silently wrong are caught. ``docs/reliability.md`` lists the cases and what each gets.
"""
import errno
import io
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from hrdecoder_jax import checkpoint, config_utils
from hrdecoder_jax.train import train_and_evaluate
from hrdecoder_jax.workdir import WorkdirError, WorkdirLock
from test_train import shrunk_synthetic_config, signal_running_training

REPO = pathlib.Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def write_config_file(tmp_path, data_dir, **overrides) -> pathlib.Path:
    """A config file for the commands: the shrunk synthetic config with ``overrides``."""
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.py')))}.py"
    lines = ["import sys", f"sys.path.insert(0, {str(REPO / 'tests')!r})", "from test_train import shrunk_synthetic_config",
             "def get_config():", f"    c = shrunk_synthetic_config({str(data_dir)!r})"]
    lines += [f"    c.{k} = {v!r}" for k, v in overrides.items()]
    lines += ["    return c", ""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4, final test metrics) and its config."""
    root = tmp_path_factory.mktemp("reliability")
    config = shrunk_synthetic_config(root / "data")
    config.eval_every = 0
    config.eval.max_images = 1
    result = train_and_evaluate(config, str(root / "run"))
    assert result["steps"] == 4
    return root, config


def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in (step_dir / "model").rglob("*") if p.is_file() and "d" in p.parent.name),
                  key=lambda p: p.stat().st_size, reverse=True)


# 1. A corrupted checkpoint restores silently ------------------------------------------------------------


def test_corrupt_checkpoint_is_refused_by_evaluate_and_skipped_by_training(trained, tmp_path, capsys):
    root, config = trained
    work = tmp_path / "run"
    shutil.copytree(root / "run", work)
    target = data_files(work / "checkpoints" / "4")[0]
    blob = bytearray(target.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])    # 64 bytes flipped
    target.write_bytes(bytes(blob))
    cfg_file = write_config_file(tmp_path, root / "data", eval_every=0)
    from hrdecoder_jax import evaluate
    assert evaluate.main([f"--config={cfg_file}", f"--workdir={work}", "--noprogress"]) == 1
    line = one_error_line(capsys)
    assert "checkpoints/4" in line and ("does not match" in line or "cannot be read" in line)
    # Training falls back to the intact step 2, says so, moves the corrupt step aside and goes on.
    more = shrunk_synthetic_config(root / "data", total_steps=6)
    more.eval_every = 0
    out = train_and_evaluate(more, str(work), final_eval=False)
    text = capsys.readouterr().out
    assert "falling back" in text and "resuming from" in text and f"{work} step 2" in text
    assert out["steps"] == 6 and (work / "corrupt" / "4").is_dir()
    assert sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit())[-1] == 6


def test_missing_or_truncated_checkpoint_file_is_one_line(trained, tmp_path, capsys):
    root, _ = trained
    cfg_file = write_config_file(tmp_path, root / "data", eval_every=0)
    from hrdecoder_jax import evaluate
    for damage in ("truncate", "delete"):
        work = tmp_path / damage
        shutil.copytree(root / "run", work)
        for f in data_files(work / "checkpoints" / "4"):
            f.write_bytes(f.read_bytes()[:10]) if damage == "truncate" else f.unlink()
        assert evaluate.main([f"--config={cfg_file}", f"--workdir={work}", "--noprogress"]) == 1
        assert "checkpoints/4" in one_error_line(capsys)


# 2. A finished run cannot be re-run ---------------------------------------------------------------------


def test_finished_run_reruns_and_prints_its_stored_results(trained, tmp_path, capsys):
    root, config = trained
    work = tmp_path / "run"
    shutil.copytree(root / "run", work)
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*") if p.is_file()}
    stored = json.loads((work / "metrics_test.json").read_text())
    again = train_and_evaluate(config, str(work))
    out = capsys.readouterr().out
    assert "already finished step 4" in out and "stored in" in out
    assert np.allclose(np.asarray(again["test"]["IoU"], float), np.asarray(stored["IoU"], float), equal_nan=True)
    # Killed during the final evaluation: the results file is missing; the re-run computes it, saves nothing.
    (work / "metrics_test.json").unlink()
    train_and_evaluate(config, str(work))
    assert json.loads((work / "metrics_test.json").read_text())["IoU"] == stored["IoU"]
    assert {p: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*") if p.is_file()} == before


# 3. Two processes on one workdir ------------------------------------------------------------------------


def test_a_second_run_on_a_locked_workdir_stops_at_once(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    cfg_file = write_config_file(tmp_path, tmp_path / "data")
    from hrdecoder_jax import train
    with WorkdirLock(str(work), "train"):
        assert train.main([f"--config={cfg_file}", f"--workdir={work}"]) == 1
        line = one_error_line(capsys)
        assert f"pid {os.getpid()}" in line and "in use by train on host" in line
    # At once: before the dataset is prepared or anything is written into the workdir.
    assert not (tmp_path / "data").exists() and sorted(p.name for p in work.iterdir()) == [".lock"]


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / ".lock").write_text(json.dumps({"command": "train", "host": "elsewhere", "pid": 999999,
                                            "started": "2026-01-01T00:00:00"}) + "\n")
    with WorkdirLock(str(work), "train"):
        pass
    assert "taking over the lock of train on host elsewhere, pid 999999" in capsys.readouterr().err
    assert (work / ".lock").read_text() == ""                # released cleanly


# 4. An RGBA mask whose lesion is only in the alpha channel ----------------------------------------------


def test_mask_drawn_in_the_alpha_channel_is_used_and_reported(caplog):
    from PIL import Image

    from hrdecoder_jax.data import manual
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[5:9, 10:14, 3] = 255                                  # black RGB, lesion in alpha only
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    with caplog.at_level(logging.WARNING, logger="hrdecoder_jax.data"):
        mask = manual.decode_mask(buf.getvalue(), "IDRiD_01_EX.png")
    assert mask.sum() == 16 and mask[5:9, 10:14].all()
    assert "IDRiD_01_EX.png" in caplog.text and "alpha" in caplog.text
    opaque = rgba.copy()
    opaque[..., 3] = 255                                        # IDRiD's own RGBA: opaque, lesion in red
    opaque[2:4, 2:4, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(opaque, "RGBA").save(buf, format="PNG")
    assert manual.decode_mask(buf.getvalue(), "x.png").sum() == 4


# 5. convert of a state_dict that shares no tensor with the model ----------------------------------------


def test_convert_refuses_a_foreign_state_dict(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import convert
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, **{"encoder.layer1.weight": np.zeros((3, 3), np.float32)})
    args = ["--config=configs/tiny.py", f"--torch_checkpoint={foreign}", f"--workdir={tmp_path / 'w'}"]
    assert convert.main(args) == 1
    line = one_error_line(capsys)
    assert "fills only 0 of the model's 277 tensors" in line and "--allow_partial" in line
    assert not (tmp_path / "w" / "checkpoints").exists()
    assert convert.main(args + ["--allow_partial"]) == 0


# 6. Tracebacks where one line belongs -------------------------------------------------------------------


def test_convert_errors_are_one_line(fixtures_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import convert
    good = fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz"
    bad_shape = tmp_path / "shape.npz"
    sd = dict(np.load(good))
    sd["decode_head.conv_seg.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    np.savez(bad_shape, **sd)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 10)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100000])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(bad_shape, tmp_path / "w1", "shape mismatch for decode_head.conv_seg.weight"),
             (garbage, tmp_path / "w2", "not a readable PyTorch checkpoint"),
             (truncated, tmp_path / "w3", "not a readable .npz"),
             (tmp_path / "missing.pth", tmp_path / "w4", "missing.pth"),
             (good, a_file / "sub", "not writable")]
    for source, work, expect in cases:
        assert convert.main(["--config=configs/tiny.py", f"--torch_checkpoint={source}", f"--workdir={work}"]) == 1
        assert expect in one_error_line(capsys), expect
    args = ["--config=configs/tiny.py", f"--torch_checkpoint={good}", f"--workdir={tmp_path / 'w5'}"]
    assert convert.main(args) == 0
    capsys.readouterr()
    assert convert.main(args) == 1                              # the step exists: a second convert
    assert "already exists" in one_error_line(capsys)


def test_errors_of_a_command_run_as_main_are_expected_ones(fixtures_dir, tmp_path):
    """``python -m hrdecoder_jax.convert`` runs the module as ``__main__``; its errors must still be the
    package's own classes (a ``__main__`` copy of ``WeightImportError`` would be 'unexpected')."""
    sd = dict(np.load(fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz"))
    sd["decode_head.conv_seg.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    np.savez(tmp_path / "shape.npz", **sd)
    result = subprocess.run([sys.executable, "-m", "hrdecoder_jax.convert", "--config=configs/tiny.py",
                             f"--torch-checkpoint={tmp_path / 'shape.npz'}", f"--workdir={tmp_path / 'w'}"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert "shape mismatch for decode_head.conv_seg.weight" in errors[0] and "unexpected" not in errors[0]
    assert "Traceback" not in result.stderr


def test_config_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import train
    base = ["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}"]
    assert train.main(base + ["--config.totl_steps=5"]) == 2
    assert "no config field totl_steps; Did you mean \"total_steps\"" in one_error_line(capsys)
    assert train.main(base + ["--config.data.crop_size=(256,)"]) == 1
    assert "data.crop_size=(256,) must be two positive numbers" in one_error_line(capsys)
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_full_disk_stops_the_run_at_the_failing_save(tmp_path):
    """A 3 MB file system for the workdir: the first checkpoint does not fit. The run stops with one line
    saying 'disk full'. Needs a tmpfs mount (root); reported as skipped where there is none."""
    work = tmp_path / "small"
    work.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(work)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("no tmpfs mount available (needs root): a full disk cannot be made here")
    cfg_file = write_config_file(tmp_path, tmp_path / "data", eval_every=0, checkpoint_every=1, total_steps=3)
    try:
        result = subprocess.run([sys.executable, "-m", "hrdecoder_jax.train", f"--config={cfg_file}",
                                 f"--workdir={work}"], capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["umount", str(work)], capture_output=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "disk full" in errors[0], result.stderr[-3000:]
    assert "step 3/3" not in result.stdout                      # it stopped, not one save later at the end
    assert len(result.stderr.splitlines()) < 40


# 7. Late or misleading failures -------------------------------------------------------------------------


def test_unwritable_outputs_fail_before_any_work(trained, tmp_path, capsys):
    root, _ = trained
    cfg_file = write_config_file(tmp_path, root / "data", eval_every=0)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    photo = tmp_path / "p.png"
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    from hrdecoder_jax import evaluate, predict
    assert predict.main([f"--config={cfg_file}", f"--workdir={root / 'run'}", f"--input={photo}",
                         f"--output={a_file / 'out'}"]) == 1
    captured = capsys.readouterr()
    assert "--output" in captured.err and "not writable" in captured.err and "restored" not in captured.err
    assert "unreadable" not in captured.err and "skipped" not in captured.err
    assert evaluate.main([f"--config={cfg_file}", f"--workdir={root / 'run'}", f"--output={a_file / 'out'}"]) == 1
    captured = capsys.readouterr()
    assert "--output" in captured.err and "restored" not in captured.err


def test_a_changed_manual_dir_is_refused(tmp_path):
    from hrdecoder_jax.data import DatasetError, get_builder
    from hrdecoder_jax.tools.write_layout import write_layout
    first, second = tmp_path / "first", tmp_path / "second"
    for where, seed in ((first, 0), (second, 1)):
        write_layout(str(where), "mmseg-png", num_train=1, num_test=1, height=32, width=48, seed=seed)
    get_builder("idrid", data_dir=tmp_path / "tfds", manual_dir=first)
    get_builder("idrid", data_dir=tmp_path / "tfds", manual_dir=first)          # the same: fine
    with pytest.raises(DatasetError, match="was prepared from .*first, not from manual_dir=.*second"):
        get_builder("idrid", data_dir=tmp_path / "tfds", manual_dir=second)


def test_ctrl_c_saves_like_sigterm(tmp_path):
    cfg_file = write_config_file(tmp_path, tmp_path / "data", eval_every=0, checkpoint_every=100000,
                                 total_steps=100000)
    status, rest = signal_running_training(cfg_file, tmp_path / "w", signal.SIGINT)
    assert status == 130
    assert f"received signal {int(signal.SIGINT)}" in rest
    steps = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
    assert steps and min(steps) >= 2


def test_oserror_lines_name_the_cause():
    from hrdecoder_jax import cli
    assert cli.describe(OSError(errno.ENOSPC, "No space left on device", "/ckpt/4")) == \
        "disk full (no space left on device): /ckpt/4"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert cli.describe(wrapped).startswith("disk full")
    assert "unexpected" in cli.describe(ZeroDivisionError("x"))
