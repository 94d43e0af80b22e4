"""What a model is, read from its JSON configs alone (no diffusers/torch import).

A ``ModelSpec`` is the single description of a model that the pipeline, every backend and the
exporter share: which networks exist, their shapes, and the noise schedule config. It is built
from a diffusers directory (``from_diffusers_dir``) or stored in an export's manifest.json
(``to_dict`` / ``from_dict``) so an exported model runs without its source checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from math import gcd as _gcd
from pathlib import Path
from typing import Any

from runtime.errors import ToolkitError

TEXT_TO_IMAGE = "text-to-image"
UNCONDITIONAL = "unconditional"


class ModelFormatError(ToolkitError, ValueError):
    """A directory is not a model this toolkit can run; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str                          # TEXT_TO_IMAGE or UNCONDITIONAL
    name: str                          # directory name, used for default output paths
    scheduler_config: dict             # diffusers scheduler_config.json contents
    scheduler_class: str               # e.g. "LCMScheduler", "DDPMScheduler"
    unet_in_channels: int
    unet_out_channels: int
    sample_size: int                   # UNet sample size (latent size for latent models)
    unet_downsample: int = 1           # the UNet's total spatial reduction (2 ** (num blocks - 1))
    time_cond_proj_dim: int | None = None      # LCM guidance embedding width (w-embedding)
    cross_attention_dim: int | None = None
    num_class_embeds: int | None = None        # class-conditional pixel models
    vae_scale_factor: int = 1                  # pixels per latent pixel (1 for pixel models)
    vae_scaling_factor: float = 1.0
    vae_latent_channels: int | None = None
    tokenizer_max_length: int | None = None
    text_hidden_size: int | None = None
    default_guidance_scale: float | None = None  # from toolkit.json (a model trained for its own w range)

    @property
    def is_latent(self) -> bool:
        return self.kind == TEXT_TO_IMAGE

    @property
    def default_sampler(self) -> str:
        """The sampler matching the scheduler class. DDPM-trained (ADM-style) checkpoints default to DDIM because
        few-step sampling is what this toolkit is for; ask for 'iddpm' for ancestral."""
        return {"LCMScheduler": "lcm", "DPMSolverMultistepScheduler": "dpmpp_2m"}.get(self.scheduler_class, "ddim")

    @property
    def default_resolution(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def pixel_multiple(self) -> int:
        """Image height/width must be a multiple of this (VAE and UNet downsampling; at least 8)."""
        factor = self.vae_scale_factor * self.unet_downsample
        if not self.is_latent:
            return factor  # pixel UNets need only their own downsampling (28x28 MNIST: 4)
        return factor if factor % 8 == 0 else factor * 8 // _gcd(factor, 8)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_diffusers_dir(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        index = _read_json(path / "model_index.json") if (path / "model_index.json").exists() else None
        if index is None:
            if (path / "config.json").exists() and (path / "scheduler_config.json").exists():
                return _unconditional_spec(path, path, path / "scheduler_config.json")
            run_model = path / "model" / "model_index.json"  # a training run directory: the model is inside
            hint = f" (this looks like a training run: its model is {path / 'model'})" if run_model.is_file() else ""
            raise ModelFormatError(
                f"{path} has no model_index.json: pass a diffusers pipeline directory "
                f"(as written by `toolkit train ...` or `save_pretrained`) or an export directory{hint}")
        for part in ("unet", "scheduler"):
            if part not in index or not (path / part).is_dir():
                raise ModelFormatError(f"{path} has no '{part}/' component; it is not a diffusion pipeline")
        sched = path / "scheduler" / "scheduler_config.json"
        if "text_encoder" in index and "vae" in index:
            return _text_to_image_spec(path, sched)
        return _unconditional_spec(path, path / "unet", sched)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"missing {path}") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None


def _unet_fields(unet: dict) -> dict:
    return dict(unet_in_channels=unet["in_channels"], unet_out_channels=unet["out_channels"],
                sample_size=_as_int(unet["sample_size"]), unet_downsample=2 ** (len(unet["block_out_channels"]) - 1),
                time_cond_proj_dim=unet.get("time_cond_proj_dim"),
                cross_attention_dim=unet.get("cross_attention_dim"), num_class_embeds=unet.get("num_class_embeds"))


def _as_int(size) -> int:
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ModelFormatError(f"non-square sample_size {size} is not supported")
        return int(size[0])
    return int(size)


def model_name(root: Path) -> str:
    """The directory's name, except for a training run's output (``runs/NAME/model`` with its
    training.json): there it is NAME, so default export paths (exports/NAME) and printed names tell runs
    apart instead of every run being called 'model'."""
    root = root.resolve()
    return root.parent.name if root.name == "model" and (root / "training.json").is_file() else root.name


def _unconditional_spec(root: Path, unet_dir: Path, sched: Path) -> ModelSpec:
    scheduler = _read_json(sched)
    return ModelSpec(kind=UNCONDITIONAL, name=model_name(root), scheduler_config=scheduler,
                     scheduler_class=scheduler.get("_class_name", "DDPMScheduler"),
                     **_unet_fields(_read_json(unet_dir / "config.json")))


def _text_to_image_spec(root: Path, sched: Path) -> ModelSpec:
    scheduler = _read_json(sched)
    vae = _read_json(root / "vae" / "config.json")
    text = _read_json(root / "text_encoder" / "config.json")
    tok_cfg = root / "tokenizer" / "tokenizer_config.json"
    max_len = _read_json(tok_cfg).get("model_max_length") if tok_cfg.exists() else None
    if max_len is None or max_len > 10_000:  # transformers writes a huge sentinel when unset
        max_len = text.get("max_position_embeddings", 77)
    return ModelSpec(kind=TEXT_TO_IMAGE, name=model_name(root), scheduler_config=scheduler,
                     scheduler_class=scheduler.get("_class_name", "LCMScheduler"),
                     vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
                     vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
                     vae_latent_channels=vae["latent_channels"], tokenizer_max_length=int(max_len),
                     text_hidden_size=text.get("hidden_size"), default_guidance_scale=_default_guidance(root),
                     **_unet_fields(_read_json(root / "unet" / "config.json")))


GENERATION_DEFAULTS = "toolkit.json"


def _default_guidance(root: Path) -> float | None:
    """A model's own default guidance scale: ``toolkit.json``'s {"generation": {"guidance_scale": x}}, written by
    ``toolkit train lcm`` / ``teacher`` (a model distilled for w in [1, 3] is sampled at 3, not LCM-Dreamshaper's
    8.5). Models without the file use the runtime's defaults."""
    if not (root / GENERATION_DEFAULTS).is_file():
        return None
    value = _read_json(root / GENERATION_DEFAULTS).get("generation", {}).get("guidance_scale")
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise ModelFormatError(f"{root / GENERATION_DEFAULTS}: generation.guidance_scale must be a number >= 0, "
                               f"got {value!r}")
    return None if value is None else float(value)
