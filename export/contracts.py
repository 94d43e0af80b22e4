"""The export contracts of a model's networks (the types are in runtime/contracts.py): which networks a model
has, their tensors, profiles and tolerances. The exporter, the validator and (through manifest.json) the ONNX
Runtime backend read them, so adding an exported network is one new contract here. numpy only."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from atdiff.runtime.contracts import (COMPONENT_ORDER, TEXT_ENCODER, UNET, VAE_DECODER, ExportContract, TensorSpec,
                               Tolerance)
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.model_spec import ModelSpec

__all__ = ["ExportShapes", "contracts_for", "select_components"]

@dataclasses.dataclass(frozen=True)
class ExportShapes:
    """The shapes an export supports: batch sizes (profile min = smallest, max = largest, opt = the
    first listed) and one image size in pixels (height/width stay dynamic in the ONNX graph; the
    profile pins them, which is what TensorRT and CUDA graphs want)."""
    batch_sizes: tuple[int, ...]
    height: int
    width: int

    @classmethod
    def for_spec(cls, spec: ModelSpec, batch_sizes: Sequence[int] = (1,), height: int | None = None,
                 width: int | None = None) -> "ExportShapes":
        if not batch_sizes or min(batch_sizes) < 1:
            raise ToolkitError(f"--batch-sizes must be positive integers like 1,8; got {list(batch_sizes)}")
        height = spec.default_resolution if height is None else int(height)
        width = spec.default_resolution if width is None else int(width)
        for name, value in (("height", height), ("width", width)):
            if value < spec.pixel_multiple or value % spec.pixel_multiple:
                raise ToolkitError(f"--{name} {value} is not a positive multiple of {spec.pixel_multiple}, "
                                   f"which model '{spec.name}' needs; try --{name} {spec.default_resolution}")
        return cls(tuple(int(b) for b in batch_sizes), height, width)

    def batch_profile(self, cfg_factor: int = 1) -> tuple[int, int, int]:
        """(min, opt, max) batch; with classifier-free guidance (cfg_factor 2) a batch of B images is a
        network batch of 2B, except when guidance is off (scale <= 1), hence min stays unscaled."""
        sizes = self.batch_sizes
        return (min(sizes), sizes[0] * cfg_factor, max(sizes) * cfg_factor)


# fp32 tolerances: ORT and PyTorch differ only in kernel order, ~1e-6 on tiny models and ~1e-4 on
# SD-size ones. fp16: 10 mantissa bits (rounding 4.9e-4 relative per op) accumulated over tens of layers;
# CLIP's hidden states reach ~30 in magnitude, so the text encoder needs a larger absolute bound.
_UNET_TOL = {"float32": Tolerance(1e-3, 1e-3), "float16": Tolerance(2e-2, 2e-2)}
_TEXT_TOL = {"float32": Tolerance(1e-3, 1e-3), "float16": Tolerance(5e-2, 2e-2)}
_VAE_TOL = {"float32": Tolerance(2e-3, 1e-3), "float16": Tolerance(2e-2, 2e-2)}
VAE_FP32_NOTE = ("kept in float32: Stable Diffusion's VAE decoder overflows float16 in its up-blocks "
                 "(NaN / black images), and it runs once per image, so fp32 costs little")
TEXT_FP32_NOTE = ("kept in float32: it runs once per prompt batch, and transformers' CLIP traced in float16 "
                  "(transformers 5, torch.onnx legacy exporter) mixes float/float16 inputs of "
                  "LayerNormalization, which ONNX Runtime rejects")


def contracts_for(spec: ModelSpec, shapes: ExportShapes, vocab_size: int | None = None) -> dict[str, ExportContract]:
    """The contracts of every network ``spec`` has (unet; plus text_encoder and vae_decoder for
    text-to-image models), in float32; ``with_precision('float16')`` gives the fp16 export's."""
    if not spec.is_latent:
        return {UNET: _pixel_unet(spec, shapes)}
    # Without LCM's guidance embedding the pipeline runs classifier-free guidance as one batch of 2B.
    cfg = 1 if spec.time_cond_proj_dim else 2
    return {TEXT_ENCODER: _text_encoder(spec, shapes, cfg, vocab_size or 49408),
            UNET: _latent_unet(spec, shapes, cfg), VAE_DECODER: _vae_decoder(spec, shapes)}


def _timestep(spec: ModelSpec) -> TensorSpec:
    # float32 [1] as in NVIDIA's TensorRT diffusion demo; one timestep shared by the batch (the
    # UNet broadcasts it). Stays float32 in fp16 exports: diffusers computes the sinusoidal
    # embedding in float32 and casts after.
    steps = int(spec.scheduler_config.get("num_train_timesteps", 1000))
    return TensorSpec("timestep", "float32", (1,), fill="timestep", high=steps, follows_precision=False)


def _latent_dims(spec: ModelSpec, shapes: ExportShapes, batch: tuple[int, int, int]) -> dict:
    f = spec.vae_scale_factor
    return {"batch": batch, "latent_height": (shapes.height // f,) * 3, "latent_width": (shapes.width // f,) * 3}


def _latent_unet(spec: ModelSpec, shapes: ExportShapes, cfg: int) -> ExportContract:
    latent = ("batch", spec.unet_in_channels, "latent_height", "latent_width")
    inputs = [TensorSpec("sample", "float32", latent), _timestep(spec),
              TensorSpec("encoder_hidden_states", "float32",
                         ("batch", spec.tokenizer_max_length, spec.cross_attention_dim))]
    if spec.time_cond_proj_dim:
        inputs.append(TensorSpec("timestep_cond", "float32", ("batch", spec.time_cond_proj_dim), fill="guidance"))
    output = TensorSpec("model_output", "float32", ("batch", spec.unet_out_channels, "latent_height", "latent_width"))
    return ExportContract(UNET, tuple(inputs), (output,), _latent_dims(spec, shapes, shapes.batch_profile(cfg)),
                          _UNET_TOL)


def _pixel_unet(spec: ModelSpec, shapes: ExportShapes) -> ExportContract:
    inputs = [TensorSpec("sample", "float32", ("batch", spec.unet_in_channels, "height", "width")), _timestep(spec)]
    if spec.num_class_embeds:
        inputs.append(TensorSpec("class_labels", "int64", ("batch",), fill="class_label", high=spec.num_class_embeds,
                                 follows_precision=False))
    output = TensorSpec("model_output", "float32", ("batch", spec.unet_out_channels, "height", "width"))
    dims = {"batch": shapes.batch_profile(), "height": (shapes.height,) * 3, "width": (shapes.width,) * 3}
    return ExportContract(UNET, tuple(inputs), (output,), dims, _UNET_TOL)


def _text_encoder(spec: ModelSpec, shapes: ExportShapes, cfg: int, vocab_size: int) -> ExportContract:
    ids = TensorSpec("input_ids", "int64", ("batch", spec.tokenizer_max_length), fill="token_ids", high=vocab_size,
                     follows_precision=False)
    hidden = TensorSpec("last_hidden_state", "float32", ("batch", spec.tokenizer_max_length, spec.text_hidden_size))
    return ExportContract(TEXT_ENCODER, (ids,), (hidden,), {"batch": shapes.batch_profile(cfg)}, _TEXT_TOL,
                          fp16=False, note=TEXT_FP32_NOTE)


def _vae_decoder(spec: ModelSpec, shapes: ExportShapes) -> ExportContract:
    f = spec.vae_scale_factor
    latent = TensorSpec("latent", "float32", ("batch", spec.vae_latent_channels, "latent_height", "latent_width"))
    images = TensorSpec("images", "float32", ("batch", 3, f"latent_height*{f}", f"latent_width*{f}"))
    return ExportContract(VAE_DECODER, (latent,), (images,), _latent_dims(spec, shapes, shapes.batch_profile()),
                          _VAE_TOL, fp16=False, note=VAE_FP32_NOTE)


def select_components(spec: ModelSpec, contracts: dict[str, ExportContract],
                      components: Sequence[str] | None) -> dict[str, ExportContract]:
    """The contracts named by --components (all by default), in a fixed order; unknown names are errors."""
    if not components:
        return contracts
    unknown = [c for c in components if c not in contracts]
    if unknown:
        raise ToolkitError(f"--components {','.join(unknown)} not in this {spec.kind} model; "
                           f"choose from {','.join(contracts)}")
    return {name: contracts[name] for name in COMPONENT_ORDER if name in components}
