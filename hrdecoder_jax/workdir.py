"""A run's workdir: checked writable before work starts, and locked so that two runs never share it.

The lock is ``WORKDIR/.lock``: an advisory ``flock`` held for the life of the run (the kernel drops it when
the process dies, however it dies) plus a JSON line naming the holder (host, pid, command, start time).
A second run on the same workdir stops at once with one line naming the holder. A lock file left by a
run that died is taken over with a notice. In a multi-process run only process 0 takes the lock (the
others share the workdir by design). The lock works wherever ``flock`` does: local disks and most
cluster file systems (on NFS it needs lockd).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile

LOCK_NAME = ".lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used (not writable, or in use by another run); the message names it."""


def probe_writable(path: str) -> None:
    """Create the folder ``path`` if needed and write (and remove) a probe file of this process there;
    raises the ``OSError`` that says why not."""
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test.", delete=True) as f:
        f.write(b"ok")


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
