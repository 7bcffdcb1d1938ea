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
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from hrdecoder_jax import checkpoint, config_utils
from hrdecoder_jax.train import train_and_evaluate
from hrdecoder_jax.workdir import WorkdirLock
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


# ========================================================================================================
# Round two (issue 19): results silently wrong, data lost or a workdir stuck, refusals without a reason
# ========================================================================================================


def cfg_with(tmp_path, root, **overrides) -> pathlib.Path:
    """A config file of the ``trained`` run (eval_every 0, max_images 1) with ``overrides``."""
    return write_config_file(tmp_path, root / "data", eval_every=0, **{"eval.max_images": 1, **overrides})


def copy_run(root: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(root / "run", dest, symlinks=True)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def fixture_config(root, **changes):
    """The ``trained`` run's config with ``changes`` (``total_steps`` and so on)."""
    config = shrunk_synthetic_config(root / "data", total_steps=changes.pop("total_steps", 4))
    config.eval_every = 0
    config.eval.max_images = 1
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def flip(path: pathlib.Path) -> None:
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])
    path.write_bytes(bytes(blob))


# 1. A checkpoint restored into a model of another kind -------------------------------------------------


def test_a_checkpoint_of_another_model_is_refused_though_its_shapes_fit(trained, tmp_path, capsys):
    """HRDecoder and the FCN baseline with HRDecoder's head have the same parameters: the checkpoint's record
    of its model, not its shapes, tells them apart (evaluate, predict and training's init_from)."""
    root, _ = trained
    from PIL import Image

    from hrdecoder_jax import evaluate, predict
    fcn = cfg_with(tmp_path, root, **{"model.type": "FCN"})
    assert evaluate.main([f"--config={fcn}", f"--workdir={root / 'run'}", f"--output={tmp_path / 'e'}",
                          "--noprogress"]) == 1
    line = one_error_line(capsys)
    assert "checkpoints/4 holds a HRDecoder model, but this config builds a FCN (model.type)" in line
    photo = tmp_path / "p.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photo)
    assert predict.main([f"--config={fcn}", f"--workdir={root / 'run'}", f"--input={photo}",
                         f"--output={tmp_path / 'p'}"]) == 1
    assert "holds a HRDecoder model" in one_error_line(capsys)
    # A setting that defines the model but changes no shape: the LR input size.
    other = cfg_with(tmp_path, root, **{"model.hr_settings.hr_scale": (64, 64), "model.hr_settings.scale_ratio": None})
    assert evaluate.main([f"--config={other}", f"--workdir={root / 'run'}", f"--output={tmp_path / 'e'}",
                          "--noprogress"]) == 1
    line = one_error_line(capsys)
    assert "was written for another model config (model.hr_settings.hr_scale (32, 32) -> (64, 64);" in line
    # Training's init_from.
    config = fixture_config(root, init_from=str(root / "run"))
    config.model.type = "FCN"
    with pytest.raises(checkpoint.CheckpointMismatchError, match="init_from: .*holds a HRDecoder model"):
        train_and_evaluate(config, str(tmp_path / "w"), final_eval=False)


# 5. A changed model width moved every intact checkpoint to corrupt/ -------------------------------------


def test_a_resume_with_another_width_moves_nothing_and_the_right_config_resumes(trained, tmp_path, capsys):
    root, _ = trained
    work = copy_run(root, tmp_path / "run")
    wide = fixture_config(root, total_steps=6)
    wide.model = config_utils.model_config(width=8, num_modules=(1, 1, 1, 1), num_blocks=1, channels=8,
                                           kernel_size=3, hr_scale=(32, 32), crop_num=2, test_mode="slide",
                                           test_crop_size=(64, 64), test_stride=(32, 32))
    with pytest.raises(checkpoint.CheckpointError) as e:
        train_and_evaluate(wide, str(work), final_eval=False)
    assert "checkpoints/4 was written for another model config (model.backbone.extra.stage2.num_channels " \
           "(4, 8) -> (8, 16)" in str(e.value) and f"{work / 'config.json'} records it" in str(e.value)
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"] and not (work / "corrupt").exists()
    assert isinstance(e.value, checkpoint.CheckpointMismatchError)
    # Without the config record (the Python API): the shapes, before any array is read, naming the parameter.
    from flax import nnx

    from hrdecoder_jax.models import build_model
    model = nnx.eval_shape(lambda: build_model(wide.model, rngs=nnx.Rngs(0)))
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"checkpoints/4: parameter backbone\.\S+ is \(.+\) in the checkpoint but \(.+\) in "
                             r"this model"):
        checkpoint.restore_model(str(work), model)
    # The run's own config resumes from step 4, says what changed and keeps the first config.json.
    capsys.readouterr()
    out = train_and_evaluate(fixture_config(root, total_steps=6), str(work), final_eval=False)
    text = capsys.readouterr().out
    assert out["steps"] == 6 and f"resuming from {work} step 4" in text
    assert f"[resume] changed: total_steps 4 -> 6 (the first config stays in {work / 'config.json'})" in text
    assert json.loads((work / "config.json").read_text())["total_steps"] == 4


def test_an_optimizer_mismatch_names_the_optimizer_state(trained, tmp_path):
    root, _ = trained
    work = copy_run(root, tmp_path / "run")
    config = fixture_config(root, total_steps=6)
    config.optimizer.name = "sgd"                        # the run trained with AdamW
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints/4: does not fit: .*optimizer state"
                                                         ".*another optimizer.*this config changes "
                                                         "optimizer.name 'adamw' -> 'sgd'") as e:
        train_and_evaluate(config, str(work), final_eval=False)
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"] and not (work / "corrupt").exists()
    assert isinstance(e.value, checkpoint.CheckpointMismatchError)


def test_the_last_checkpoint_is_never_moved_aside(trained, tmp_path):
    """Every checkpoint damaged: the newest is moved aside and the run falls back, but the last one stays, so
    the next run stops at it again instead of training from scratch."""
    root, _ = trained
    work = copy_run(root, tmp_path / "run")
    for step in ("2", "4"):
        flip(data_files(work / "checkpoints" / step)[0])
    for _ in range(2):
        with pytest.raises(checkpoint.CheckpointCorruptError, match="checkpoints/2: .*the last checkpoint left"):
            train_and_evaluate(fixture_config(root, total_steps=6), str(work), final_eval=False)
        assert (work / "corrupt" / "4").is_dir() and sorted(os.listdir(work / "checkpoints")) == ["2"]
    assert not (work / "metrics.jsonl").read_text().count('"step": 5')


# 2. A data.cache of another dataset ---------------------------------------------------------------------


def test_a_file_cache_is_never_read_by_a_run_on_other_data(tmp_path):
    cache = tmp_path / "cache"

    def first_loss(seed: int) -> float:
        config = shrunk_synthetic_config(tmp_path / "data", total_steps=1)
        config.eval_every = 0
        config.data.synthetic.seed = seed
        config.data.cache = str(cache)
        return train_and_evaluate(config, str(tmp_path / f"w{seed}"), final_eval=False)["train"]["total"]

    assert first_loss(0) != first_loss(1)            # the second dataset's images, not the first's cached ones
    held = [json.loads(m.read_text()) for m in sorted(cache.glob("*/_COMPLETE"))]
    assert len(held) == 2 and held[0]["holds"] != held[1]["holds"]
    assert all("synthetic_fundus" in h["holds"] and h["num_examples"] == 6 for h in held)


# 3. A 16-bit greyscale image in a dataset -----------------------------------------------------------------


def test_a_16_bit_grey_image_is_decoded_alike_by_the_datasets_and_predict(tmp_path):
    from PIL import Image

    from hrdecoder_jax.data import load_split, manual
    from hrdecoder_jax.predict import read_image
    from hrdecoder_jax.tools.write_layout import write_layout
    grey = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    path = tmp_path / "g.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode == "I;16"
    rgb, _ = manual.decode_image(path.read_bytes(), str(path))
    np.testing.assert_array_equal(rgb, read_image(str(path)))
    np.testing.assert_array_equal(rgb[..., 0], np.round(grey / 257.0).astype(np.uint8))   # 0..65535 -> 0..255
    # Through a prepared dataset: the builder stores what the decoder gives, not an all-white image.
    manual_dir = tmp_path / "manual"
    write_layout(manual_dir, "mmseg-png", num_train=1, num_test=1, height=32, width=48, seed=0)
    (manual_dir / "images" / "train" / "IDRiD_01.jpg").unlink()
    shutil.copy(path, manual_dir / "images" / "train" / "IDRiD_01.png")
    ex = next(load_split("idrid", "train", data_dir=tmp_path / "tfds", manual_dir=manual_dir).as_numpy_iterator())
    np.testing.assert_array_equal(ex["image"], rgb)


# 4. predict's output names ------------------------------------------------------------------------------


def test_predict_names_never_collide_and_outputs_are_never_inputs(trained, tmp_path, capsys):
    from PIL import Image

    from hrdecoder_jax import LESIONS, predict
    from hrdecoder_jax.data import generate_fundus
    root, _ = trained
    cfg = cfg_with(tmp_path, root)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(generate_fundus(1, 64, 64)[0]).save(photos / "a.jpg")
    Image.fromarray(generate_fundus(2, 64, 64)[0]).save(photos / "a.png")
    os.symlink(tmp_path / "nowhere.jpg", photos / "gone.jpg")
    args = [f"--config={cfg}", f"--workdir={root / 'run'}", f"--input={photos}", f"--output={photos}"]
    assert predict.main(args) == 0
    captured = capsys.readouterr()
    outputs = sorted(f"a.{ext}_{kind}.png" for ext in ("jpg", "png") for kind in (*LESIONS, "overlay"))
    names = sorted(["a.jpg", "a.png", "gone.jpg", "predictions.json", *outputs])
    assert sorted(p.name for p in photos.iterdir()) == names
    assert "wrote predictions of 2 file(s)" in captured.out
    assert f"skipped {photos / 'gone.jpg'}: " in captured.err and "broken symbolic link" in captured.err
    # Again into the same folder: the same two photos, not the 10 outputs of the first run.
    assert predict.main(args) == 0
    captured = capsys.readouterr()
    assert "wrote predictions of 2 file(s)" in captured.out and "left out 10 output file(s)" in captured.err
    assert sorted(p.name for p in photos.iterdir()) == names
    # An output named like an input would overwrite it: refused before anything runs.
    clash = tmp_path / "clash"
    clash.mkdir()
    Image.fromarray(generate_fundus(3, 64, 64)[0]).save(clash / "b.png")
    Image.fromarray(generate_fundus(4, 64, 64)[0]).save(clash / "b_EX.png")
    assert predict.main([f"--config={cfg}", f"--workdir={root / 'run'}", f"--input={clash}",
                         f"--output={clash}"]) == 1
    assert "would overwrite the input" in one_error_line(capsys)
    assert sorted(p.name for p in clash.iterdir()) == ["b.png", "b_EX.png"]


# 6. A torn last line of metrics.jsonl -----------------------------------------------------------------------


def test_a_torn_last_line_of_the_metrics_log_is_cut_off(trained, tmp_path, capsys):
    root, _ = trained
    work = copy_run(root, tmp_path / "run")
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "va')                # a kill or a full disk in the middle of a write
    config = fixture_config(root, eval_every=2)            # the re-run looks for its last validation in the log
    train_and_evaluate(config, str(work), final_eval=False)
    text = capsys.readouterr().out
    assert f"[log] {work / 'metrics.jsonl'}: dropped its torn last line (23 bytes" in text
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "val" and rows[-1]["step"] == 4


# 7. evaluate's outputs ---------------------------------------------------------------------------------------


def test_evaluate_prints_first_and_never_leaves_a_partial_file(trained, tmp_path, capsys, monkeypatch):
    root, _ = trained
    from hrdecoder_jax import evaluate
    args = [f"--config={cfg_with(tmp_path, root)}", f"--workdir={root / 'run'}", f"--output={tmp_path / 'e'}",
            "--noprogress"]
    assert evaluate.main(args) == 0
    first = (tmp_path / "e" / "metrics.json").read_text()
    doc = json.loads(first)
    assert (doc["step"], doc["checkpoint"], doc["workdir"]) == (4, str(root / "run" / "checkpoints" / "4"),
                                                                str(root / "run"))
    capsys.readouterr()

    def full_disk(obj, f, **kwargs):                          # the disk fills up halfway through metrics.json
        f.write(json.dumps(obj, **kwargs)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    assert evaluate.main(args) == 1
    captured = capsys.readouterr()
    assert "Class" in captured.out and "mean" in captured.out          # the table came first
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: disk full (no space left on device): {tmp_path / 'e' / 'metrics.json'}"]
    assert (tmp_path / "e" / "metrics.json").read_text() == first     # the previous result, whole
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["metrics.json", "per_image.csv", "pr_curves.png"]


def test_commands_write_files_only_through_atomic_write():
    """Every output file of every command goes through ``workdir.atomic_write`` (a temporary name, renamed
    when complete): no module opens an output path for writing itself."""
    writes = re.compile(r"""open\([^)]*["'][wx]b?["']|\.write_text\(|\.write_bytes\(|np\.save\((?!f\b)|"""
                        r"""savefig\((?!f\b)|Image\.fromarray\([^)]*\)\.save\((?!f\b|buf\b)""")
    offenders = []
    for path in (REPO / "hrdecoder_jax").rglob("*.py"):
        if path.name == "workdir.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if writes.search(line) and "os.devnull" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


# 8. write_layout into an existing folder ------------------------------------------------------------------


def test_write_layout_never_writes_into_an_existing_dataset(tmp_path, capsys):
    from hrdecoder_jax.tools import write_layout as tool
    main, write_layout = tool.main, tool.write_layout
    real = tmp_path / "download"
    (real / "images" / "train").mkdir(parents=True)
    photo = real / "images" / "train" / "IDRiD_01.jpg"
    photo.write_bytes(b"a real photograph")
    small = ["--num-train", "1", "--num-test", "1", "--height", "32", "--width", "48"]
    assert main(["--layout", "mmseg", "--out", str(real), *small]) == 1
    line = one_error_line(capsys)
    assert f"--out {real} is not empty (images)" in line and "mix two datasets" in line
    assert photo.read_bytes() == b"a real photograph"
    assert sorted(str(p.relative_to(real)) for p in real.rglob("*")) == ["images", "images/train",
                                                                        "images/train/IDRiD_01.jpg"]
    with pytest.raises(ValueError, match="is not empty"):        # write_layout.LayoutError
        write_layout(real, "mmseg", num_train=1, num_test=1, height=32, width=48)
    assert main(["--layout", "mmseg", "--out", str(tmp_path / "new"), *small]) == 0


# 9. Preparing a dataset from several processes ------------------------------------------------------------


def test_a_dataset_is_prepared_once_while_another_process_waits(tmp_path):
    """A process asking for a dataset that another one is preparing (it holds the preparation lock) waits,
    prepares nothing, and reads what the first one prepared."""
    import fcntl

    import tensorflow_datasets as tfds

    from hrdecoder_jax.data import synthetic_config
    builder = tfds.builder("synthetic_fundus", data_dir=str(tmp_path), config=synthetic_config(32, 48, 2, 1, seed=3))
    folder = pathlib.Path(builder.data_dir)
    folder.parent.mkdir(parents=True)
    fd = os.open(folder.parent / f".{folder.name}.prepare.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)                          # this process is "preparing"
    script = ("from hrdecoder_jax.data import get_builder, synthetic_config\n"
              f"b = get_builder('synthetic_fundus', data_dir={str(tmp_path)!r}, "
              "config=synthetic_config(32, 48, 2, 1, seed=3))\n"
              "print('examples', b.info.splits['train'].num_examples)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "waiting: another process is preparing synthetic_fundus" in line:
                break
        assert not builder.is_prepared()                    # it waits instead of preparing too
        builder.download_and_prepare()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "examples 2" in out


# 10. Checkpoints of the original's own training -------------------------------------------------------------


def test_convert_reads_checkpoints_with_numpy_values_in_their_meta(fixtures_dir, tmp_path, capsys, monkeypatch):
    """mmcv stores numpy scalars in ``meta`` (``evaluation=dict(save_best=...)``): read with weights_only,
    numpy's scalars and dtypes allowed, under numpy 2's and numpy 1's names; anything that runs code is
    still refused."""
    import zipfile

    import torch

    from hrdecoder_jax import convert
    monkeypatch.chdir(REPO)
    tensors = {k: torch.from_numpy(v) for k, v in np.load(fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz").items()}
    meta = {"iter": 20000, "mmcv_version": "1.7.1", "CLASSES": ("background", "EX", "HE", "SE", "MA"),
            "hook_msgs": {"best_score": np.float64(0.3781), "best_ckpt": "best_mIoU_iter_20000.pth",
                          "last_ckpt": "iter_20000.pth"}, "best_iter": np.int64(20000)}
    torch.save({"meta": meta, "state_dict": tensors, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}},
               tmp_path / "mmcv.pth")
    old = tmp_path / "mmcv_numpy1.pth"                       # as numpy 1 pickles its scalars
    with zipfile.ZipFile(tmp_path / "mmcv.pth") as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(info, data)
    for source in (tmp_path / "mmcv.pth", old):
        assert convert.main(["--config=configs/tiny.py", f"--torch_checkpoint={source}",
                             f"--workdir={tmp_path / source.stem}"]) == 0, capsys.readouterr().err
        assert "loaded 277 tensors" in capsys.readouterr().out

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"meta": {"hook": RunsCode()}, "state_dict": tensors}, tmp_path / "code.pth")
    assert convert.main(["--config=configs/tiny.py", f"--torch_checkpoint={tmp_path / 'code.pth'}",
                         f"--workdir={tmp_path / 'code'}"]) == 1
    assert "not a readable PyTorch checkpoint" in one_error_line(capsys)


# 11. Set-up errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,where", [
    ("def get_config(:\n    pass\n", ":1: SyntaxError: invalid syntax"),
    ("from hrdecoder_jax import config_utils\n\n\ndef get_config():\n    c = config_utils.base_config()\n"
     "    c.seed = undefined_name\n    return c\n", ":6: NameError: name 'undefined_name' is not defined"),
], ids=["syntax", "name"])
def test_a_broken_config_file_is_one_line_naming_the_file_and_line(text, where, tmp_path, capsys):
    from hrdecoder_jax import train
    path = tmp_path / "broken.py"
    path.write_text(text)
    assert train.main([f"--config={path}", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}{where}"), err


def test_a_missing_cuda_backend_is_named(fixtures_dir, tmp_path):
    import importlib.util
    if any(importlib.util.find_spec(n) for n in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        pytest.skip("JAX's CUDA plugin is installed here: JAX_PLATFORMS=cuda may well work")
    result = subprocess.run([sys.executable, "-m", "hrdecoder_jax.convert", "--config=configs/tiny.py",
                             f"--torch_checkpoint={fixtures_dir / 'tiny_w18_256_hr128_seed0_state_dict.npz'}",
                             f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, timeout=600, cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cuda"))
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1, result.stderr[-2000:]
    assert err[0].startswith("error: JAX_PLATFORMS=cuda but CUDA is not available: JAX's CUDA plugin is not "
                             "installed") and "unset JAX_PLATFORMS" in err[0]


def test_commands_print_no_tensorflow_banner_and_convert_imports_no_tensorflow(fixtures_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "hrdecoder_jax.evaluate", "--config=configs/tiny.py",
                             f"--workdir={tmp_path / 'nothing'}"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}: no Orbax checkpoint found (looked for {tmp_path / 'nothing' / 'checkpoints'}, "
        f"{tmp_path / 'nothing'}, {tmp_path / 'nothing' / 'best'}); train first or run `python -m hrdecoder_jax.convert`"]
    script = ("import sys\nfrom hrdecoder_jax import convert\n"
              f"status = convert.main(['--config=configs/tiny.py', '--torch_checkpoint="
              f"{fixtures_dir / 'tiny_w18_256_hr128_seed0_state_dict.npz'}', '--workdir={tmp_path / 'w'}'])\n"
              "print('status', status, 'tensorflow imported:', 'tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert "status 0 tensorflow imported: False" in result.stdout, result.stderr[-2000:]


# The warnings: one line naming the file, field or parameter ------------------------------------------------


def test_a_checkpoint_past_total_steps_is_reported_as_its_own_step(trained, tmp_path, capsys):
    root, _ = trained
    work = copy_run(root, tmp_path / "run")
    train_and_evaluate(fixture_config(root, total_steps=2), str(work))
    out = capsys.readouterr().out
    assert f"[done] the run in {work} already finished step 4 (past total_steps=2)" in out
    assert "Test metrics (test split, step 4; stored in" in out


@pytest.mark.parametrize("command,extra,expect", [
    ("evaluate", ["--config.eval.max_images=0"], "error: eval.max_images=0 must be >= 1"),
    ("train", ["--config.data.val_count=100"], "error: data.val_count=100 holds out too many of the training "
                                               "split's 7 images"),
    ("train", ["--config.data.val_count=-1"], "error: data.val_count=-1 must be a number of images >= 0"),
    ("train", ["--config.data.val_fraction=1.5"], "error: data.val_fraction=1.5 must be in [0, 1)"),
], ids=["max_images", "val_count", "val_count_negative", "val_fraction"])
def test_bad_settings_name_the_field(trained, tmp_path, capsys, command, extra, expect):
    import importlib
    root, _ = trained
    module = importlib.import_module(f"hrdecoder_jax.{command}")
    assert module.main([f"--config={cfg_with(tmp_path, root)}", f"--workdir={tmp_path / 'w'}", *extra]) == 1
    line = one_error_line(capsys)
    assert line.startswith(expect) and "unexpected" not in line, line


def test_a_config_without_a_data_section_is_named(tmp_path, capsys):
    from hrdecoder_jax import evaluate, train
    path = tmp_path / "nodata.py"
    path.write_text("from hrdecoder_jax import config_utils\n\n\ndef get_config():\n    return config_utils.base_config()\n")
    for module in (train, evaluate):
        assert module.main([f"--config={path}", f"--workdir={tmp_path / 'w'}"]) == 1
        line = one_error_line(capsys)
        assert line.startswith("error: the config has no 'data' section: set config.data") and "unexpected" not in line


def test_a_missing_best_checkpoint_and_a_step_folder(trained, tmp_path, capsys):
    """A workdir without a best checkpoint (a convert workdir, a run without validation) asked for 'best'
    says what it has; a step's own folder is a checkpoint too."""
    root, _ = trained
    from hrdecoder_jax import evaluate
    cfg = cfg_with(tmp_path, root)
    assert evaluate.main([f"--config={cfg}", f"--workdir={root / 'run'}", "--checkpoint=best", "--noprogress",
                          f"--output={tmp_path / 'e'}"]) == 1
    line = one_error_line(capsys)
    assert f"{root / 'run'}: no best checkpoint" in line and "it has the latest checkpoints [2, 4]: use " \
                                                              "--checkpoint latest or a step" in line
    work = copy_run(root, tmp_path / "run")
    assert evaluate.main([f"--config={cfg}", f"--workdir={work / 'checkpoints' / '2'}", "--noprogress"]) == 0
    assert json.loads((work / "eval_test_2" / "metrics.json").read_text())["step"] == 2   # beside, not inside, it
    assert sorted(os.listdir(work / "checkpoints" / "2")) == sorted(os.listdir(root / "run" / "checkpoints" / "2"))


def test_benchmark_checks_its_json_output_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import benchmark
    (tmp_path / "a_file").write_text("x")
    assert benchmark.main(["--config=configs/tiny.py", "--what=infer", f"--json={tmp_path / 'a_file' / 'b.json'}"]) == 1
    captured = capsys.readouterr()
    assert "device:" not in captured.out                      # nothing was measured
    assert "--json's folder" in one_error_line_of(captured.err) and "not writable" in captured.err


def one_error_line_of(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_an_image_without_any_mask_is_refused(tmp_path):
    """All four masks of an image missing: it is not annotated (mmseg and nnU-Net need a label for every
    image), so it would enter the test set as lesion-free; refused, naming it."""
    from hrdecoder_jax.data import DatasetError, load_split
    from hrdecoder_jax.tools.write_layout import write_layout
    manual_dir = tmp_path / "manual"
    write_layout(manual_dir, "mmseg", num_train=1, num_test=2, height=32, width=48, seed=0)
    for mask in (manual_dir / "labels" / "test").rglob("IDRiD_03_*.tif"):
        mask.unlink()
    with pytest.raises(DatasetError, match=r"idrid/test: 1 image\(s\) in .*images/test have no mask at all in "
                                           r".*labels/test \(IDRiD_03\)"):
        load_split("idrid", "test", data_dir=tmp_path / "tfds", manual_dir=manual_dir)


def test_the_readme_same_training_command_runs_in_a_fresh_clone(tmp_path):
    """``--out runs/same`` of a fresh clone does not exist: the script makes it (and writes the dataset whole
    before naming it). ``--only report`` stops before training anything."""
    out = tmp_path / "runs" / "same"
    result = subprocess.run([sys.executable, "launch/reference/same_training.py", "--reference-python", "REF_VENV/bin/python",
                             "--reference-harness", "shared/reference", "--out", str(out), "--only", "report"],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no report" in result.stdout
    assert len(list((out / "data" / "images" / "train").iterdir())) == 48 and not (out / "data.partial").exists()
