"""One writer per run directory: a lock file holding the owner's pid, host and start time."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

from estbench.errors import EstbenchError

__all__ = ["RunLock"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock``; a second holder is refused with a
    message naming the owner. A lock left by a dead process on this host is stale and taken
    over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": dt.datetime.now(dt.timezone.utc).isoformat()}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self.owner, handle)
        return True

    def __enter__(self) -> RunLock:
        if self._try_create():
            return self
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        same_host = holder.get("host") == self.owner["host"]
        if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            self.path.unlink(missing_ok=True)  # stale: its owner is gone
            if self._try_create():
                return self
        raise EstbenchError(
            f"run directory '{self.path.parent}' is in use by pid {holder.get('pid', '?')} on "
            f"host {holder.get('host', '?')} since {holder.get('since', '?')}; wait for that run "
            f"to finish, use another --out, or delete {self.path} if that process is gone"
        )

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
