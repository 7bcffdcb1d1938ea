"""Training: ``python -m hrdecoder_jax.train --config configs/idrid.py --workdir runs/idrid``.

One jitted ``train_step`` for every random HR-crop draw (boxes drawn in-graph from ``fold_in(seed, step)``),
the batch sharded over a ``data`` mesh axis spanning every device of every process (BN statistics are
global: the reference's SyncBN), parameters and optimiser state replicated and donated. Orbax checkpoints
(latest + best by validation mIoU), resumable exactly: the data order and augmentation are functions of
(seed, step), the crop draws of (seed, step). SIGTERM saves and exits; a NaN/Inf loss stops with the step.

Init precedence: the workdir's latest checkpoint > ``config.resume_from`` > ``config.init_from`` (PyTorch
``.pth``/``.npz`` through ``convert``, or an Orbax workdir) > random init.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hrdecoder_jax import checkpoint, config_utils
from hrdecoder_jax.models import build_model, count_params
from hrdecoder_jax.optim import learning_rate_schedule, make_optimizer
from hrdecoder_jax.train_step import jit_train_step, make_mesh, make_train_step, merge_model, split_for_training

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _now() -> float:
    return time.perf_counter()


class MetricsLog:
    """JSON-lines metrics file plus TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled and jax.process_count() > 1:
            # Other processes keep a private log of the (replicated) values, so runs can be compared.
            self.file = open(os.path.join(workdir, f"metrics.process{jax.process_index()}.jsonl"), "a")
        if enabled:
            self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from clu import metric_writers
                self.writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                                   asynchronous=True)
            except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience; the JSON log is the record
                logging.warning("TensorBoard writer unavailable (%s); metrics.jsonl only", e)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
            self.file.flush()
        if self.writer is not None:
            self.writer.write_scalars(step, {f"{kind}/{k}": v for k, v in values.items()
                                             if isinstance(v, (int, float)) and math.isfinite(v)})

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _check_workdir(workdir: str) -> None:
    """Fail at once, in one line, when ``workdir`` cannot be written. Every process of a multi-process run
    probes with a file of its own: a shared name let one process delete another's probe mid-check."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test.", delete=True) as f:
            f.write(b"ok")
    except OSError as e:
        raise SystemExit(f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir") from None


def _initialise(model, config, workdir: str, ckpt: checkpoint.Checkpointer) -> tuple[str, Any]:
    """Apply the init precedence; returns (what was done, restored checkpoint dict or None)."""
    if ckpt.latest_step() is not None:
        return f"resuming from {workdir} step {ckpt.latest_step()}", "latest"
    if config.resume_from:
        if not os.path.isdir(os.path.join(os.path.expanduser(config.resume_from), checkpoint.LATEST_DIR)):
            raise SystemExit(f"config.resume_from={config.resume_from}: no '{checkpoint.LATEST_DIR}' folder of a "
                             "training run there; point it at the workdir of the run to continue")
        return f"resuming from {config.resume_from}", "resume_from"
    if config.init_from:
        src = os.path.expanduser(config.init_from)
        if os.path.isdir(src):
            try:
                meta = checkpoint.restore_model(src, model)
            except checkpoint.CheckpointError as e:
                raise SystemExit(f"config.init_from: {e}") from None
            return f"initialised from Orbax checkpoint {src} (step {meta.get('step')})", None
        from hrdecoder_jax.convert import WeightImportError, load_torch_weights
        try:
            report = load_torch_weights(model, src)
        except (WeightImportError, FileNotFoundError) as e:
            raise SystemExit(f"config.init_from: {e}") from None
        logging.info("init_from %s: %s", src, report.summary())
        return f"initialised from PyTorch weights {src}: {report.summary()}", None
    return "random init", None


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, final_eval: bool = True,
                       stop_after: int | None = None) -> dict:
    """Train ``config`` in ``workdir``; returns the final test metrics (or the last losses).

    ``stop_after``: end this run after that many steps with a checkpoint, as a preemption would (the
    schedule still spans ``total_steps``; running again resumes). For tests and time-sliced clusters.
    """
    from hrdecoder_jax import evaluate as evaluation
    from hrdecoder_jax.data import pipeline

    config_utils.validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    _check_workdir(workdir)
    is_main = jax.process_index() == 0
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if config.global_batch_size % n_dev:
        raise config_utils.ConfigError(
            f"global_batch_size={config.global_batch_size} does not divide over {n_dev} devices")
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info("process %d/%d, %d devices (%s)", jax.process_index(), n_proc, n_dev, jax.devices()[0].platform)

    mesh = make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    # Data: train/val split of the training split (or the reference's validation on test).
    try:
        train_ds = evaluation.open_split(config.data, "train")
    except Exception as e:  # noqa: BLE001 - dataset errors already name the folder; say what to do
        raise SystemExit(f"cannot open the training data of '{config.data.name}': {e}\n"
                         "Set --config.data.manual_dir to the downloaded dataset (see README, Datasets).") from None
    train_ds, val_ds = pipeline.split_train_val(train_ds, config.data, test_ds=None)
    if config.data.validate_on == "test":
        val_ds = evaluation.open_split(config.data, config.eval.split)

    # Model, optimiser, checkpoints.
    model = build_model(config.model, rngs=nnx.Rngs(config.seed))
    logging.info("model %s: %s parameters", config.model.type, f"{count_params(model):,}")
    tx = make_optimizer(config.optimizer, config.total_steps)
    ckpt = checkpoint.Checkpointer(workdir, keep_best=config.keep_best)
    how, restore_kind = _initialise(model, config, workdir, ckpt)
    structure, params, rest = split_for_training(model)
    opt_state = tx.init(params)
    start_step, best_miou = 0, -1.0
    if restore_kind is not None:
        source = ckpt if restore_kind == "latest" else checkpoint.Checkpointer(
            os.path.expanduser(config.resume_from), keep_best=False)
        step = source.latest_step()
        if step is None:
            raise SystemExit(f"config.resume_from={config.resume_from}: no checkpoint there")
        try:
            restored = source.restore(step, model_target=checkpoint.model_state(model), opt_state_target=opt_state)
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"cannot resume from {source.workdir} step {step}: {checkpoint._first_line(e)} "
                             "(a checkpoint of another architecture?)") from None
        checkpoint.load_model_state(model, restored["model"])
        structure, params, rest = split_for_training(model)
        opt_state = restored["opt_state"]
        start_step = int(restored["meta"]["step"])
        best_miou = float(restored["meta"].get("best_miou", -1.0))
    logging.info("%s", how)
    if is_main:
        print(f"[init] {how}", flush=True)

    params, rest, opt_state = jax.device_put((params, rest, opt_state), replicated)
    step_fn = make_train_step(structure, tx, seed=config.seed, grad_accum_steps=config.grad_accum_steps)
    jit_step = jit_train_step(step_fn, mesh)

    batches = pipeline.make_train_dataset(
        train_ds, config.data, global_batch_size=config.global_batch_size, seed=config.seed,
        start_step=start_step, process_index=jax.process_index(), process_count=n_proc)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_signal) if threading_is_main() else None
    log = MetricsLog(workdir, is_main)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    label_key = "masks" if config.data.label_mode == "multilabel" else "label"

    def current_model():
        return merge_model(structure, params, rest)

    def save(step: int, force: bool = False):
        meta = {"step": step, "best_miou": best_miou, "model_type": config.model.type}
        ckpt.save(step, model=checkpoint.model_state(current_model()), opt_state=opt_state, meta=meta, force=force)

    def validate(step: int):
        nonlocal best_miou
        m = current_model()
        m.eval()
        res = evaluation.evaluate(m, config, dataset=val_ds, progress=False)
        values = {k: float(res[k]) for k in ("mIoU", "mAUPR", "mF1")}
        values.update({f"IoU_{n}": float(v) for n, v in zip(("EX", "HE", "SE", "MA"), res["IoU"])})
        log.write(step, "val", values)
        if is_main:
            print(f"[val] step {step}: mIoU {100 * values['mIoU']:.2f}  mAUPR {100 * values['mAUPR']:.2f}", flush=True)
        if values["mIoU"] > best_miou:
            best_miou = values["mIoU"]
            ckpt.save_best(step, model=checkpoint.model_state(m),
                           meta={"step": step, "mIoU": best_miou, "model_type": config.model.type})

    last = {}
    t0, t_log, steps_since = _now(), _now(), 0
    step = start_step
    try:
        for step in range(start_step, config.total_steps):
            batch = next(batches)
            images = jax.make_array_from_process_local_data(data_sharding, batch["image"])
            labels = jax.make_array_from_process_local_data(data_sharding, batch[label_key])
            params, rest, opt_state, metrics = jit_step(params, rest, opt_state, jnp.int32(step), images, labels)
            total, grad_norm = (float(v) for v in jax.device_get((metrics["total"], metrics["grad_norm"])))
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"loss {total}, gradient norm {grad_norm} at step {step + 1}; stopping. "
                                         f"The last good checkpoint in {workdir} is kept "
                                         f"(step {ckpt.latest_step()}).")
            steps_since += 1
            done = step + 1
            if done % config.log_every == 0 or done == config.total_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values["learning_rate"] = float(schedule(step))
                now = _now()
                rate = steps_since * config.global_batch_size / (now - t_log)
                values["images_per_s"] = rate
                eta = (config.total_steps - done) * config.global_batch_size / max(rate, 1e-9)
                last = values
                log.write(done, "train", values)
                if is_main:
                    terms = "  ".join(f"{k} {values[k]:.4f}" for k in ("total", "fuse", "hr", "lr", "seg")
                                      if k in values)
                    print(f"[train] step {done}/{config.total_steps}  {terms}  lr {values['learning_rate']:.2e}  "
                          f"{rate:.2f} img/s  eta {_format_eta(eta)}", flush=True)
                t_log, steps_since = now, 0
            if config.eval_every and done % config.eval_every == 0 and done < config.total_steps:
                validate(done)
            if done % config.checkpoint_every == 0 or done == config.total_steps:
                save(done)
            if stop_after is not None and done - start_step >= stop_after and done < config.total_steps:
                save(done, force=True)
                ckpt.wait()
                ckpt.close()
                return {"train": last, "steps": done, "stopped": True}
            if stop["signal"] is not None:
                logging.warning("signal %s: saving step %d and exiting", stop["signal"], done)
                save(done, force=True)
                ckpt.wait()
                if is_main:
                    print(f"[stop] received signal {stop['signal']}; saved step {done}", flush=True)
                raise SystemExit(143)
        if config.eval_every:
            validate(config.total_steps)
        ckpt.wait()
    finally:
        ckpt.wait()
        log.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    result = {"train": last, "steps": config.total_steps, "seconds": _now() - t0}
    if final_eval:
        m = current_model()
        m.eval()
        res = evaluation.evaluate(m, config, split=config.eval.split, max_images=config.eval.max_images)
        if is_main:
            from hrdecoder_jax.metrics import format_table
            print(f"\nTest metrics ({config.eval.split} split, step {config.total_steps}):")
            print(format_table(res), flush=True)
            with open(os.path.join(workdir, f"metrics_{config.eval.split}.json"), "w") as f:
                json.dump(evaluation.jsonable(res), f, indent=2)
        result["test"] = res
    ckpt.close()
    return result


def threading_is_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the resolved config.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                        "(SLURM is detected automatically).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
    flags.DEFINE_integer("num_cpu_devices", None, "Fake CPU devices per process (testing sharding on a CPU).")
    flags.mark_flags_as_required(["config", "workdir"])
    FLAGS = flags.FLAGS

    def run(_):
        if not FLAGS["verbosity"].present:   # Orbax logs every save at INFO; our progress lines are printed
            logging.set_verbosity(logging.WARNING)
        # TensorFlow (tf.data) must never take GPU memory.
        import tensorflow as tf
        tf.config.set_visible_devices([], "GPU")
        if FLAGS.num_cpu_devices:
            jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
        if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
        elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            jax.distributed.initialize()   # coordinator, process count and id from the SLURM environment
        if jax.process_count() > 1:
            # Set up the collectives while every process stands right behind initialize(): the CPU (gloo)
            # context waits only 30 s for peers, and later barriers can come minutes apart on a busy host.
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("hrdecoder_jax.train:start")
        logging.info("JAX %s, process %d of %d, local devices %s", jax.__version__, jax.process_index(),
                     jax.process_count(), jax.local_devices())
        try:
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except (config_utils.ConfigError, FloatingPointError) as e:
            raise SystemExit(f"error: {e}") from None

    app.run(run, argv=argv)


if __name__ == "__main__":
    main(sys.argv)
