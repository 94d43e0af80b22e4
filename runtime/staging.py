"""Write a directory or a file atomically: build it under a temporary name beside the target, then swap it in.

A failed or interrupted run removes its temporary directory and leaves the previous output untouched; a
successful one replaces it with two renames on the same filesystem (the old one is deleted only after
the new one is in place). Shared by ``toolkit export`` (marker ``manifest.json``) and the eval reports
(marker ``record.json``); ``atomic_file`` does the same for one file (JSON results, stats, cached chunks).
Standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from runtime.errors import ToolkitError
from runtime.faults import fault_point


def check_writable(path: str | os.PathLike, option: str = "--out", *, parent: bool = False) -> None:
    """Fail at once, before any model loads, when ``path`` (a directory to write into, or with ``parent`` the
    folder a file or directory will be created in) cannot be written. Creates nothing that stays: the probe
    file is removed, and a directory that does not exist yet is checked through its nearest existing parent."""
    target = Path(path).expanduser().absolute()
    folder = target.parent if parent else target
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    problem = None
    if existing is None or not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"no permission to write in {existing}"
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".toolkit-write-check-"):
                pass
        except OSError as exc:
            problem = f"{existing} is not writable ({exc.strerror or exc})"
    if problem:
        raise ToolkitError(f"cannot write {option} {path}: {problem}; choose a writable location")


def check_target(out: Path, marker: str, what: str = "output") -> None:
    """Refuse to replace a directory this toolkit did not write (it lacks ``marker``): a typo in --out must
    not delete a folder of someone's files. An empty directory is fine."""
    out = Path(out)
    if out.exists() and not (out / marker).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ToolkitError(f"--out {out} exists and is not an {what} directory (no {marker}); "
                           "choose a new path or remove it first")


@contextlib.contextmanager
def staged_directory(out: Path, marker: str, what: str = "output"):
    """Yield a fresh temporary directory; on normal exit it becomes ``out``, on an exception it is removed."""
    out = Path(out)
    check_target(out, marker, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the output should get normal permissions
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, out)


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished directory ``staging`` (same filesystem). A previous ``out`` is moved
    aside first, put back if the rename fails, and deleted only once the new one is in place."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        out.rename(previous)
        fault_point("swap:moved-aside")
    try:
        staging.rename(out)
    except BaseException:
        if previous is not None:
            previous.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove what killed runs for ``out`` left beside it: ``.NAME.partial-PID-*`` staging directories (GBs for a
    big export) whose process is gone. A ``.NAME.previous-PID-*`` (a kill between the two renames of
    ``swap_in``) is put back as ``out`` when ``out`` is missing, else removed. Entries of live processes, and
    anything not named by this module, are left alone. Returns what was removed or restored."""
    handled = []
    for kind in ("partial", "previous"):
        for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid = path.name.removeprefix(f".{out.name}.{kind}-").split("-")[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "previous" and not out.exists():
                path.rename(out)
            else:
                shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
    return handled


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", suffix: str = ".tmp"):
    """Yield an open temporary file beside ``path``; on normal exit it replaces ``path`` (so a reader never
    sees half a file), on an exception it is removed and ``path`` keeps its previous content."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, suffix=suffix, delete=False)
    try:
        with handle:
            yield handle
        os.chmod(handle.name, 0o666 & ~_umask())  # NamedTemporaryFile makes it 0600; outputs get normal permissions
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise


def write_json(path: str | os.PathLike, data: dict) -> None:
    """A JSON result file, written whole or not at all (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
