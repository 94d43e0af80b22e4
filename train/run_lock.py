"""One trainer per run directory: ``run_dir/.lock`` names the process that holds it.

A second ``--resume`` on a directory whose trainer is still running would write the same checkpoints and
metrics; it is refused with the holder's pid, host and start time. A lock left by a process that no longer
exists (kill -9, a reboot) is stale and taken over. Created with O_EXCL, so two trainers starting at the
same moment cannot both win.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from runtime.errors import ToolkitError

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True):
    """Hold ``run_dir``'s lock for the block (only the main process takes it: ``enabled``)."""
    if not enabled:
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder and (holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1)))):
                raise ToolkitError(f"{run_dir} is in use by another trainer (pid {holder.get('pid')} on "
                                   f"{holder.get('host')}, started {holder.get('started')}); wait for it to finish "
                                   "or stop it, then --resume") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
