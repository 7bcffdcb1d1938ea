"""Checkpoints (``checkpoint``): corrupt, missing, mismatched and absent steps are refused or moved aside, never
restored silently; resume picks the newest intact step.
"""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from helpers import cfg_with, copy_run, data_files, fixture_config, flip, one_error_line, write_config_file
from hrdecoder_jax import checkpoint, config_utils
from hrdecoder_jax.train import train_and_evaluate
from test_train import shrunk_synthetic_config

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def test_a_checkpoint_past_total_steps_is_reported_as_its_own_step(trained, tmp_path, capsys):
    root, _ = trained
    work = copy_run(root, tmp_path / "run")
    train_and_evaluate(fixture_config(root, total_steps=2), str(work))
    out = capsys.readouterr().out
    assert f"[done] the run in {work} already finished step 4 (past total_steps=2)" in out
    assert "Test metrics (test split, step 4; stored in" in out


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
