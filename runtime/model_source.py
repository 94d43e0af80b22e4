"""Turn the user's ``model`` argument into a local directory and its ModelSpec.

``model`` is a local diffusers directory, an export directory (has manifest.json), or a Hugging Face
hub id. Hub ids are resolved through huggingface_hub's cache; offline, an uncached id fails at once
with one message instead of a stack of retries.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from runtime.errors import ToolkitError
from runtime.model_spec import ModelFormatError, ModelSpec

MANIFEST = "manifest.json"
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
        return self.path / "tokenizer"


def open_model(model: str | os.PathLike) -> ModelSource:
    path = resolve_model_path(model)
    manifest = path / MANIFEST
    if manifest.exists():
        try:
            spec = ModelSpec.from_dict(json.loads(manifest.read_text())["spec"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"{manifest} is damaged ({exc}); re-run 'toolkit export'") from None
        return ModelSource(path, spec, is_export=True)
    return ModelSource(path, ModelSpec.from_diffusers_dir(path), is_export=False)


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


def _model_of_run(path: Path) -> Path:
    """A training run directory (``runs/NAME``, whose ``model/`` is the exported pipeline) stands for its model."""
    is_model = lambda p: ((p / "model_index.json").exists() or (p / MANIFEST).exists()  # noqa: E731
                          or ((p / "config.json").exists() and (p / "scheduler_config.json").exists()))
    return path / "model" if not is_model(path) and is_model(path / "model") else path


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
