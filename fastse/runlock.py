"""One owner per run folder: a training run (its rank 0, for all its ranks) or an evaluation holds an
exclusive `flock` on `<folder>/.lock` while it writes there; a second process is refused, naming the
owner's pid and host, which the file holds.

The OS drops the lock when its owner ends, however it ends (kill -9 included), so a lock is never stale;
the file stays, and only the lock on it counts. A process forked by the owner (a data worker) closes its
copy at once: one that outlives the owner holds nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"
# file systems without flock (e.g. Lustre mounted without -o flock): the folder is used unlocked
_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)

log = logging.getLogger(__name__)
_held: set[int] = set()  # descriptors of the lock files this process holds


class FolderInUse(ValueError):
    """Another process owns the folder; the message names the folder and that process."""


class RunLock:
    """This process's ownership of the existing folder `folder`, taken at construction, until `release`
    or the process's end. Raises FolderInUse where another process owns it, OSError where the lock
    file cannot be created or opened for writing (a read-only folder)."""

    def __init__(self, folder: str | Path):
        self.folder, self._fd = Path(folder), None
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _owner(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if owner is not None:
                raise FolderInUse(f"{self.folder} is in use by {owner}: wait for it to end, or choose another "
                                  "folder") from None
            if e.errno not in _NO_LOCKS:
                raise
            log.warning("%s: its file system has no locks (%s): nothing keeps a second process out",
                        self.folder, e.strerror)
            return
        self._fd = fd
        _held.add(fd)
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with contextlib.suppress(OSError):  # who owns it is for the message of a process refused; the lock holds
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)

    def release(self) -> None:
        """Give the folder up (idempotent; a no-op in a forked child, which closed its copy at the fork)."""
        fd, self._fd = self._fd, None
        if fd in _held:
            _held.discard(fd)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _owner(fd: int) -> str:
    """'process PID on HOST (since TIME)' from the lock file open as `fd`, or a plainer phrase."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # written this very moment, or by something else
        return "another process"


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors (the parent keeps its lock)."""
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)
