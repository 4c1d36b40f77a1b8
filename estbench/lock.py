"""One writer per run directory: an OS lock (``flock``) on ``run_dir/.lock``, which also holds the
owner's pid, host and start time so that a refusal can name the owner.

The kernel releases an ``flock`` when its holder dies, however it dies, so a lock left by a killed
run is free to take and taking it is a single atomic system call: two processes can never both
hold it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path

from estbench.errors import EstbenchError

__all__ = ["RunLock"]


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock``; a second holder is refused with a
    message naming the owner, as is a lock file written on another host. The file is removed on
    release."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": dt.datetime.now(dt.timezone.utc).isoformat()}
        self.fd: int | None = None

    def _refusal(self) -> EstbenchError:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        return EstbenchError(
            f"run directory '{self.path.parent}' is in use by pid {holder.get('pid', '?')} on "
            f"host {holder.get('host', '?')} since {holder.get('since', '?')}; wait for that run "
            f"to finish, use another --out, or delete {self.path} if that process is gone"
        )

    def _held_elsewhere(self, fd: int) -> bool:
        """Whether the lock file names an owner on another host: its flock may not reach this
        kernel (a network file system), and its liveness cannot be checked from here. On this
        host the flock alone decides: a lock we could take is stale, whatever pid it names."""
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return False
        return isinstance(holder, dict) and holder.get("host", self.owner["host"]) != \
            self.owner["host"]

    def _acquire(self) -> int | None:
        """The fd holding the flock on the current ``.lock`` file, or None if another holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(fd).st_ino:
                return fd
            os.close(fd)  # the holder released and removed the file meanwhile: lock the new one

    def __enter__(self) -> RunLock:
        fd = self._acquire()
        if fd is None:
            raise self._refusal()
        if self._held_elsewhere(fd):
            os.close(fd)
            raise self._refusal()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.owner).encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def held(run_dir: Path) -> bool:
        """Whether a live process on this host holds ``run_dir``'s lock (read-only check)."""
        try:
            fd = os.open(Path(run_dir) / ".lock", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still holding the flock; see _acquire for the race
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
