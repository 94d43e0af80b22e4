"""The model hash that generated images record, cheap after the first time.

``tree_fingerprint`` (sha256 over every file of a model directory) takes seconds for an SD-size model, too
slow to pay on every ``toolkit generate``. Here the result is cached per directory, keyed on the files'
names, sizes and modification times, in ``$TOOLKIT_CACHE_DIR`` (default ``~/.cache/at-diffusion-toolkit``):
a changed or replaced file changes the key, so a stale hash is never reported. A cache that cannot be
read or written only costs the re-hash.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from atdiff.runtime.provenance import tree_fingerprint
from atdiff.runtime.staging import atomic_file

CACHE_FILE = "fingerprints.json"
MAX_ENTRIES = 256


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "at-diffusion-toolkit"
    return Path(os.environ.get("TOOLKIT_CACHE_DIR", default))


def _listing_key(root: Path) -> str:
    """sha256 of (path, size, mtime) of every file: changes whenever any file's content could have."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def model_sha256(root: str | os.PathLike) -> str:
    """``tree_fingerprint(root)["sha256"]``, computed once per unchanged directory."""
    root = Path(root)
    key = _listing_key(root)
    cache_path = cache_dir() / CACHE_FILE
    cache = _read(cache_path)
    if key not in cache:
        cache[key] = tree_fingerprint(root)["sha256"]
        _write(cache_path, dict(list(cache.items())[-MAX_ENTRIES:]))
    return cache[key]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w") as f:
            json.dump(cache, f)
    except OSError:
        pass  # read-only home or full disk: the hash is still right, only the next call re-hashes
