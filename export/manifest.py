"""Write an export's ``manifest.json``: what was exported, from what, how, and every file's sha256.

The runtime reads it back with ``runtime.export_manifest`` (no torch needed there). Keys:
  format / format_version, created, precision, opset, spec (ModelSpec.to_dict(), including the
  scheduler config), components (file, precision, contract: names, dtypes, shapes, min/opt/max
  profiles, tolerances), files (path -> sha256, bytes), tokenizer_files, source (path, tree sha256),
  settings (the export command's options), versions, validation (the checks' results).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path

from export.contracts import ExportContract
from runtime.export_manifest import FORMAT, FORMAT_VERSION, sha256_file
from runtime.model_source import MANIFEST
from runtime.model_spec import ModelSpec

_VERSIONED = ("at-diffusion-toolkit", "torch", "diffusers", "transformers", "onnx", "onnxruntime",
              "onnxruntime-gpu", "numpy")


def package_versions() -> dict[str, str]:
    found = {}
    for dist in _VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    found.setdefault("at-diffusion-toolkit", "not installed (source checkout)")
    return found


def file_entries(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under ``root`` except the manifest itself."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        entries[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def source_fingerprint(source: Path) -> dict:
    """One sha256 over the source model directory (relative paths and file hashes), to tell later whether
    the checkpoint an export came from is still the same one."""
    digest = hashlib.sha256()
    count = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0" + sha256_file(path).encode() + b"\n")
        count += 1
    return {"path": str(source.resolve()), "sha256": digest.hexdigest(), "files": count}


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
        "source": source, "settings": settings, "versions": package_versions(), "validation": None,
    }


def write_manifest(root: Path, data: dict) -> Path:
    """Write manifest.json through a temporary file, so a reader never sees half a manifest."""
    path = root / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
