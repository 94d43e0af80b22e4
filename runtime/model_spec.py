"""What a model is, read from its JSON configs alone (no diffusers/torch import).

A ``ModelSpec`` is the single description of a model that the pipeline, every backend and the
exporter share: which networks exist, their shapes, and the noise schedule config. It is built
from a diffusers directory (``from_diffusers_dir``) or stored in an export's manifest.json
(``to_dict`` / ``from_dict``) so an exported model runs without its source checkpoint.

Both readers check every value they take, and the sizes diffusers / transformers will build the networks by, for type
and range (runtime/config_checks.py) before anything is allocated: a crafted config is one ModelFormatError naming
the file, the key, the value and the allowed range.
"""
from __future__ import annotations

import dataclasses
import math
from math import gcd as _gcd
from pathlib import Path

from atdiff.runtime.config_checks import (MAX_BLOCKS, MAX_CHANNELS, MAX_CLASSES, MAX_LAYERS, MAX_RESOLUTION,
                                   MAX_SAMPLE_SIZE, MAX_TOKENS, MAX_VOCABULARY, REQUIRED, Config, ModelFormatError,
                                   json_type, read_json_object)
from atdiff.runtime.schedule import check_scheduler_config

TEXT_TO_IMAGE = "text-to-image"
UNCONDITIONAL = "unconditional"
EXPORT_FIX = "re-run 'toolkit export'"


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
    def from_dict(cls, data: dict, source: str = "the model spec", fix: str = EXPORT_FIX) -> "ModelSpec":
        """The spec an export's manifest.json stores (``to_dict``), every field checked (``source`` and ``fix``
        go into the error: the manifest's path, what to do)."""
        if not isinstance(data, dict):
            raise ModelFormatError(f"{source}: 'spec' is a JSON {json_type(data)}, not an object; {fix}")
        return _checked(cls(**_spec_fields(Config(data, source, fix, prefix="spec."))), source, fix)

    @classmethod
    def from_diffusers_dir(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        index = _config(path / "model_index.json").data if (path / "model_index.json").exists() else None
        if index is None:
            if (path / "config.json").exists() and (path / "scheduler_config.json").exists():
                return _checked(_unconditional_spec(path, path, path / "scheduler_config.json"), str(path))
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
            return _checked(_text_to_image_spec(path, sched), str(path))
        return _checked(_unconditional_spec(path, path / "unet", sched), str(path))


MIN_SCALING, MAX_SCALING = 1e-6, 1e3      # VAE latent scaling (Stable Diffusion: 0.18215)
MAX_SCALE_FACTOR = 2 ** (MAX_BLOCKS - 1)  # VAE and UNet downsampling


def _spec_fields(spec: Config) -> dict:
    """ModelSpec's fields from a stored spec, each typed and bounded; a text-to-image spec must have its text and
    VAE sizes (its networks' shapes are built from them)."""
    latent = spec.text("kind", choices=(TEXT_TO_IMAGE, UNCONDITIONAL)) == TEXT_TO_IMAGE

    def size(key: str, high: int, needed: bool = False) -> int | None:
        required = needed and latent
        return spec.integer(key, 1, high, REQUIRED if required else None, nullable=not required)

    scheduler = spec.section("scheduler_config")
    check_scheduler_config(scheduler)
    return dict(kind=spec.data["kind"], name=spec.text("name"), scheduler_config=scheduler.data,
                scheduler_class=spec.text("scheduler_class"),
                unet_in_channels=spec.integer("unet_in_channels", 1, MAX_CHANNELS),
                unet_out_channels=spec.integer("unet_out_channels", 1, MAX_CHANNELS),
                sample_size=spec.integer("sample_size", 1, MAX_SAMPLE_SIZE),
                unet_downsample=spec.integer("unet_downsample", 1, MAX_SCALE_FACTOR, 1),
                time_cond_proj_dim=size("time_cond_proj_dim", MAX_CHANNELS),
                cross_attention_dim=size("cross_attention_dim", MAX_CHANNELS, needed=True),
                num_class_embeds=size("num_class_embeds", MAX_CLASSES),
                vae_scale_factor=spec.integer("vae_scale_factor", 1, MAX_SCALE_FACTOR, 1),
                vae_scaling_factor=spec.number("vae_scaling_factor", MIN_SCALING, MAX_SCALING, 1.0),
                vae_latent_channels=size("vae_latent_channels", MAX_CHANNELS, needed=True),
                tokenizer_max_length=size("tokenizer_max_length", MAX_TOKENS, needed=True),
                text_hidden_size=size("text_hidden_size", MAX_CHANNELS, needed=True),
                default_guidance_scale=spec.number("default_guidance_scale", 0.0, MAX_GUIDANCE, None, nullable=True))


def _checked(spec: ModelSpec, source: str, fix: str = "fix the UNet's sample_size") -> ModelSpec:
    """``spec`` once its default image size (what a generation allocates when no size is given) is bounded."""
    if spec.default_resolution > MAX_RESOLUTION:
        raise ModelFormatError(f"{source}: its default image side, sample_size {spec.sample_size} x VAE scale factor "
                               f"{spec.vae_scale_factor} = {spec.default_resolution} px, is over {MAX_RESOLUTION} "
                               f"(real models are far below); {fix}")
    return spec


MODEL_FIX = "fix the file, or re-create the model (toolkit train ..., or diffusers' save_pretrained)"


def _config(path: Path) -> Config:
    return Config(read_json_object(path, MODEL_FIX), str(path), MODEL_FIX)


# Sizes diffusers / transformers build the networks by (read here so a crafted 1e9 fails before they allocate):
# key -> largest value; each may be one integer or one per block.
_UNET_SIZES = {"layers_per_block": MAX_LAYERS, "transformer_layers_per_block": MAX_LAYERS,
               "attention_head_dim": MAX_CHANNELS, "num_attention_heads": MAX_CHANNELS,
               "norm_num_groups": MAX_CHANNELS, "time_embedding_dim": 4 * MAX_CHANNELS}
_VAE_SIZES = {"layers_per_block": MAX_LAYERS, "norm_num_groups": MAX_CHANNELS, "in_channels": MAX_CHANNELS,
              "out_channels": MAX_CHANNELS}
_TEXT_SIZES = {"intermediate_size": 4 * MAX_CHANNELS, "num_hidden_layers": MAX_LAYERS,
               "num_attention_heads": MAX_CHANNELS, "vocab_size": MAX_VOCABULARY}


def _check_sizes(config: Config, sizes: dict[str, int]) -> None:
    for key, high in sizes.items():
        config.integers(key, 1, high, MAX_BLOCKS, None, scalar=True, nullable=True)


def _unet_fields(unet: Config) -> dict:
    blocks = unet.integers("block_out_channels", 1, MAX_CHANNELS, MAX_BLOCKS)
    _check_sizes(unet, _UNET_SIZES)
    optional = lambda key, high: unet.integer(key, 1, high, None, nullable=True)  # noqa: E731
    return dict(unet_in_channels=unet.integer("in_channels", 1, MAX_CHANNELS),
                unet_out_channels=unet.integer("out_channels", 1, MAX_CHANNELS),
                sample_size=_sample_size(unet), unet_downsample=2 ** (len(blocks) - 1),
                time_cond_proj_dim=optional("time_cond_proj_dim", MAX_CHANNELS),
                cross_attention_dim=optional("cross_attention_dim", MAX_CHANNELS),
                num_class_embeds=optional("num_class_embeds", MAX_CLASSES))


def _sample_size(unet: Config) -> int:
    size = unet.integers("sample_size", 1, MAX_SAMPLE_SIZE, 2, scalar=True)
    if isinstance(size, list) and (len(size) != 2 or size[0] != size[1]):
        raise ModelFormatError(f"{unet.source}: non-square sample_size {size} is not supported")
    return size[0] if isinstance(size, list) else size


def model_name(root: Path) -> str:
    """The directory's name, except for a training run's output (``runs/NAME/model`` with its
    training.json): there it is NAME, so default export paths (exports/NAME) and printed names tell runs
    apart instead of every run being called 'model'."""
    root = root.resolve()
    return root.parent.name if root.name == "model" and (root / "training.json").is_file() else root.name


def _unconditional_spec(root: Path, unet_dir: Path, sched: Path) -> ModelSpec:
    scheduler = _scheduler_config(sched)
    return ModelSpec(kind=UNCONDITIONAL, name=model_name(root), scheduler_config=scheduler,
                     scheduler_class=scheduler.get("_class_name", "DDPMScheduler"),
                     **_unet_fields(_config(unet_dir / "config.json")))


def _scheduler_config(path: Path) -> dict:
    scheduler = _config(path)
    check_scheduler_config(scheduler)
    return scheduler.data


def _text_to_image_spec(root: Path, sched: Path) -> ModelSpec:
    scheduler = _scheduler_config(sched)
    vae, text = _config(root / "vae" / "config.json"), _config(root / "text_encoder" / "config.json")
    vae_blocks = vae.integers("block_out_channels", 1, MAX_CHANNELS, MAX_BLOCKS)
    _check_sizes(vae, _VAE_SIZES)
    _check_sizes(text, _TEXT_SIZES)
    return ModelSpec(kind=TEXT_TO_IMAGE, name=model_name(root), scheduler_config=scheduler,
                     scheduler_class=scheduler.get("_class_name", "LCMScheduler"),
                     vae_scale_factor=2 ** (len(vae_blocks) - 1),
                     vae_scaling_factor=vae.number("scaling_factor", MIN_SCALING, MAX_SCALING, 0.18215),
                     vae_latent_channels=vae.integer("latent_channels", 1, MAX_CHANNELS),
                     tokenizer_max_length=_tokenizer_max_length(root, text),
                     text_hidden_size=text.integer("hidden_size", 1, MAX_CHANNELS),
                     default_guidance_scale=_default_guidance(root),
                     **_unet_fields(_config(root / "unet" / "config.json")))


UNSET_MAX_LENGTH = 10_000   # transformers writes a huge sentinel (1e30) as model_max_length when it is unset


def _tokenizer_max_length(root: Path, text: Config) -> int:
    """The tokenizer config's model_max_length, else (absent or transformers' 'unset') the text encoder's
    max_position_embeddings (77 when neither says)."""
    path = root / "tokenizer" / "tokenizer_config.json"
    if path.exists():
        tokenizer = _config(path)
        length = tokenizer.number("model_max_length", 1, math.inf, None, nullable=True)
        if length is not None and length <= UNSET_MAX_LENGTH:
            return tokenizer.integer("model_max_length", 1, MAX_TOKENS)
    return text.integer("max_position_embeddings", 1, MAX_TOKENS, 77)


GENERATION_DEFAULTS = "toolkit.json"
MAX_GUIDANCE = 100.0


def _default_guidance(root: Path) -> float | None:
    """A model's own default guidance scale: ``toolkit.json``'s {"generation": {"guidance_scale": x}}, written by
    ``toolkit train lcm`` / ``teacher`` (a model distilled for w in [1, 3] is sampled at 3, not LCM-Dreamshaper's
    8.5). Models without the file use the runtime's defaults."""
    if not (root / GENERATION_DEFAULTS).is_file():
        return None
    generation = _config(root / GENERATION_DEFAULTS).section("generation", {})
    return generation.number("guidance_scale", 0.0, MAX_GUIDANCE, None, nullable=True)
