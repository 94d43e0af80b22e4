"""Write an export's ``manifest.json``: what was exported, from what, how, and every file's sha256.

The runtime reads it back with ``atdiff.runtime.export_manifest`` (no torch needed there). Keys:
  format / format_version, created, precision, opset, spec (ModelSpec.to_dict(), including the
  scheduler config), components (file, precision, contract: names, dtypes, shapes, min/opt/max
  profiles, tolerances), files (path -> sha256, bytes), tokenizer_files, source (path, tree sha256),
  settings (the export command's options), versions, validation (the checks' results).
``format`` and ``files`` are also what a later ``toolkit export --out`` to the same directory checks before
replacing it: only a directory holding nothing but the files listed here (runtime/staging.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from atdiff.runtime.contracts import ExportContract
from atdiff.runtime.export_manifest import FORMAT, FORMAT_VERSION
from atdiff.runtime.model_source import MANIFEST
from atdiff.runtime.model_spec import ModelSpec
from atdiff.runtime.staging import atomic_file
from atdiff.runtime.provenance import sha256_file, versions



def file_entries(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under ``root`` except the manifest itself."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        entries[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def build_manifest(root: Path, *, spec: ModelSpec, precision: str, contracts: dict[str, ExportContract],
                   component_files: dict[str, str], opset: int, source: dict, settings: dict,
                   tokenizer_files: list[str]) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "precision": precision, "opset": opset, "spec": spec.to_dict(),
        "components": {name: {"file": component_files[name], "precision": c.precision, "note": c.note,
                              "contract": c.to_dict()} for name, c in contracts.items()},
        "files": file_entries(root), "tokenizer_files": tokenizer_files,
        "source": source, "settings": settings, "versions": versions("export"), "validation": None,
    }


def write_manifest(root: Path, data: dict) -> Path:
    """Write manifest.json through a temporary file, so a reader never sees half a manifest."""
    path = root / MANIFEST
    with atomic_file(path, "w") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
