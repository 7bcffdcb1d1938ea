"""All Orbax code: training checkpoints (latest + best), model-only checkpoints, and restoring them.

Where they lie in a workdir (``workdir`` owns the layout)::

    checkpoints/<step>/{model,opt_state,meta,digests}   the latest training states (periodic, async)
    best/<step>/{model,meta,digests}                    the best model by validation mIoU
    corrupt/<step>/                                     training steps that failed verification (``quarantine``)
    (convert writes checkpoints/0/{model,meta,digests}: a model-only checkpoint)

``model`` is the pure dict of the model's parameters and BN statistics (``nnx.to_pure_dict``), so a
checkpoint restores onto any device count: leaves are restored into abstract targets that carry the
current sharding. Two managers instead of one with ``best_fn``: Orbax's ``max_to_keep`` with a
``best_fn`` keeps the N best and can delete the latest, which a resume needs.

Verified, in this order, by every restore:

1. what it holds: ``meta`` records the model's type, the settings that define it and their digest
   (``model_meta``; ``config_utils.model_identity``); a checkpoint of another model type or config is
   refused (``CheckpointMismatchError``, naming the fields that differ), even where the shapes would fit;
2. its shapes: the stored arrays' metadata against the target's (the optimizer state's too), before any
   array is read: a mismatch names the parameter and both shapes (``CheckpointMismatchError``);
3. its bytes: every save writes ``digests`` (a BLAKE2b digest of every array of ``model`` and
   ``opt_state``, with its dtype and shape) beside the arrays, and every restore recomputes them: a file
   changed on disk, or one that cannot be read, fails with ``CheckpointCorruptError`` naming the step and
   the tensor (Orbax writes atomically but does not verify what it reads).

Only 3 is corruption: ``Checkpointer.restore_latest`` (training's resume) moves such a step to ``corrupt/``
(``quarantine``) and falls back to the previous one (never the last one left); a mismatch moves nothing. ``evaluate`` and ``predict`` refuse both.
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

from hrdecoder_jax import config_utils
from hrdecoder_jax.errors import ExpectedError
from hrdecoder_jax.workdir import BEST_DIR, CORRUPT_DIR, LATEST_DIR


class CheckpointError(ExpectedError, ValueError):
    """A checkpoint that cannot be used (the message names the directory and what is wrong)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files changed since they were written (or cannot be read back)."""


USE_ITS_CONFIG = "; use the config it was written with"


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint that does not fit what it is restored into: another model type or config, other
    parameter shapes, another optimizer's state. Never a reason to move the checkpoint aside."""


def model_meta(model_config) -> dict:
    """What every checkpoint's ``meta`` records of the model it holds: ``model_type``, ``model_config`` (the
    settings that define it, ``config_utils.model_identity``) and ``model_digest``."""
    return {"model_type": config_utils.field(model_config, "type"),
            "model_config": config_utils.model_identity(model_config),
            "model_digest": config_utils.model_digest(model_config)}


def model_kind(model: nnx.Module) -> str:
    """The ``model.type`` a built model is (``HRDecoder``, ``EfficientHRDecoder`` or ``FCN``)."""
    if type(model).__name__ == "FCNSegmentor":
        return "FCN"
    return "EfficientHRDecoder" if getattr(model, "multiscale_compressor", None) is not None else "HRDecoder"


def check_model(meta: Mapping | None, model_config, where: str) -> None:
    """Refuse (``CheckpointMismatchError``) a checkpoint whose ``meta`` records another model than
    ``model_config`` defines: another ``model.type``, or other defining settings (named, checkpoint -> this
    config). ``model_config`` may be just the type (a string). Checkpoints written before these records
    existed are checked as far as they go."""
    if model_config is None or not meta:
        return
    stored = meta.get("model_config")
    stored = config_utils.model_identity(stored) if isinstance(stored, Mapping) and stored else None
    have = meta.get("model_type") or (stored or {}).get("model.type")
    want = model_config if isinstance(model_config, str) else config_utils.field(model_config, "type")
    if have and have != want:
        raise CheckpointMismatchError(f"{where} holds a {have} model, but this config builds a {want} "
                                      "(model.type)" + USE_ITS_CONFIG)
    if isinstance(model_config, str):          # only the type is known (a model built without its config)
        return
    if meta.get("model_digest") == config_utils.model_digest(model_config):
        return
    if stored is not None:
        diff = config_utils.changes(stored, config_utils.model_identity(model_config))
        if diff:
            shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise CheckpointMismatchError(f"{where} was written for another model config ({shown}; checkpoint -> "
                                          "this config)" + USE_ITS_CONFIG)
    elif meta.get("model_digest"):
        raise CheckpointMismatchError(f"{where} was written for another model config (model digest "
                                      f"{meta['model_digest']}, this config's {config_utils.model_digest(model_config)})"
                                      + USE_ITS_CONFIG)


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
        """Read the folders again (after a step was moved away)."""
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

    def restore(self, step: int, *, model_target: Mapping, opt_state_target: Any | None,
                model_config=None) -> dict:
        """Restore and verify ``step`` into targets that carry the wanted shapes, dtypes and shardings;
        raises ``CheckpointMismatchError`` for a checkpoint of another model (``model_config``), shapes or
        optimizer, ``CheckpointCorruptError`` for files that changed on disk or cannot be read."""
        return _restore(self.latest, os.path.join(self.workdir, LATEST_DIR), step, model_target, opt_state_target,
                        model_config=model_config)

    def steps(self) -> list[int]:
        """The kept training steps, newest first."""
        return sorted(self.latest.all_steps(), reverse=True)

    def restore_latest(self, *, model_target: Mapping, opt_state_target: Any, model_config=None,
                       say=print) -> tuple[dict, int] | None:
        """The newest intact training step, restored (``restore``) as ``(restored, step)``, or None when there
        is none. A corrupt step (a digest that differs, a file that cannot be read) is moved aside
        (``quarantine``) with a notice and the previous one tried, but never the last one left: that one
        raises, and stays where it is for the next attempt. A step that does not fit
        (``CheckpointMismatchError``) raises and moves nothing."""
        steps = self.steps()
        for i, step in enumerate(steps):
            try:
                return self.restore(step, model_target=model_target, opt_state_target=opt_state_target,
                                    model_config=model_config), step
            except CheckpointCorruptError as e:
                if i == len(steps) - 1:
                    raise CheckpointCorruptError(
                        f"{e}; it is the last checkpoint left, so it stays where it is and nothing is trained: "
                        f"restore its files, or move {self.workdir} away to start again") from None
                say(f"[resume] {e}; falling back to the previous checkpoint")
                moved = self.quarantine(step)
                if moved:
                    say(f"[resume] moved the corrupt step to {moved}")
        return None

    def quarantine(self, step: int) -> str | None:
        """Move the training step ``step`` to ``WORKDIR/corrupt/<step>`` (process 0 only: the processes of a
        run share the workdir) and read the folders again; returns where it went (None elsewhere)."""
        moved = None
        if jax.process_index() == 0:
            moved = os.path.join(self.workdir, CORRUPT_DIR, str(step))
            os.makedirs(os.path.dirname(moved), exist_ok=True)
            shutil.move(os.path.join(self.workdir, LATEST_DIR, str(step)), moved)
        self.reload()
        return moved

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
             opt_state_target: Any | None = None, *, model_config=None) -> dict:
    """Restore ``step`` after checking what it holds (``check_model``) and its shapes (``_check_shapes``),
    then verify its bytes (``verify``). Only an unreadable file or a digest that differs is corruption."""
    where = f"{directory}/{step}"
    meta = _read_json(mgr, step, "meta", where)
    check_model(meta, model_config, where)
    step_dir = os.path.join(directory, str(step))
    _check_shapes(os.path.join(step_dir, "model"), model_target, where, "parameter")
    args = {"model": ocp.args.StandardRestore(_abstract(model_target)), "meta": ocp.args.JsonRestore()}
    if opt_state_target is not None:
        _check_shapes(os.path.join(step_dir, "opt_state"), opt_state_target, where, "optimizer state")
        args["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_target))
    if os.path.isdir(os.path.join(step_dir, "digests")):
        args["digests"] = ocp.args.JsonRestore()
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - TensorStore/Orbax raise many kinds for unreadable files
        raise _read_error(e, where) from None
    verify(restored, where)
    return restored


# Signs of a file that cannot be read back (the what and the shapes were checked before the arrays are read).
_READ_FAILURES = ("corrupt", "data_loss", "checksum", "decod", "invalid", "unexpected end", "failed to read",
                  "error reading", "error while reading", "not_found", "no such file", "out_of_range")


def _read_error(e: BaseException, where: str) -> CheckpointError:
    """The error of a failed read of a checkpoint whose model and shapes fit: ``CheckpointCorruptError`` for a
    byte-level failure (a missing, truncated or undecodable file), a plain ``CheckpointError`` otherwise."""
    if isinstance(e, FileNotFoundError):
        return CheckpointCorruptError(f"{where}: a file is missing ({e.filename or _first_line(e)})")
    text = _first_line(e)
    if isinstance(e, OSError) or any(w in text.lower() for w in _READ_FAILURES) or \
            not isinstance(e, (ValueError, KeyError, TypeError, RuntimeError, MemoryError)):
        return CheckpointCorruptError(f"{where}: cannot be read, a data file is missing or damaged ({text})")
    return CheckpointError(f"{where}: cannot be restored ({type(e).__name__}: {text})")


def _read_json(mgr: ocp.CheckpointManager, step: int, item: str, where: str) -> dict:
    """The JSON item ``item`` (``meta``) of ``step`` ({} for a checkpoint without it)."""
    if not os.path.isdir(os.path.join(where, item)):
        return {}
    try:
        return dict(mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item] or {})
    except Exception as e:  # noqa: BLE001 - a file that does not parse is a damaged file
        raise CheckpointCorruptError(f"{where}: its {item} cannot be read ({_first_line(e)})") from None


def _key_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_shapes(tree, is_leaf=None) -> dict[str, tuple]:
    return {_key_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _check_shapes(item_dir: str, target: Any, where: str, what: str) -> None:
    """Compare the arrays stored in ``item_dir`` (their metadata: names, shapes) with ``target`` before any
    array is read; a difference is a ``CheckpointMismatchError`` naming the parameter and both shapes."""
    from etils import epath
    handler = ocp.StandardCheckpointHandler()
    try:
        stored_tree = handler.metadata(epath.Path(item_dir)).tree
    except Exception as e:  # noqa: BLE001 - a metadata file that cannot be read is a damaged file
        raise _read_error(e, where) from None
    finally:
        handler.close()
    stored = _leaf_shapes(stored_tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    wanted = _leaf_shapes(target)
    hint = (" (was it written with another optimizer? compare optimizer.name)" if what == "optimizer state"
            else " (a checkpoint of another model config)")
    for name, shape in wanted.items():
        if name in stored and stored[name] != shape:
            raise CheckpointMismatchError(f"{where}: {what} {name} is {stored[name]} in the checkpoint but "
                                          f"{shape} in this {'optimizer' if what == 'optimizer state' else 'model'}"
                                          + hint)
    missing = [n for n in wanted if n not in stored]
    extra = [n for n in stored if n not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} tensors of this run are not in it (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} of its tensors have no place here (e.g. {extra[0]})")
        raise CheckpointMismatchError(f"{where}: does not fit: {'; '.join(parts)}" + hint)


def save_model(workdir: str, model: nnx.Module, *, config=None, source: str = "", step: int = 0) -> str:
    """Write a model-only checkpoint (as ``convert`` does) to ``workdir/checkpoints/<step>``; returns its path."""
    meta = {"step": step, "source": source, "kind": "model", "model_type": model_kind(model)}
    if config is not None:
        meta.update(model_meta(config.model if "model" in config else config))
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


def _steps_in(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n, "model")))


def find_checkpoint(path: str, which: str | int = "latest") -> tuple[str, int]:
    """Resolve ``path`` (a workdir, a ``checkpoints``/``best`` directory, or one step's folder) and ``which``
    ('latest', 'best' or a step) to ``(manager directory, step)``."""
    path = os.path.abspath(os.path.expanduser(path))
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "model")):      # a step's own folder
        step, parent = int(name), os.path.dirname(path)
        if which == "latest" or (which == "best" and os.path.basename(parent) == BEST_DIR) or \
                (which not in ("latest", "best") and int(which) == step):
            return parent, step
        raise CheckpointError(f"{path} is the checkpoint of step {step}, not the {which} one; pass its workdir "
                              f"to choose with --checkpoint, or leave --checkpoint at 'latest'")
    if which == "best":
        candidates = [os.path.join(path, BEST_DIR), path]
    else:
        candidates = [os.path.join(path, LATEST_DIR), path, os.path.join(path, BEST_DIR)]
    for directory in candidates:
        steps = _steps_in(directory)
        if not steps:
            continue
        if which in ("latest", "best"):
            return directory, max(steps)
        step = int(which)
        if step in steps:
            return directory, step
        raise CheckpointError(f"{directory}: no checkpoint for step {step} (have {sorted(steps)})")
    latest = _steps_in(os.path.join(path, LATEST_DIR))
    if which == "best" and latest:
        raise CheckpointError(f"{path}: no best checkpoint (nothing in {os.path.join(path, BEST_DIR)}: a convert "
                              "workdir, or a run without validation, keeps none); it has the latest "
                              f"checkpoint{'s' if len(latest) > 1 else ''} {latest}: use --checkpoint latest or a step")
    raise CheckpointError(f"{path}: no Orbax checkpoint found (looked for {', '.join(candidates)}); "
                          "train first or run `python -m hrdecoder_jax.convert`")


def restore_model(path: str, model: nnx.Module, which: str | int = "latest", *, model_config=None) -> dict:
    """Fill ``model`` from the checkpoint at ``path`` (see ``find_checkpoint``) after verifying it; returns
    its ``meta`` with ``step`` and ``checkpoint`` (the step's folder). ``model_config``: the model section
    ``model`` was built from (without it only the model's type is checked); a checkpoint of another model
    type or config is refused (``CheckpointMismatchError``), as is one whose shapes do not fit (naming the
    parameter and both shapes); a corrupt one raises ``CheckpointCorruptError``."""
    directory, step = find_checkpoint(path, which)
    mgr = ocp.CheckpointManager(directory)
    try:
        restored = _restore(mgr, directory, step, model_state(model),
                            model_config=model_kind(model) if model_config is None else model_config)
    finally:
        mgr.close()
    load_model_state(model, restored["model"])
    return dict(restored["meta"] or {}, step=step, checkpoint=os.path.join(directory, str(step)))


def restore_for_inference(config, workdir: str, which: str | int = "latest"):
    """A model of ``config.model`` filled from the checkpoint in ``workdir``, in eval mode, and its meta.

    The model is built abstractly (``nnx.eval_shape``: shapes only, no random initialisation, which takes
    ~20 s of eager CPU work even for the tiny config) and every variable then comes from the checkpoint;
    if anything stays unfilled, it falls back to a normal build.
    """
    from hrdecoder_jax.models import build_model

    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    meta = restore_model(workdir, model, which, model_config=config.model)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))):
        model = build_model(config.model, rngs=nnx.Rngs(0))
        meta = restore_model(workdir, model, which, model_config=config.model)
    model.eval()
    return model, meta


def _first_line(e: Exception) -> str:
    """The first line of an error, without TensorStore's object dump ('See full TensorStore details')."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    line = line.split(" See full TensorStore details")[0].rstrip(" .")
    return line[:300]
