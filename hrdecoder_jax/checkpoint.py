"""All Orbax code: training checkpoints (latest + best), model-only checkpoints, and restoring them.

Layout of a workdir::

    checkpoints/<step>/{model,opt_state,meta}   the latest training states (periodic, async)
    best/<step>/{model,meta}                    the best model by validation mIoU
    (convert writes checkpoints/0/{model,meta}: a model-only checkpoint)

``model`` is the pure dict of the model's parameters and BN statistics (``nnx.to_pure_dict``), so a
checkpoint restores onto any device count: leaves are restored into abstract targets that carry the
current sharding. Two managers instead of one with ``best_fn``: Orbax's ``max_to_keep`` with a
``best_fn`` keeps the N best and can delete the latest, which a resume needs.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (the message names the directory and what is wrong)."""


def model_state(model: nnx.Module) -> dict:
    """Parameters and BN statistics of ``model`` as a pure nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))


def load_model_state(model: nnx.Module, pure: Mapping[str, Any]) -> None:
    """Write a pure dict (as ``model_state`` returns) into ``model`` in place."""
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _manager(directory: str, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
    """Latest and best checkpoints of a training run in ``workdir``."""

    def __init__(self, workdir: str, *, keep_latest: int = 2, keep_best: bool = True, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.latest = _manager(os.path.join(self.workdir, LATEST_DIR), keep_latest, async_save)
        self.best = _manager(os.path.join(self.workdir, BEST_DIR), 1, async_save) if keep_best else None

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, *, model: Mapping, opt_state: Any, meta: dict, force: bool = False) -> bool:
        """Save a training state (async). ``meta`` is JSON (step, config digest, data position...).
        A step already saved is not written again (a periodic save followed by a stop at the same step)."""
        if step == self.latest.latest_step():
            return False
        args = {"model": ocp.args.StandardSave(model), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardSave(opt_state)
        return self.latest.save(step, args=ocp.args.Composite(**args), force=force)

    def save_best(self, step: int, *, model: Mapping, meta: dict) -> None:
        if self.best is not None:
            self.best.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, *, model_target: Mapping, opt_state_target: Any | None) -> dict:
        """Restore ``step`` into targets that carry the wanted shapes, dtypes and shardings."""
        args = {"model": ocp.args.StandardRestore(_abstract(model_target)), "meta": ocp.args.JsonRestore()}
        if opt_state_target is not None:
            args["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_target))
        return self.latest.restore(step, args=ocp.args.Composite(**args))

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()


def save_model(workdir: str, model: nnx.Module, *, config=None, source: str = "", step: int = 0) -> str:
    """Write a model-only checkpoint (as ``convert`` does) to ``workdir/checkpoints/<step>``; returns its path."""
    meta = {"step": step, "source": source, "kind": "model"}
    if config is not None:
        meta["model_config"] = config.model.to_dict() if hasattr(config, "model") else dict(config)
    mgr = _manager(os.path.join(workdir, LATEST_DIR), max_to_keep=None, async_save=False)
    mgr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model_state(model)),
                                           meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return os.path.join(os.path.abspath(workdir), LATEST_DIR, str(step))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def find_checkpoint(path: str, which: str | int = "latest") -> tuple[str, int]:
    """Resolve ``path`` (a workdir, a ``checkpoints``/``best`` directory) and ``which`` ('latest', 'best'
    or a step) to ``(manager directory, step)``."""
    path = os.path.abspath(os.path.expanduser(path))
    if which == "best":
        candidates = [os.path.join(path, BEST_DIR), path]
    else:
        candidates = [os.path.join(path, LATEST_DIR), path, os.path.join(path, BEST_DIR)]
    for directory in candidates:
        if not os.path.isdir(directory):
            continue
        steps = ocp.utils.checkpoint_steps(directory) if hasattr(ocp.utils, "checkpoint_steps") else None
        if steps is None:
            steps = [int(n) for n in os.listdir(directory) if n.isdigit()
                     and os.path.isdir(os.path.join(directory, n, "model"))]
        if not steps:
            continue
        if which in ("latest", "best"):
            return directory, max(steps)
        step = int(which)
        if step in steps:
            return directory, step
        raise CheckpointError(f"{directory}: no checkpoint for step {step} (have {sorted(steps)})")
    raise CheckpointError(f"{path}: no Orbax checkpoint found (looked for {', '.join(candidates)}); "
                          "train first or run `python -m hrdecoder_jax.convert`")


def restore_model(path: str, model: nnx.Module, which: str | int = "latest") -> dict:
    """Fill ``model`` from the checkpoint at ``path`` (see ``find_checkpoint``); returns its ``meta``.

    A checkpoint of another architecture fails with one line naming the directory and the first
    mismatching parameter.
    """
    directory, step = find_checkpoint(path, which)
    target = model_state(model)
    mgr = ocp.CheckpointManager(directory)
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}/{step}: does not fit this model ({_first_line(e)}); "
                              "was it written for another config?") from None
    finally:
        mgr.close()
    load_model_state(model, restored["model"])
    return dict(restored["meta"] or {}, step=step)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
