"""The export directory's atomic write: ``runtime.staging`` with manifest.json as the mark of an export
(so --out never replaces a directory that is not a previous export)."""
from __future__ import annotations

from pathlib import Path

from runtime import staging
from runtime.model_source import MANIFEST


def check_target(out: Path) -> None:
    staging.check_target(out, MANIFEST, "export")


def staged_directory(out: Path):
    return staging.staged_directory(out, MANIFEST, "export")
