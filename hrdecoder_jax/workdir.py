"""A run's workdir: checked writable before work starts, locked so that two runs never share it, and the one
way every command writes an output file (``atomic_write``: a temporary name, renamed when complete).

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
import os
import socket
import sys
import tempfile

LOCK_NAME = ".lock"
_UMASK = os.umask(0o022)
os.umask(_UMASK)               # read once: the permissions a plain open() would give a new file


class WorkdirError(RuntimeError):
    """The workdir cannot be used (not writable, or in use by another run); the message names it."""


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
