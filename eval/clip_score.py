"""CLIP score (Hessel et al. 2021, the COCO text-to-image protocol): per image ``max(100 * cos(E_img, E_txt), 0)``
with open_clip, averaged over images. Papers report it with ViT-L/14 (OpenAI weights):
``--clip-model ViT-L-14 --clip-pretrained openai`` (downloads once, needs the internet), or
``--clip-pretrained /path/to/open_clip_checkpoint.pt`` offline. ``--clip-model`` may also be a path to an
open_clip model-config JSON (tests use a tiny random one with no weights).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atdiff.runtime.errors import ToolkitError

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-L-14", "openai"
# a CLIP trained by `toolkit train clip`: its model/ directory holds the open_clip config and the weights
CONFIG_FILE, WEIGHTS_FILE = "toolkit-clip.json", "open_clip_model.safetensors"


class ClipScorer:
    """``scorer(images, prompts)`` -> float64 per-image CLIP scores (images: uint8 arrays or PIL images)."""

    def __init__(self, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, *,
                 device: str = "auto", batch_size: int = 32, seed: int = 0):
        import open_clip
        import torch

        from atdiff.runtime.backends.torch_backend import TorchBackend
        model, pretrained = _trained_clip(model, pretrained)
        name = _register_config(model)
        self.device = TorchBackend.resolve_device(device)   # auto | cpu | cuda | cuda:N (runtime/devices.py)
        self.batch_size = int(batch_size)
        self.record = {"clip_model": name, "clip_pretrained": pretrained}
        try:
            with torch.random.fork_rng(devices=[]):  # no weights (tests): a seeded random init, reproducible
                torch.manual_seed(seed)
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained or None, device=self.device)
        except RuntimeError as exc:
            # first sentence only: open_clip's download errors run on for several lines
            reason = str(exc).splitlines()[0].split(". ")[0].rstrip(".")[:300]
            raise ToolkitError(f"could not load CLIP '{name}' with weights '{pretrained}' ({reason}); "
                               "offline, pass --clip-pretrained /path/to/checkpoint.pt (an open_clip checkpoint "
                               "for this architecture); HF_HUB_OFFLINE=1 makes a missing download fail at once "
                               "instead of after a minute of retries") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        import torch
        if len(images) != len(prompts):
            raise ToolkitError(f"CLIP score needs one prompt per image, got {len(images)} images and "
                               f"{len(prompts)} prompts")
        scores = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                pixels = torch.stack([self.preprocess(_as_pil(im)) for im in images[lo:lo + self.batch_size]])
                tokens = self.tokenizer(list(prompts[lo:lo + self.batch_size]))
                img = self.model.encode_image(pixels.to(self.device)).float()
                txt = self.model.encode_text(tokens.to(self.device)).float()
                cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
                scores.append(torch.clamp(100.0 * cos, min=0.0).cpu().double().numpy())
        return np.concatenate(scores) if scores else np.zeros(0)


def _trained_clip(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """A `toolkit train clip` model directory -> (its config JSON, its weights unless others were asked for)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model, pretrained
    if not (path / CONFIG_FILE).is_file():
        raise ToolkitError(f"--clip-model {path} is a directory without {CONFIG_FILE}; pass the model/ directory "
                           "of a 'toolkit train clip' run, an open_clip model name or a config JSON")
    weights = str(path / WEIGHTS_FILE) if pretrained in (None, "", DEFAULT_PRETRAINED) else pretrained
    return str(path / CONFIG_FILE), weights


def _register_config(model: str) -> str:
    """A model name, or a path to an open_clip config JSON (registered under its file stem)."""
    if model.endswith(".json"):
        import open_clip
        path = Path(model).expanduser()
        if not path.is_file():
            raise ToolkitError(f"CLIP model config '{path}' does not exist; pass an open_clip model name "
                               "(e.g. ViT-L-14) or an existing config JSON")
        open_clip.add_model_config(path)
        return path.stem
    return model


def _as_pil(image):
    from PIL import Image
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"prompts file '{path}' does not exist; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ToolkitError(f"prompts file '{path}' has no prompts; write one prompt per line")
    return prompts
