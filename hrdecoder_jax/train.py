"""Training: ``python -m hrdecoder_jax.train --config configs/idrid.py --workdir runs/idrid``.

The loop, top to bottom: validate the config, check and lock the workdir, open the data, build the model,
``initial_state`` (the workdir's latest intact checkpoint > ``config.resume_from`` > ``config.init_from``,
PyTorch weights or an Orbax workdir > random init), then the steps of ``train_step`` (one compiled function
for every random crop draw, the batch sharded over every device of every process), validation, Orbax
checkpoints (latest + best by validation mIoU) and finally the test evaluation.

Resumable exactly: the data order, the augmentation and the crop draws are functions of (seed, step).
SIGTERM and Ctrl-C save the current step and exit (143, 130). A NaN/Inf loss stops with the step. A finished
run is not trained again: re-running its command prints the stored test results (computing them first if
the run was stopped before its final evaluation) and exits 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
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
from hrdecoder_jax.workdir import (
    MetricsLog,
    WorkdirLock,
    check_writable,
    config_file,
    eval_dir,
    metrics_log,
    read_metrics_log,
)

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def format_train_line(done: int, total: int, values: dict[str, float], rate: float, eta_s: float) -> str:
    """The progress line: loss terms, learning rate, images/s and the time left."""
    terms = "  ".join(f"{k} {values[k]:.4f}" for k in ("total", "fuse", "hr", "lr", "seg") if k in values)
    eta_s = int(max(eta_s, 0))
    eta = f"{eta_s // 3600:d}:{eta_s % 3600 // 60:02d}:{eta_s % 60:02d}"
    return f"[train] step {done}/{total}  {terms}  lr {values['learning_rate']:.2e}  {rate:.2f} img/s  eta {eta}"


# ----------------------------------------------------------------------------------------------------
# Where training starts: the init precedence
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Start:
    """The state training starts from and where it came from (one line for the log)."""

    structure: Any
    params: dict
    rest: dict
    opt_state: Any
    step: int
    best_miou: float
    origin: str
    resumed_from: str | None = None      # the workdir whose checkpoint this run continues


def _restore_latest(model, tx, source: checkpoint.Checkpointer, say, model_config=None) -> tuple[dict, int] | None:
    """The newest intact training checkpoint of ``source`` (``Checkpointer.restore_latest``: a corrupt step is
    moved aside and the previous one tried), or None when there is none."""
    _, params, _ = split_for_training(model)
    return source.restore_latest(model_target=checkpoint.model_state(model), opt_state_target=tx.init(params),
                                 model_config=model_config, say=say)


def initial_state(model, tx, config, workdir: str, ckpt: checkpoint.Checkpointer, say=print) -> Start:
    """Apply the init precedence: the workdir's latest intact checkpoint > ``config.resume_from`` (another
    run's workdir) > ``config.init_from`` (PyTorch ``.pth``/``.npz`` or an Orbax workdir) > random init."""
    sources = [("workdir", ckpt)]
    if config.resume_from:
        src = os.path.expanduser(config.resume_from)
        if not os.path.isdir(os.path.join(src, checkpoint.LATEST_DIR)):
            raise config_utils.ConfigError(f"config.resume_from={config.resume_from}: no '{checkpoint.LATEST_DIR}' "
                                           "folder of a training run there; point it at the workdir of the run")
        sources.append(("resume_from", checkpoint.Checkpointer(src, keep_best=False)))
    for kind, source in sources:
        try:
            found = _restore_latest(model, tx, source, say, config.model)
        except checkpoint.CheckpointMismatchError as e:
            run = os.path.expanduser(workdir if kind == "workdir" else config.resume_from)
            first = config_file(run)
            changed = ""
            if "optimizer state" in str(e) and os.path.exists(first):   # the model is named already
                try:
                    with open(first) as f:
                        diff = [d for d in config_utils.changes(config_utils.flatten(json.load(f)),
                                                                config_utils.flatten(config))
                                if d.startswith("optimizer.")]
                    changed = f"; this config changes {', '.join(diff)}" if diff else ""
                except (OSError, ValueError):
                    pass
            raise checkpoint.CheckpointMismatchError(
                f"{str(e).removesuffix(checkpoint.USE_ITS_CONFIG)}{changed}; resume with the config of that run "
                f"({first} records it) or choose another --workdir") from None
        if found is None:
            if kind == "resume_from":
                raise checkpoint.CheckpointError(f"config.resume_from={config.resume_from}: no intact checkpoint")
            continue
        restored, step = found
        checkpoint.load_model_state(model, restored["model"])
        structure, params, rest = split_for_training(model)
        meta = restored["meta"]
        origin = (f"resuming from {workdir} step {step}" if kind == "workdir"
                  else f"resuming from {config.resume_from} step {step}")
        return Start(structure, params, rest, restored["opt_state"], int(meta["step"]),
                     float(meta.get("best_miou", -1.0)), origin,
                     workdir if kind == "workdir" else os.path.expanduser(config.resume_from))
    origin = "random init"
    if config.init_from:
        src = os.path.expanduser(config.init_from)
        if os.path.isdir(src):
            try:
                meta = checkpoint.restore_model(src, model, model_config=config.model)
            except checkpoint.CheckpointError as e:
                raise type(e)(f"config.init_from: {e}") from None
            origin = f"initialised from Orbax checkpoint {src} (step {meta.get('step')})"
        else:
            from hrdecoder_jax.weights import WeightImportError, load_torch_weights
            try:
                report = load_torch_weights(model, src)
            except (WeightImportError, FileNotFoundError) as e:
                raise WeightImportError(f"config.init_from: {e}") from None
            origin = f"initialised from PyTorch weights {src}: {report.summary()}"
    structure, params, rest = split_for_training(model)
    return Start(structure, params, rest, tx.init(params), 0, -1.0, origin)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


class _StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) end the run after the current step, with a checkpoint."""

    EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.EXIT:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, final_eval: bool = True,
                       stop_after: int | None = None) -> dict:
    """Train ``config`` in ``workdir``; returns the final test metrics (or the last losses).

    ``stop_after``: end this run after that many steps with a checkpoint, as a preemption would (the
    schedule still spans ``total_steps``; running again resumes). For tests and time-sliced clusters.
    """
    config_utils.validate_config(config)
    workdir = check_writable(workdir)
    lock = WorkdirLock(workdir, "train") if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(config, workdir, final_eval=final_eval, stop_after=stop_after)
    finally:
        if lock is not None:
            lock.release()


class _Run:
    """The state of one training run and what is done with it: checkpoints, validation, evaluation."""

    def __init__(self, config, workdir: str, start: Start, ckpt: checkpoint.Checkpointer, log: MetricsLog,
                 mesh, val_ds, say):
        self.config, self.workdir, self.ckpt, self.log, self.val_ds, self.say = config, workdir, ckpt, log, val_ds, say
        self.structure, self.best_miou = start.structure, start.best_miou
        self.fingerprint: str | None = None    # of the training data (data.data_fingerprint): keys a file cache
        self.params, self.rest, self.opt_state = jax.device_put((start.params, start.rest, start.opt_state),
                                                                NamedSharding(mesh, P()))

    def model(self) -> nnx.Module:
        m = merge_model(self.structure, self.params, self.rest)
        m.eval()
        return m

    def save(self, step: int, force: bool = False) -> None:
        meta = {"step": step, "best_miou": self.best_miou, **checkpoint.model_meta(self.config.model)}
        self.ckpt.save(step, model=checkpoint.model_state(self.model()), opt_state=self.opt_state, meta=meta,
                       force=force)

    def validate(self, step: int) -> None:
        from hrdecoder_jax.evaluation import evaluate
        m = self.model()
        res = evaluate(m, self.config, dataset=self.val_ds, progress=False)
        values = {k: float(res[k]) for k in ("mIoU", "mAUPR", "mF1")}
        values.update({f"IoU_{n}": float(v) for n, v in zip(("EX", "HE", "SE", "MA"), res["IoU"])})
        self.log.write(step, "val", values)
        self.say(f"[val] step {step}: mIoU {100 * values['mIoU']:.2f}  mAUPR {100 * values['mAUPR']:.2f}")
        if values["mIoU"] > self.best_miou:
            self.best_miou = values["mIoU"]
            self.ckpt.save_best(step, model=checkpoint.model_state(m),
                                meta={"step": step, "mIoU": self.best_miou, **checkpoint.model_meta(self.config.model)})

    def validated(self, step: int) -> bool:
        """Whether the metrics log holds a validation of ``step`` (a finished run's last one)."""
        return any(row.get("kind") == "val" and row.get("step") == step
                   for row in read_metrics_log(metrics_log(self.workdir)))


def _train(config, workdir: str, *, final_eval: bool, stop_after: int | None) -> dict:
    from hrdecoder_jax.data import data_fingerprint, open_split, pipeline

    is_main = jax.process_index() == 0
    say = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)
    n_dev = jax.device_count()
    if config.global_batch_size % n_dev:
        raise config_utils.ConfigError(
            f"global_batch_size={config.global_batch_size} does not divide over {n_dev} devices")
    logging.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(), n_dev,
                 jax.devices()[0].platform)
    mesh = make_mesh()

    # Data: the training split (less the held-out validation images), or the reference's test validation.
    # In a multi-process run process 0 prepares the dataset first while the others wait (all of them at once
    # raced on the same folder); a host whose data_dir is its own then prepares its copy, under the lock.
    if jax.process_count() > 1:
        if is_main:
            data_fingerprint(config.data)
        _wait_for_all("hrdecoder_jax.train:data")
    train_ds, val_ds = pipeline.split_train_val(open_split(config.data, "train"), config.data, test_ds=None)
    fingerprint = f"{data_fingerprint(config.data)} split train"    # keys a file cache (data.cache) by its data
    if config.data.validate_on == "test":
        val_ds = open_split(config.data, config.eval.split)

    # Model, optimiser, checkpoints, and where training starts.
    model = build_model(config.model, rngs=nnx.Rngs(config.seed))
    logging.info("model %s: %s parameters", config.model.type, f"{count_params(model):,}")
    tx = make_optimizer(config.optimizer, config.total_steps)
    ckpt = checkpoint.Checkpointer(workdir, keep_best=config.keep_best)
    start = initial_state(model, tx, config, workdir, ckpt, say)
    say(f"[init] {start.origin}")
    if is_main:
        _record_config(config, workdir, start.resumed_from, say)
    log = MetricsLog(workdir, jax.process_index(), jax.process_count(), say)
    run = _Run(config, workdir, start, ckpt, log, mesh, val_ds, say)
    run.fingerprint = fingerprint
    result: dict = {"train": {}, "steps": config.total_steps, "seconds": 0.0}
    try:
        if start.step >= config.total_steps:
            past = f" (past total_steps={config.total_steps})" if start.step > config.total_steps else ""
            say(f"[done] the run in {workdir} already finished step {start.step}{past}; not training again")
            if config.eval_every and not run.validated(start.step):
                run.validate(start.step)        # it was stopped between its last save and validation
        else:
            result = _loop(run, tx, mesh, train_ds, start.step, stop_after)
            if result.get("stopped"):
                return result
        ckpt.wait()
    finally:
        ckpt.wait()
        log.close()
    if final_eval:
        finished_before = start.step >= config.total_steps
        result["test"] = _final_evaluation(run, finished_before=finished_before,
                                           step=start.step if finished_before else config.total_steps)
    ckpt.close()
    return result


def _record_config(config, workdir: str, resumed_from: str | None, say) -> None:
    """``config.json`` of the run: written by the run that starts it and kept by every resume, which says
    what it changed (``[resume] changed: total_steps 300 -> 800, ...``); a run that continues another
    workdir's (``resume_from``) compares with that run's ``config.json``."""
    path = config_file(workdir)
    first = config_file(resumed_from) if resumed_from else None
    if first and os.path.exists(first):
        try:
            with open(first) as f:
                before = json.load(f)
        except (OSError, ValueError) as e:
            say(f"[resume] {first} cannot be read ({e}); not comparing the configs")
            before = None
        if before is not None:
            diff = config_utils.changes(config_utils.flatten(before), config_utils.flatten(config))
            if diff:
                say(f"[resume] changed: {', '.join(diff)}"
                    + (f" (the first config stays in {path})" if first == path else f" (since {first})"))
        if first == path:
            return
    from hrdecoder_jax.workdir import write_file
    write_file(path, config.to_json_best_effort(indent=2))


def _wait_for_all(name: str) -> None:
    """A barrier of every process that may wait as long as process 0's data preparation takes: the
    coordination service's (hours), not a device collective."""
    try:
        from jax._src.distributed import global_state
        client = global_state.client
    except (ImportError, AttributeError):   # another JAX version
        client = None
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(name, 24 * 3600 * 1000)
    else:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _final_evaluation(run: _Run, *, finished_before: bool, step: int) -> dict:
    """The test metrics of the final model (of ``step``): computed once and written as ``evaluate`` writes
    them (``reports.write_outputs`` into ``WORKDIR/eval_<split>_<step>/``); a re-run of a finished run prints
    the stored ones."""
    from hrdecoder_jax import reports
    from hrdecoder_jax.evaluation import evaluate
    from hrdecoder_jax.metrics import format_table

    config = run.config
    split = config.eval.split
    out_dir = eval_dir(run.workdir, split, step)
    path = os.path.join(out_dir, "metrics.json")
    if finished_before and os.path.exists(path):
        res = reports.read_metrics(path)
        run.say(f"\nTest metrics ({split} split, step {step}; stored in {path}):")
        run.say(format_table(res).rstrip("\n"))
        return res
    res = evaluate(run.model(), config, split=split, max_images=config.eval.max_images)
    run.say(f"\nTest metrics ({split} split, step {step}):")
    run.say(format_table(res).rstrip("\n"))
    if jax.process_index() == 0:
        scored = {"step": step, "checkpoint": None, "workdir": os.path.abspath(run.workdir),
                  "which": "the final model of training", "split": split, "dataset": config.data.name}
        reports.write_outputs(res, out_dir, scored=scored, title=f"{config.data.name} {split}, step {step}, "
                                                                 f"{res['num_images']} images")
    return res


def _loop(run: _Run, tx, mesh, train_ds, start_step: int, stop_after: int | None) -> dict:
    """The training steps from ``start_step`` to ``config.total_steps``, or to a stop (signal, ``stop_after``)."""
    from hrdecoder_jax.data import on_device, pipeline

    config, ckpt, say = run.config, run.ckpt, run.say
    data_sharding = NamedSharding(mesh, P("data"))
    # The host sends raw uint8 crops; the step normalises them and builds the labels (data.on_device).
    jit_step = jit_train_step(make_train_step(run.structure, tx, seed=config.seed,
                                              grad_accum_steps=config.grad_accum_steps,
                                              finish=on_device.make_finish(config.data)), mesh)
    batches = pipeline.make_train_dataset(
        train_ds, config.data, global_batch_size=config.global_batch_size, seed=config.seed,
        start_step=start_step, process_index=jax.process_index(), process_count=jax.process_count(), raw=True,
        fingerprint=run.fingerprint)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    last: dict = {}
    t0 = t_log = time.perf_counter()
    steps_since = 0
    step_fn = jit_step
    with _StopSignals() as stop:
        for step in range(start_step, config.total_steps):
            batch = next(batches)
            images = {k: jax.make_array_from_process_local_data(data_sharding, batch[k]) for k in ("image", "valid")}
            labels = jax.make_array_from_process_local_data(data_sharding, batch["packed"])
            if step == start_step and jax.process_count() > 1:
                # Compile first, then meet, then run: the CPU collectives (gloo) give the peers of a new context
                # only 30 s to arrive, and two processes' compile times differ by more on a busy host.
                step_fn = jit_step.lower(run.params, run.rest, run.opt_state, jnp.int32(step), images,
                                         labels).compile()
                _wait_for_all("hrdecoder_jax.train:compiled")
            run.params, run.rest, run.opt_state, metrics = step_fn(run.params, run.rest, run.opt_state,
                                                                   jnp.int32(step), images, labels)
            total, grad_norm = (float(v) for v in jax.device_get((metrics["total"], metrics["grad_norm"])))
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"loss {total}, gradient norm {grad_norm} at step {step + 1}; stopping. "
                                         f"The last good checkpoint in {run.workdir} is kept "
                                         f"(step {ckpt.latest_step()}).")
            ckpt.check_for_errors()              # a failed background save (a full disk) stops the run now
            steps_since += 1
            done = step + 1
            if done % config.log_every == 0 or done == config.total_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values["learning_rate"] = float(schedule(step))
                now = time.perf_counter()
                rate = steps_since * config.global_batch_size / (now - t_log)
                values["images_per_s"] = rate
                last = values
                run.log.write(done, "train", values)
                say(format_train_line(done, config.total_steps, values, rate,
                                      (config.total_steps - done) * config.global_batch_size / max(rate, 1e-9)))
                t_log, steps_since = now, 0
            if config.eval_every and done % config.eval_every == 0 and done < config.total_steps:
                run.validate(done)
            if done % config.checkpoint_every == 0 or done == config.total_steps:
                run.save(done)
            if stop_after is not None and done - start_step >= stop_after and done < config.total_steps:
                run.save(done, force=True)
                ckpt.wait()
                return {"train": last, "steps": done, "stopped": True}
            if stop.received is not None:
                logging.warning("signal %s: saving step %d and exiting", stop.received, done)
                run.save(done, force=True)
                ckpt.wait()
                say(f"[stop] received signal {stop.received}; saved step {done}")
                raise SystemExit(_StopSignals.EXIT[stop.received])
    if config.eval_every:
        run.validate(config.total_steps)
    return {"train": last, "steps": config.total_steps, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def define_flags(fv) -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the resolved config.", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                        "(SLURM is detected automatically).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).", flag_values=fv)
    flags.DEFINE_integer("num_cpu_devices", None, "Fake CPU devices per process (testing sharding on a CPU).",
                         flag_values=fv)


def run(fv) -> int:
    if fv.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", fv.num_cpu_devices)
    if fv.coordinator_address or (fv.num_processes or 1) > 1:
        jax.distributed.initialize(coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
                                   process_id=fv.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()   # coordinator, process count and id from the SLURM environment
    if jax.process_count() > 1:
        # Set up the collectives while every process stands right behind initialize(): the CPU (gloo)
        # context waits only 30 s for peers, and later barriers can come minutes apart on a busy host.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("hrdecoder_jax.train:start")
    logging.info("JAX %s, process %d of %d, local devices %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_devices())
    train_and_evaluate(fv.config, fv.workdir)
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.train`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    return cli.main("train", __doc__, define_flags, run, argv, purpose="train")


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.train")
