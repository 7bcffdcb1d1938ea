"""End-to-end training: schedule, interrupt + resume equality on 4 fake CPU devices, multi-process launch."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from helpers import (
    write_config_file,
)
from hrdecoder_jax import LESIONS, checkpoint, cli, config_utils
from hrdecoder_jax.checkpoint import CheckpointError
from hrdecoder_jax.data import DatasetError
from hrdecoder_jax.optim import learning_rate_schedule
from hrdecoder_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


def shrunk_synthetic_config(data_dir, total_steps=4):
    """configs/synthetic.py:toy (64 px images, hr_scale 32, 4 steps of global batch 4) on ``data_dir``."""
    config = cli.load_config(str(REPO / "configs" / "synthetic.py:toy"))
    config.data.data_dir = str(data_dir)
    config.total_steps = total_steps
    return config


def read_losses(path):
    rows = [json.loads(line) for line in open(path)]
    return {r["step"]: r["total"] for r in rows if r["kind"] == "train"}


def test_schedule_equals_reference_formula():
    opt = config_utils.optimizer_config()
    sched = learning_rate_schedule(opt, 20000)

    def reference(i):
        regular = 0.01 * (1 - i / 20000) ** 1.0
        return regular * (1 - (1 - i / 1500) * (1 - 1e-6)) if i < 1500 else regular

    for i in (0, 1, 750, 1499, 1500, 1501, 10000, 19999):
        assert float(sched(i)) == pytest.approx(reference(i), rel=1e-6, abs=1e-12), i
    assert float(sched(0)) == pytest.approx(1e-8, rel=1e-5)
    assert float(sched(1499)) == pytest.approx(0.009244, rel=1e-4)
    assert float(sched(1500)) == pytest.approx(0.00925, rel=1e-6)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    assert jax.device_count() == 4            # tests/conftest.py: 4 fake CPU devices; batch sharded over them
    config = shrunk_synthetic_config(tmp_path / "data")
    full = train_and_evaluate(config, str(tmp_path / "full"), final_eval=False)
    assert full["steps"] == 4
    part = train_and_evaluate(config, str(tmp_path / "split"), final_eval=False, stop_after=2)
    assert part.get("stopped") and part["steps"] == 2
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["2"]
    train_and_evaluate(config, str(tmp_path / "split"), final_eval=False)      # resumes at step 2
    a, b = read_losses(tmp_path / "full" / "metrics.jsonl"), read_losses(tmp_path / "split" / "metrics.jsonl")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    assert len(set(np.round(list(a.values()), 6))) > 1      # the loss really changed over the steps
    assert (tmp_path / "full" / "config.json").exists() and (tmp_path / "full" / "best").is_dir()
    vals = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl") if '"val"' in line]
    assert [v["step"] for v in vals] == [2, 4] and all(0 <= v["mIoU"] <= 1 for v in vals)
    # The checkpoint written from 4 devices restores onto one (a fresh model lives on a single device).
    from flax import nnx

    from hrdecoder_jax.models import build_model
    model = build_model(config.model, rngs=nnx.Rngs(123))
    before = np.asarray(model.decode_head.conv_seg.kernel[...]).copy()
    meta = checkpoint.restore_model(str(tmp_path / "full"), model)
    kernel = model.decode_head.conv_seg.kernel[...]
    assert meta["step"] == 4 and len(kernel.sharding.device_set) == 1
    assert not np.allclose(np.asarray(kernel), before)


def test_bad_settings_fail_before_training(tmp_path):
    config = shrunk_synthetic_config(tmp_path / "data")
    config.global_batch_size = 3
    with pytest.raises(config_utils.ConfigError, match="global_batch_size=3 does not divide over 4 devices"):
        train_and_evaluate(config, str(tmp_path / "w"))
    config = shrunk_synthetic_config(tmp_path / "data")
    config.data.name = "idrid"
    config.data.manual_dir = str(tmp_path / "nothing-here")
    with pytest.raises(DatasetError, match="nothing-here"):
        train_and_evaluate(config, str(tmp_path / "w2"))
    # A checkpoint of another architecture as init_from.
    good = shrunk_synthetic_config(tmp_path / "data", total_steps=2)
    good.eval_every = 0
    train_and_evaluate(good, str(tmp_path / "small"), final_eval=False)
    other = shrunk_synthetic_config(tmp_path / "data")
    other.model.decode_head.channels = 16
    other.init_from = str(tmp_path / "small")
    with pytest.raises(CheckpointError, match="init_from"):
        train_and_evaluate(other, str(tmp_path / "w3"), final_eval=False)


def test_two_process_launch_agrees(tmp_path):
    """The local launcher runs 2 processes x 2 CPU devices through jax.distributed on a fresh data_dir (process
    0 prepares the dataset, the other waits for it: both preparing at once killed the first run); both
    processes see the same global losses, equal to the single-process 4-device run of the same config."""
    config = shrunk_synthetic_config(tmp_path / "data_single", total_steps=2)
    config.eval_every = 0
    single = tmp_path / "single"
    train_and_evaluate(config, str(single), final_eval=False)
    # The same synthetic dataset, generated afresh by the two processes in a data_dir of their own.
    overrides = [f"--config.{k}={v}" for k, v in {
        "data.data_dir": tmp_path / "data", "total_steps": 2, "eval_every": 0}.items()]
    # The model and data sections are swapped in through a config file written for the subprocesses.
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_train import shrunk_synthetic_config\n"
        f"def get_config():\n    return shrunk_synthetic_config({str(tmp_path / 'data')!r}, total_steps=2)\n")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(REPO / "launch" / "local_multiprocess.py"), "--num_processes", "2",
           "--devices_per_process", "2", "--", f"--config={cfg_file}", f"--workdir={tmp_path / 'multi'}",
           *overrides]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # On failure show the error lines first (a crashing process's module list fills the tail).
    errors = [ln for ln in result.stderr.splitlines() if "rror" in ln or "Check failed" in ln or "imeout" in ln]
    assert result.returncode == 0, "\n".join(errors[-30:]) + "\n...\n" + result.stderr[-2000:]
    p0 = read_losses(tmp_path / "multi" / "metrics.jsonl")
    p1 = read_losses(tmp_path / "multi" / "metrics.process1.jsonl")
    ref = read_losses(single / "metrics.jsonl")
    assert sorted(p0) == sorted(p1) == [1, 2]
    for step in p0:
        assert p0[step] == p1[step]
        assert p0[step] == pytest.approx(ref[step], rel=1e-5), step


def test_workdir_check_is_safe_when_processes_share_the_workdir(tmp_path):
    """Every process of a multi-process run checks the same workdir at the same moment; with one shared
    probe file one process could delete another's probe and exit (a CI failure of the 2-process test).
    Four threads x 300 checks: the shared-name version failed dozens of times here."""
    import threading

    from hrdecoder_jax.workdir import WorkdirError, check_writable
    errors = []

    def work():
        for _ in range(300):
            try:
                check_writable(str(tmp_path))
            except WorkdirError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path) == []                      # no probe left behind


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = shrunk_synthetic_config(tmp_path / "data", total_steps=4)
    config.eval_every = 0
    config.checkpoint_every = 1
    train_and_evaluate(config, str(tmp_path / "w"), final_eval=False, stop_after=1)   # a good step 1
    config.data.mean = (float("nan"),) * 3                  # NaN images from step 2 on: a NaN loss
    with pytest.raises(FloatingPointError, match=r"at step 2; stopping.*\(step 1\)"):
        train_and_evaluate(config, str(tmp_path / "w"), final_eval=False)
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["1"]


def test_unknown_config_field_fails_at_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hrdecoder_jax.train", f"--config={REPO / 'configs' / 'tiny.py'}",
         f"--workdir={tmp_path / 'w'}", "--config.model.hr_settings.no_such_field=3"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "no_such_field" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("override", [{"grad_accum_steps": 2}, {"model.dtype": "bfloat16"}])
def test_accumulation_and_bf16_options_train(tmp_path, override):
    """Gradient accumulation (2 micro-batches) and bf16 compute run a real step with finite losses, and the
    first-step loss stays close to the plain float32 step (same weights, same data)."""
    base = shrunk_synthetic_config(tmp_path / "data", total_steps=1)
    base.eval_every = 0
    ref = train_and_evaluate(base, str(tmp_path / "ref"), final_eval=False)["train"]
    config = shrunk_synthetic_config(tmp_path / "data", total_steps=1)
    config.eval_every = 0
    for key, value in override.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    out = train_and_evaluate(config, str(tmp_path / "w"), final_eval=False)["train"]
    assert np.isfinite(out["total"]) and np.isfinite(out["grad_norm"])
    # Micro-batch BN statistics and bf16 rounding change the loss a little, not its scale.
    assert out["total"] == pytest.approx(ref["total"], rel=0.05)


def signal_running_training(cfg_file, workdir, sig, *, start_s=400, stop_s=300) -> tuple[int, str]:
    """Start ``python -m hrdecoder_jax.train`` on ``cfg_file``, send ``sig`` once step 2 is logged; returns
    the exit status and the output after the signal.

    The deadlines are real: a watchdog kills a run that has not logged step 2 after ``start_s`` seconds or
    not exited ``stop_s`` seconds after the signal (a silent hang), which ends the blocking reads, and the
    test fails saying which deadline passed."""
    proc = subprocess.Popen([sys.executable, "-m", "hrdecoder_jax.train", f"--config={cfg_file}",
                             f"--workdir={workdir}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    killed = threading.Event()

    def watchdog(seconds):
        def kill():
            killed.set()
            proc.kill()
        timer = threading.Timer(seconds, kill)
        timer.daemon = True
        timer.start()
        return timer

    timer = watchdog(start_s)
    try:
        started = False
        for line in proc.stdout:                       # wait until training runs
            if line.startswith("[train] step 2/"):
                started = True
                break
        timer.cancel()
        assert not killed.is_set(), f"training did not start within {start_s} s (killed)"
        assert started, f"training exited with status {proc.wait()} before step 2"
        proc.send_signal(sig)
        timer = watchdog(stop_s)
        rest = proc.stdout.read()
        status = proc.wait()
        timer.cancel()
        assert not killed.is_set(), f"training did not stop within {stop_s} s of the signal (killed)"
        return status, rest
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_saves_and_exits(tmp_path):
    """SIGTERM (a preemption, SLURM's warning signal) saves the current step and exits with status 143."""
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_train import shrunk_synthetic_config\n"
        "def get_config():\n"
        f"    c = shrunk_synthetic_config({str(tmp_path / 'data')!r}, total_steps=100000)\n"
        "    c.eval_every = 0\n"
        "    c.checkpoint_every = 100000\n"
        "    return c\n")
    status, rest = signal_running_training(cfg_file, tmp_path / "w", signal.SIGTERM)
    assert status == 143
    assert "[stop] received signal" in rest
    steps = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 2


def test_finished_run_reruns_and_prints_its_stored_results(trained, tmp_path, capsys):
    root, config = trained
    work = tmp_path / "run"
    shutil.copytree(root / "run", work)
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*") if p.is_file()}
    results = work / "eval_test_4"                # what evaluate writes, in the same schema
    assert sorted(p.name for p in results.iterdir()) == ["metrics.json", "per_image.csv", "pr_curves.png"]
    stored = json.loads((results / "metrics.json").read_text())
    assert stored["step"] == 4 and stored["split"] == "test" and set(stored["IoU"]) == set(LESIONS)
    again = train_and_evaluate(config, str(work))
    out = capsys.readouterr().out
    assert "already finished step 4" in out and "stored in" in out
    assert np.allclose(np.asarray(again["test"]["IoU"], float),
                       [np.nan if stored["IoU"][k] is None else stored["IoU"][k] for k in LESIONS], equal_nan=True)
    # Killed during the final evaluation: the results are missing; the re-run computes them, saves nothing.
    shutil.rmtree(results)
    train_and_evaluate(config, str(work))
    assert json.loads((results / "metrics.json").read_text())["IoU"] == stored["IoU"]
    assert {p: p.stat().st_mtime_ns for p in (work / "checkpoints").rglob("*") if p.is_file()} == before


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


def test_ctrl_c_saves_like_sigterm(tmp_path):
    cfg_file = write_config_file(tmp_path, tmp_path / "data", eval_every=0, checkpoint_every=100000,
                                 total_steps=100000)
    status, rest = signal_running_training(cfg_file, tmp_path / "w", signal.SIGINT)
    assert status == 130
    assert f"received signal {int(signal.SIGINT)}" in rest
    steps = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
    assert steps and min(steps) >= 2


def test_the_readme_same_training_command_runs_in_a_fresh_clone(tmp_path):
    """``--out runs/same`` of a fresh clone does not exist: the script makes it (and writes the dataset whole
    before naming it). ``--only report`` stops before training anything."""
    out = tmp_path / "runs" / "same"
    result = subprocess.run([sys.executable, "launch/reference/same_training.py", "--reference-python", "REF_VENV/bin/python",
                             "--out", str(out), "--only", "report"],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no report" in result.stdout
    assert len(list((out / "data" / "images" / "train").iterdir())) == 48 and not (out / "data.partial").exists()
