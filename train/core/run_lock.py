"""Who owns a run directory: the marker ``toolkit-run.json`` says the trainer made it, and ``run_dir/.lock``
names the one process training in it.

The marker (format ``at-diffusion-toolkit/train-run``) is written when a run directory is created, before any
other file: ``--out`` is trained into only when it is new, empty, or such a run (train/core/trainer.py
``check_run_dir``), so a typo never overwrites someone's config.json or model/. It appears atomically (a folder
holding only the marker is renamed into place), so a second process never sees a half-made run directory.

One trainer per run directory: ``run_dir/.lock`` names the process that holds it.

A second ``--resume`` on a directory whose trainer is still running would write the same checkpoints and
metrics; it is refused with the holder's pid, host and start time. A lock left by a process that no longer
exists (kill -9, a reboot) is stale and taken over. Created with O_EXCL, so two trainers starting at the
same moment cannot both win.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.staging import atomic_file, temp_dir_beside

LOCK_NAME = ".lock"
RUN_MARKER = "toolkit-run.json"
RUN_FORMAT = "at-diffusion-toolkit/train-run"
RUN_FORMAT_VERSION = 1


def read_run_marker(run_dir: Path) -> dict | None:
    """The run directory's marker, or None when it has none of this toolkit's format (or a newer version, which
    this toolkit does not know how to continue)."""
    try:
        data = json.loads((Path(run_dir) / RUN_MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        return None
    if not isinstance(data.get("format_version"), int) or data["format_version"] > RUN_FORMAT_VERSION:
        return None
    return data


def _marker(note: str | None = None) -> str:
    data = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **({"note": note} if note else {})}
    return json.dumps(data, indent=2) + "\n"


def create_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` (absent or empty) a run directory holding only the marker, in one rename: a folder with
    the marker is built beside it and renamed over it (rename(2) replaces an empty directory)."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir_beside(run_dir, "new")
    try:
        (staging / RUN_MARKER).write_text(_marker())
        staging.rename(run_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if read_run_marker(run_dir) is None:   # another trainer creating the same run at this moment is fine
            raise


def adopt_run_dir(run_dir: Path) -> None:
    """Mark a run made before run markers existed (its ``--resume`` was accepted from its config.json)."""
    with atomic_file(Path(run_dir) / RUN_MARKER, "w") as handle:
        handle.write(_marker("marker added on --resume of a run made before toolkit-run.json existed"))


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
