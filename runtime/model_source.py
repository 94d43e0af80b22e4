"""Turn the user's ``model`` argument into a local directory and its ModelSpec.

``model`` is a local diffusers directory, an export directory (has manifest.json), or a Hugging Face
hub id. Hub ids are resolved through huggingface_hub's cache; offline, an uncached id fails at once
with one message instead of a stack of retries.

Paths inside a model directory (docs/robustness.md): a diffusers directory's entries must resolve, symlinks
followed, inside the directory, inside a sibling model directory (the bundled ``models/default-teacher`` links
its text encoder, tokenizer and VAE to ``../default``), or, for a Hugging Face cache snapshot, inside its
repository folder (snapshot files link to ``../../blobs``). ``open_model`` checks this before reading any file,
because what a model directory holds is read into exports and manifests. Export directories are stricter:
runtime/export_manifest.py reads only files its manifest lists and hashes, inside the export.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.model_spec import ModelFormatError, ModelSpec

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer"
# What a text-to-image pipeline needs from the hub (no safety checker, no .bin duplicates, no fp16 variants).
_HUB_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json",
                 "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    path: Path
    spec: ModelSpec
    is_export: bool

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer folder, checked: in an export, every file in it is listed in the manifest and matches
        its sha256 (a diffusers directory was checked whole by ``open_model``)."""
        if self.is_export:
            from atdiff.runtime.export_manifest import read_manifest, verified_folder  # imports this module
            return verified_folder(read_manifest(self.path), TOKENIZER)
        return self.path / TOKENIZER


def open_model(model: str | os.PathLike) -> ModelSource:
    path = resolve_model_path(model)
    manifest = path / MANIFEST
    if manifest.exists():   # read whole and checked (runtime/export_manifest.py), not just its spec
        from atdiff.runtime.export_manifest import read_manifest  # imports this module
        return ModelSource(path, read_manifest(path).spec, is_export=True)
    check_confined(path)
    spec = ModelSpec.from_diffusers_dir(path)
    if spec.is_latent:   # here, not at the first prompt: 'toolkit export' would copy a useless tokenizer
        from atdiff.runtime.tokenizer import vocabulary_file
        vocabulary_file(path / TOKENIZER)
    return ModelSource(path, spec, is_export=False)


def check_confined(model_dir: Path) -> None:
    """Refuse a diffusers directory holding an entry (symlinks followed) that resolves outside the places it
    may point to (module docstring). Link loops are walked once."""
    root = _trusted_root(Path(model_dir).resolve())
    seen: set[Path] = set()
    for folder, dirs, files in os.walk(model_dir, followlinks=True):
        for name in (*dirs, *files):
            entry = Path(folder, name)
            target = entry.resolve()
            if not _may_point_to(target, root):
                raise ModelFormatError(
                    f"{entry} points outside the model directory (to {target}); a model directory may link only "
                    f"inside itself or to a sibling model directory: copy the file in instead of linking it")
        kept = [d for d in dirs if Path(folder, d).resolve() not in seen]
        seen.update(Path(folder, d).resolve() for d in kept)
        dirs[:] = kept


def _trusted_root(model_dir: Path) -> Path:
    """A Hugging Face cache snapshot's repository folder (snapshots/REV links into ../../blobs), else the
    directory itself."""
    repo = model_dir.parent.parent
    if model_dir.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return model_dir


def _may_point_to(target: Path, root: Path) -> bool:
    if target.is_relative_to(root):
        return True
    if not target.is_relative_to(root.parent):
        return False
    parts = target.relative_to(root.parent).parts
    return len(parts) > 1 and is_model_dir(root.parent / parts[0])   # inside a sibling model directory


def resolve_model_path(model: str | os.PathLike) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return _model_of_run(path)
    if path.exists():
        raise ToolkitError(f"model '{model}' is a file; pass a diffusers model directory or an export directory")
    text = str(model)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _from_hub(text)
    raise ToolkitError(f"model path '{model}' does not exist; pass a diffusers directory, an export directory "
                       "or a Hugging Face hub id like SimianLuo/LCM_Dreamshaper_v7")


def is_model_dir(path: Path) -> bool:
    """A diffusers pipeline, an export, or a single-UNet (config.json + scheduler_config.json) directory."""
    return ((path / "model_index.json").exists() or (path / MANIFEST).exists()
            or ((path / "config.json").exists() and (path / "scheduler_config.json").exists()))


def _model_of_run(path: Path) -> Path:
    """A training run directory (``runs/NAME``, whose ``model/`` is the exported pipeline) stands for its model."""
    return path / "model" if not is_model_dir(path) and is_model_dir(path / "model") else path


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types for this)
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ToolkitError(f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                           f"run 'hf download {repo_id}' on a machine with internet, or pass a local directory")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ToolkitError(f"could not download '{repo_id}' from the Hugging Face Hub ({reason}); check the network "
                           "or the id, or pass a local diffusers directory") from None
