"""The workdir (``workdir``): the lock, the metrics log, outputs checked writable and written atomically.
"""
import json
import os
import pathlib
import re

import numpy as np

from helpers import copy_run, fixture_config, one_error_line, write_config_file
from hrdecoder_jax.train import train_and_evaluate
from hrdecoder_jax.workdir import WorkdirLock

REPO = pathlib.Path(__file__).resolve().parents[1]


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
