"""A run's workdir: its layout (the one place that names its files), the check that it is writable before
work starts, the lock that keeps two runs apart, and the one way every command writes an output file
(``atomic_write``: a temporary name, renamed when complete).

Layout of a workdir (``train`` writes all of it; ``convert`` a model-only ``checkpoints/0``; ``evaluate``
an ``eval_<split>_<step>/`` folder)::

    .lock                          the lock of the run that uses it (below); empty when released
    config.json                    the config of the run that started it (a resume keeps it, ``config_file``)
    metrics.jsonl                  one JSON line per log or validation (``metrics_log``); in a multi-process
    metrics.process<i>.jsonl       run the other processes' private copies of the same values
    tensorboard/                   TensorBoard event files of the same values (``tensorboard_dir``)
    checkpoints/<step>/            the latest training states: model, opt_state, meta, digests (``checkpoint``)
    best/<step>/                   the best model by validation mIoU: model, meta, digests
    corrupt/<step>/                training steps whose bytes failed verification, moved aside by
                                   ``checkpoint.Checkpointer.quarantine``
    eval_<split>_<step>/           the test results of a model: ``metrics.json``, ``per_image.csv``,
                                   ``pr_curves.png`` (``reports.write_outputs``; ``eval_dir``), written by
                                   training's final evaluation and by ``evaluate``, in one schema

The lock is ``WORKDIR/.lock``: an advisory ``flock`` held for the life of the run (the kernel drops it when
the process dies, however it dies) plus a JSON line naming the holder (host, pid, command, start time).
A second run on the same workdir stops at once with one line naming the holder. A lock file left by a
run that died is taken over with a notice. In a multi-process run only process 0 takes the lock (the
others share the workdir by design). The lock works wherever ``flock`` does: local disks and most
cluster file systems (on NFS it needs lockd).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import socket
import sys
import tempfile

from absl import logging

from hrdecoder_jax.errors import ExpectedError

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
LATEST_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_DIR = "corrupt"
TENSORBOARD_DIR = "tensorboard"
_UMASK = os.umask(0o022)
os.umask(_UMASK)               # read once: the permissions a plain open() would give a new file


class WorkdirError(ExpectedError, RuntimeError):
    """The workdir cannot be used (not writable, or in use by another run); the message names it."""


def config_file(workdir: str) -> str:
    """``WORKDIR/config.json``: the config of the run that started the workdir."""
    return os.path.join(workdir, CONFIG_NAME)


def metrics_log(workdir: str, process_index: int = 0) -> str:
    """The metrics log of process ``process_index``: ``metrics.jsonl`` (process 0, the record of the run), or
    ``metrics.process<i>.jsonl`` (the other processes' private copies)."""
    name = "metrics.jsonl" if process_index == 0 else f"metrics.process{process_index}.jsonl"
    return os.path.join(workdir, name)


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, TENSORBOARD_DIR)


def eval_dir(workdir: str, split: str, step: int) -> str:
    """Where the test results of ``split`` at ``step`` go: ``WORKDIR/eval_<split>_<step>``."""
    return os.path.join(workdir, f"eval_{split}_{step}")


def probe_writable(path: str) -> None:
    """Create the folder ``path`` if needed and write (and remove) a probe file of this process there;
    raises the ``OSError`` that says why not."""
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test.", delete=True) as f:
        f.write(b"ok")


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """``with atomic_write(path) as f:`` writes ``path`` through a temporary file beside it (``.NAME.*.tmp``),
    synced and renamed over ``path`` only when the block ends without an error. A kill, a full disk or an
    exception never leaves a partial file under the final name: the previous version stays until the new
    one is whole, and the temporary file is removed. An ``OSError`` names ``path`` (a full disk reads
    'disk full ...: PATH')."""
    path = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)              # mkstemp makes it 0600
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise OSError(e.errno, e.strerror or str(e), path) from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_file(path, data) -> None:
    """Write ``data`` (``str`` or ``bytes``) to ``path`` with ``atomic_write``."""
    with atomic_write(path, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
        f.write(data)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def check_writable(workdir: str) -> str:
    """Create ``workdir`` if needed and write a probe file there; returns its absolute path. Every process
    of a multi-process run probes with a file of its own (a shared name let one process delete another's
    probe mid-check)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        probe_writable(workdir)
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else e.strerror
        raise WorkdirError(f"workdir {workdir} is not writable ({what}); choose another --workdir") from None
    return workdir


def _holder_text(info: dict) -> str:
    return (f"{info.get('command', 'a run')} on host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"since {info.get('started', '?')}")


class WorkdirLock:
    """``with WorkdirLock(workdir, "train"):`` holds the workdir for this process (see the module doc)."""

    def __init__(self, workdir: str, command: str, *, notice=None):
        self.path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), LOCK_NAME)
        self.command = command
        self.notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {"command": "an unknown process"}

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by {_holder_text(holder)}; "
                                   "wait for that run to end or choose another --workdir") from None
            raise
        previous = self._read(fd)
        if previous:
            self.notice(f"[lock] taking over the lock of {_holder_text(previous)}: that process is gone")
        info = {"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)     # an empty lock file: released cleanly
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# ----------------------------------------------------------------------------------------------------------
# The metrics log
# ----------------------------------------------------------------------------------------------------------


class MetricsLog:
    """The metrics log of a run: ``metrics.jsonl`` plus TensorBoard event files (process 0; with several
    processes the others write ``metrics.process<i>.jsonl`` alone).

    A line torn by a kill or a full disk (only the last one can be: the file is only appended to) is cut
    off with a notice before the run appends, so every line of the file stays one JSON document."""

    def __init__(self, workdir: str, process_index: int = 0, process_count: int = 1, say=print):
        enabled = process_index == 0
        self.enabled = enabled
        self.writer = None
        self.file = None
        path = None
        if enabled or process_count > 1:
            # Other processes keep a private log of the (replicated) values, so runs can be compared.
            path = metrics_log(workdir, process_index)
        if path is not None:
            _cut_torn_line(path, say)
            self.file = open(path, "a")
        if enabled:
            try:
                from clu import metric_writers
                self.writer = metric_writers.create_default_writer(tensorboard_dir(workdir), asynchronous=True)
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


def _cut_torn_line(path: str, say) -> None:
    """Cut ``path`` back to its last complete line (one that ends in a newline), saying what was dropped."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep, end = 0, size
        while end > 0:                   # back to the last newline (0 when the file has none)
            start = max(0, end - 4096)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.truncate(keep)
    say(f"[log] {path}: dropped its torn last line ({size - keep} bytes, left by an interrupted write)")


def read_metrics_log(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a line that is not one JSON document is skipped)."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return rows
