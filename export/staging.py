"""Write a directory atomically: build it under a temporary name beside the target, then swap it in.

A failed or interrupted export removes its temporary directory and leaves the previous export untouched;
a successful one replaces it with two renames on the same filesystem (the old one is deleted only after
the new one is in place).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from runtime.errors import ToolkitError
from runtime.model_source import MANIFEST


def check_target(out: Path) -> None:
    """Refuse to replace a directory that is not an export (a typo in --out must not delete a folder)."""
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ToolkitError(f"--out {out} exists and is not an export directory (no {MANIFEST}); "
                           "choose a new path or remove it first")


@contextlib.contextmanager
def staged_directory(out: Path):
    """Yield a fresh temporary directory; on normal exit it becomes ``out``, on an exception it is removed."""
    out = Path(out)
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the export should get normal permissions
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, out)


def _swap_in(staging: Path, out: Path) -> None:
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{uuid.uuid4().hex[:8]}")
        out.rename(previous)
    try:
        staging.rename(out)
    except BaseException:
        if previous is not None:
            previous.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
