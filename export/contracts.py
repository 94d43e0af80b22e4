"""One export contract per network: what crosses the ONNX boundary and how to check it.

A contract names each input/output (as the diffusers ``forward`` argument it feeds), its dtype and
shape with dynamic dims, the min/opt/max of each dynamic dim (TensorRT optimisation profiles), a
sample-input factory and validation tolerances. The exporter, the validator, the ONNX Runtime backend
(through the copy stored in manifest.json) and the TensorRT builder all read it, so adding an exported
network is one new contract here. numpy only: nothing in this file needs torch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from runtime.errors import ToolkitError
from runtime.export_manifest import resolve_shape
from runtime.guidance import guidance_scale_embedding
from runtime.model_spec import ModelSpec

UNET, TEXT_ENCODER, VAE_DECODER = "unet", "text_encoder", "vae_decoder"
COMPONENT_ORDER = (TEXT_ENCODER, UNET, VAE_DECODER)
POINTS = ("min", "opt", "max")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # numpy dtype name: float32 | float16 | int64
    shape: tuple                     # ints, dim symbols ("batch"), or "symbol*k" (outputs only)
    fill: str = "normal"             # sample factory: normal | timestep | guidance | token_ids | class_label
    high: int | None = None          # exclusive upper bound for integer fills
    follows_precision: bool = True   # float tensor that becomes float16 in an fp16 export


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass when |ort - torch| <= atol + rtol * |torch| elementwise (numpy.allclose semantics); the
    reference is always the fp32 PyTorch model, so fp16 tolerances cover fp16 rounding error."""
    atol: float
    rtol: float


@dataclasses.dataclass(frozen=True)
class ExportContract:
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict                        # dim symbol -> (min, opt, max)
    tolerances: dict                  # precision -> Tolerance
    fp16: bool = True                 # whether an --fp16 export runs this network in float16
    precision: str = "float32"
    note: str = ""                    # why a network stays fp32, shown in the manifest and docs

    def with_precision(self, precision: str) -> "ExportContract":
        """This contract as exported in ``precision`` (networks with fp16=False stay float32)."""
        precision = precision if self.fp16 else "float32"
        cast = lambda t: dataclasses.replace(t, dtype=precision) if t.follows_precision else t  # noqa: E731
        return dataclasses.replace(self, precision=precision, inputs=tuple(map(cast, self.inputs)),
                                   outputs=tuple(map(cast, self.outputs)))

    @property
    def tolerance(self) -> Tolerance:
        return self.tolerances[self.precision]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's ``dynamic_axes``: every non-integer dim of every tensor."""
        return {t.name: {i: str(d) for i, d in enumerate(t.shape) if not isinstance(d, int)}
                for t in self.inputs + self.outputs if any(not isinstance(d, int) for d in t.shape)}

    def dim_values(self, point: str) -> dict[str, int]:
        return {name: int(bounds[POINTS.index(point)]) for name, bounds in self.dims.items()}

    def shapes(self, point: str) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes at a profile point ('min' | 'opt' | 'max'): TensorRT profiles use these."""
        dims = self.dim_values(point)
        return {t.name: resolve_shape(t.shape, dims) for t in self.inputs}

    def distinct_points(self) -> list[str]:
        """The profile points with different shapes (validation checks each one once)."""
        seen, points = set(), []
        for point in POINTS:
            key = tuple(sorted(self.dim_values(point).items()))
            if key not in seen:
                seen.add(key)
                points.append(point)
        return points

    def sample_inputs(self, point: str = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic example inputs at a profile point, in the contract's dtypes."""
        rng = np.random.default_rng(seed)
        shapes = self.shapes(point)
        return {t.name: _fill(t, shapes[t.name], rng) for t in self.inputs}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["dims"] = {k: list(v) for k, v in self.dims.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ExportContract":
        tensors = lambda items: tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in items)  # noqa: E731
        return cls(component=data["component"], inputs=tensors(data["inputs"]), outputs=tensors(data["outputs"]),
                   dims={k: tuple(v) for k, v in data["dims"].items()},
                   tolerances={k: Tolerance(**v) for k, v in data["tolerances"].items()},
                   fp16=data["fp16"], precision=data["precision"], note=data.get("note", ""))


def _fill(tensor: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if tensor.fill == "normal":
        return rng.standard_normal(shape, dtype=np.float32).astype(tensor.dtype)
    if tensor.fill == "timestep":
        return np.full(shape, rng.integers(0, tensor.high), dtype=tensor.dtype)
    if tensor.fill == "guidance":  # a real LCM w-embedding (w in LCM's usual range), not random numbers
        return guidance_scale_embedding(float(rng.uniform(2.0, 12.0)), shape[1], shape[0]).astype(tensor.dtype)
    if tensor.fill in ("token_ids", "class_label"):
        return rng.integers(0, tensor.high, size=shape).astype(tensor.dtype)
    raise ValueError(f"unknown sample fill '{tensor.fill}' for {tensor.name}")


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
