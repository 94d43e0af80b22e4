"""Write a directory or a file atomically: build it under a temporary name beside the target, then swap it in.

A failed or interrupted run removes its temporary directory and leaves the previous output untouched; a
successful one replaces it with two renames on the same filesystem (the old one is deleted only after
the new one is in place). Shared by ``toolkit export`` (marker ``manifest.json``) and the eval reports
(marker ``record.json``); ``atomic_file`` does the same for one file (JSON results, stats, cached chunks).
Standard library only.

A previous output is replaced only when this toolkit wrote it: its marker is JSON with the writer's own
``format`` and a ``files`` list (paths relative to the directory), and the directory holds nothing else. A file the
marker does not list is someone else's: replacing the directory would delete it, so the command refuses, naming
it (refusing rather than carrying such files over: a carried-over file would sit in an export whose manifest does
not describe it, and a refusal loses nothing).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.faults import fault_point


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


def check_target(out: Path, marker: str, what: str = "output", fmt: str | None = None) -> None:
    """Refuse to replace a directory this toolkit did not write: a typo in --out must not delete a folder of
    someone's files. An empty or missing directory is fine. With ``fmt``, ``out`` must be a previous output of that
    format (``marker`` is JSON with ``"format": fmt`` and a ``files`` list) holding only the files it lists; without
    it (writers whose marker carries no format yet), the marker's name alone is checked."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    refused = f"--out {out} exists and is not an {what} directory"
    if not out.is_dir():
        raise ToolkitError(f"{refused} (it is a file); choose a new path or remove it first")
    listed = listed_files(out, marker, fmt) if fmt else ({marker} if (out / marker).is_file() else None)
    if listed is None:
        made_by = f"{marker} of format {fmt}" if fmt else marker
        raise ToolkitError(f"{refused} (no {made_by}); choose a new path or remove it first")
    stray = first_unlisted(out, listed) if fmt else None
    if stray is not None:
        raise ToolkitError(f"--out {out} is a previous {what} but also holds {stray}, which its {marker} does not "
                           f"list: replacing it would delete that; move it out, or choose a new path")


def listed_files(out: Path, marker: str, fmt: str) -> set[str] | None:
    """The relative paths ``out/marker`` lists as its own (the marker included), or None when the marker is
    missing, not JSON, or not of format ``fmt`` (e.g. a web app's manifest.json)."""
    try:
        data = json.loads((Path(out) / marker).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(data.get("files"), (dict, list)):
        return None
    return {marker, *map(str, data["files"])}   # files: a list of paths, or a dict keyed by path (export manifest)


def first_unlisted(root: Path, listed: set[str]) -> str | None:
    """The first (sorted) entry under ``root`` that is neither a listed file nor a folder holding one: a file, a
    symlink (never followed) or an empty folder someone else put there. None when there is none."""
    folders = {parent.as_posix() for rel in listed for parent in PurePosixPath(rel).parents}
    entries = []
    for folder, dirs, files in os.walk(root):   # followlinks=False: a link to a folder is an entry, not a tree
        entries += [Path(folder, name) for name in (*dirs, *files)]
    for path in sorted(entries):
        rel = path.relative_to(root).as_posix()
        is_folder = path.is_dir() and not path.is_symlink()
        if rel not in listed and not (is_folder and rel in folders):
            return rel
    return None


@contextlib.contextmanager
def staged_directory(out: Path, marker: str, what: str = "output", fmt: str | None = None):
    """Yield a fresh temporary directory; on normal exit it becomes ``out``, on an exception it is removed.
    ``out`` may be replaced only when ``check_target`` accepts it (``fmt``: see there)."""
    out = Path(out)
    check_target(out, marker, what, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    staging = temp_dir_beside(out, "partial")
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


def temp_dir_beside(out: Path, kind: str) -> Path:
    """A new empty directory ``.NAME.KIND-PID-XXXXXXXX`` beside ``out`` (the pid tells ``clean_stale`` a dead
    process's leftovers), with normal permissions: mkdtemp makes it 0700, the output it becomes should not be."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())
    return staging


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
