"""All Orbax code: training checkpoints (latest + best), model-only checkpoints, and restoring them.

Layout of a workdir::

    checkpoints/<step>/{model,opt_state,meta}   the latest training states (periodic, async)
    best/<step>/{model,meta}                    the best model by validation mIoU
    (convert writes checkpoints/0/{model,meta}: a model-only checkpoint)

``model`` is the pure dict of the model's parameters and BN statistics (``nnx.to_pure_dict``), so a
checkpoint restores onto any device count: leaves are restored into abstract targets that carry the
current sharding. Two managers instead of one with ``best_fn``: Orbax's ``max_to_keep`` with a
``best_fn`` keeps the N best and can delete the latest, which a resume needs.

Verified: every save writes ``digests`` (a BLAKE2b digest of every array of ``model`` and ``opt_state``,
with its dtype and shape) beside the arrays, and every restore recomputes them: a file changed on disk
fails with ``CheckpointCorruptError`` naming the step and the tensor (Orbax writes atomically but does
not verify what it reads; TensorStore read errors are reported the same way). Training falls back to the
previous intact step; ``evaluate`` and ``predict`` refuse.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (the message names the directory and what is wrong)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files changed since they were written (or cannot be read back)."""


def digests(tree) -> dict[str, str]:
    """``{path: digest}`` of every array leaf of ``tree`` (its bytes, dtype and shape)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(leaf))
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def verify(restored: Mapping, where: str) -> None:
    """Compare ``restored['model']`` (and ``opt_state``) with ``restored['digests']``; raises
    ``CheckpointCorruptError`` naming the first tensor that differs."""
    saved = restored.get("digests")
    if not saved:
        return                                       # written before digests existed
    for item in ("model", "opt_state"):
        if item not in restored or item not in saved:
            continue
        now = digests(restored[item])
        for path, digest in saved[item].items():
            if now.get(path) != digest:
                raise CheckpointCorruptError(f"{where}: tensor {item}{path} does not match the digest saved with "
                                             "it (the checkpoint files changed on disk)")


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


def _ensure_space(directory: str, step: int, tree: Any) -> None:
    """Refuse a save that cannot fit before it starts. A background save that runs out of space fails
    too (``check_for_errors``), but its threads then print hundreds of tracebacks; this check catches the
    common case, a disk that is already too full, with one line. Needed: twice the arrays' bytes (Orbax
    writes a temporary step before renaming it, and the step it replaces stays until then) plus 1 MiB."""
    need = 2 * sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree)) + 2**20
    where = directory if os.path.isdir(directory) else os.path.dirname(directory)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return                                   # not knowable here: let the save itself report
    if free < need:
        raise CheckpointError(f"disk full: saving step {step} into {directory} needs about {need / 2**20:.1f} MiB, "
                              f"{free / 2**20:.1f} MiB free; free space or choose another --workdir")


class Checkpointer:
    """Latest and best checkpoints of a training run in ``workdir``."""

    def __init__(self, workdir: str, *, keep_latest: int = 2, keep_best: bool = True, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self._options = (keep_latest, keep_best, async_save)
        self.save_failed = False     # set by check_for_errors: a background save failed
        self.latest = _manager(os.path.join(self.workdir, LATEST_DIR), keep_latest, async_save)
        self.best = _manager(os.path.join(self.workdir, BEST_DIR), 1, async_save) if keep_best else None

    def reload(self) -> None:
        """Read the folders again (after a corrupt step was moved away)."""
        self.close()
        self.__init__(self.workdir, keep_latest=self._options[0], keep_best=self._options[1],
                      async_save=self._options[2])

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, *, model: Mapping, opt_state: Any, meta: dict, force: bool = False) -> bool:
        """Save a training state (async). ``meta`` is JSON (step, config digest, data position...).
        A step already saved is not written again (a periodic save followed by a stop at the same step)."""
        if step in self.latest.all_steps():
            return False
        self.check_for_errors()
        _ensure_space(os.path.join(self.workdir, LATEST_DIR), step, (model, opt_state))
        return self.latest.save(step, args=_save_args(model, meta, opt_state), force=force)

    def save_best(self, step: int, *, model: Mapping, meta: dict) -> None:
        """Keep ``model`` as the best; a step already kept is not written again (a re-run of a finished run)."""
        if self.best is not None and step not in self.best.all_steps():
            self.check_for_errors()
            _ensure_space(os.path.join(self.workdir, BEST_DIR), step, model)
            self.best.save(step, args=_save_args(model, meta), force=True)

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.latest_step()

    def restore(self, step: int, *, model_target: Mapping, opt_state_target: Any | None) -> dict:
        """Restore and verify ``step`` into targets that carry the wanted shapes, dtypes and shardings;
        raises ``CheckpointCorruptError`` for files that changed on disk or cannot be read."""
        return _restore(self.latest, os.path.join(self.workdir, LATEST_DIR), step, model_target, opt_state_target)

    def steps(self) -> list[int]:
        """The kept training steps, newest first."""
        return sorted(self.latest.all_steps(), reverse=True)

    def check_for_errors(self) -> None:
        """Raise the error of a failed background save now (e.g. a full disk), not one save later. After
        a failed save ``wait`` returns at once: waiting on the failed save's threads only multiplies
        their errors (hundreds of tracebacks), and nothing more can be written anyway."""
        for manager in (self.latest, self.best):
            if manager is not None:
                try:
                    manager.check_for_errors()
                except BaseException:
                    self.save_failed = True
                    raise


    def wait(self) -> None:
        if self.save_failed:
            return
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()


def _save_args(model: Mapping, meta: dict, opt_state: Any | None = None) -> ocp.args.Composite:
    args = {"model": ocp.args.StandardSave(model), "meta": ocp.args.JsonSave(meta)}
    sums = {"model": digests(model)}
    if opt_state is not None:
        args["opt_state"] = ocp.args.StandardSave(opt_state)
        sums["opt_state"] = digests(opt_state)
    args["digests"] = ocp.args.JsonSave(sums)
    return ocp.args.Composite(**args)


def _restore(mgr: ocp.CheckpointManager, directory: str, step: int, model_target: Mapping,
             opt_state_target: Any | None = None) -> dict:
    where = f"{directory}/{step}"
    args = {"model": ocp.args.StandardRestore(_abstract(model_target)), "meta": ocp.args.JsonRestore()}
    if opt_state_target is not None:
        args["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_target))
    if os.path.isdir(os.path.join(directory, str(step), "digests")):
        args["digests"] = ocp.args.JsonRestore()
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
        text = _first_line(e)
        if any(w in text.lower() for w in ("corrupt", "data_loss", "checksum", "decod", "invalid", "truncat",
                                           "unexpected end", "failed to read", "error reading")):
            raise CheckpointCorruptError(f"{where}: cannot be read ({text})") from None
        raise CheckpointError(f"{where}: does not fit this model ({text}); was it written for another "
                              "config?") from None
    except FileNotFoundError as e:
        raise CheckpointCorruptError(f"{where}: a file is missing ({e.filename or _first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - TensorStore/Orbax raise many kinds for unreadable files
        raise CheckpointCorruptError(f"{where}: cannot be read, a data file is missing or damaged "
                                     f"({_first_line(e)})") from None
    verify(restored, where)
    return restored


def save_model(workdir: str, model: nnx.Module, *, config=None, source: str = "", step: int = 0) -> str:
    """Write a model-only checkpoint (as ``convert`` does) to ``workdir/checkpoints/<step>``; returns its path."""
    meta = {"step": step, "source": source, "kind": "model"}
    if config is not None:
        meta["model_config"] = config.model.to_dict() if hasattr(config, "model") else dict(config)
    mgr = _manager(os.path.join(workdir, LATEST_DIR), max_to_keep=None, async_save=False)
    if step in mgr.all_steps():
        mgr.close()
        raise CheckpointError(f"{os.path.join(os.path.abspath(workdir), LATEST_DIR, str(step))} already exists; "
                              "choose another --workdir (or delete it) to convert again")
    mgr.save(step, args=_save_args(model_state(model), _jsonable(meta)), force=True)
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
    """Fill ``model`` from the checkpoint at ``path`` (see ``find_checkpoint``) after verifying it; returns
    its ``meta``. A checkpoint of another architecture fails with one line naming the directory and the
    first mismatching parameter; a corrupt one with ``CheckpointCorruptError``."""
    directory, step = find_checkpoint(path, which)
    mgr = ocp.CheckpointManager(directory)
    try:
        restored = _restore(mgr, directory, step, model_state(model))
    finally:
        mgr.close()
    load_model_state(model, restored["model"])
    return dict(restored["meta"] or {}, step=step)


def restore_for_inference(config, workdir: str, which: str | int = "latest"):
    """A model of ``config.model`` filled from the checkpoint in ``workdir``, in eval mode, and its meta.

    The model is built abstractly (``nnx.eval_shape``: shapes only, no random initialisation, which takes
    ~20 s of eager CPU work even for the tiny config) and every variable then comes from the checkpoint;
    if anything stays unfilled, it falls back to a normal build.
    """
    from hrdecoder_jax.models import build_model

    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    meta = restore_model(workdir, model, which)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))):
        model = build_model(config.model, rngs=nnx.Rngs(0))
        meta = restore_model(workdir, model, which)
    model.eval()
    return model, meta


def _first_line(e: Exception) -> str:
    """The first line of an error, without TensorStore's object dump ('See full TensorStore details')."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    line = line.split(" See full TensorStore details")[0].rstrip(" .")
    return line[:300]
