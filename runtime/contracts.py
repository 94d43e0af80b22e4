"""The export contract types: what crosses the ONNX boundary of one network, as manifest.json stores it.

A contract names each input/output (as the diffusers ``forward`` argument it feeds), its dtype and shape with
dynamic dims, the min/opt/max of each dynamic dim (TensorRT optimisation profiles), a sample-input factory and
validation tolerances. It is the one thing the serving side reads: ``ExportManifest.contract(name)`` returns
it typed, and the ONNX Runtime backend builds its feeds and reads its outputs from it. export/contracts.py
builds them for a model. numpy only.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from atdiff.runtime.config_checks import MAX_RESOLUTION, MAX_VOCABULARY, REQUIRED, Config, is_int
from atdiff.runtime.guidance import guidance_scale_embedding
from atdiff.runtime.model_spec import ModelFormatError

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

    def feed(self, given: dict, cast: bool = False) -> dict:
        """The network's inputs from ``given`` (the diffusers ``forward`` arguments by name; None = not given):
        exactly the tensors this contract names, a scalar (the timestep) as its [1] tensor, and with ``cast`` host
        arrays in the contract's dtypes. A missing input or an unexpected one means the export does not match the
        model (the error says to re-export)."""
        names = self.input_names()
        unexpected = sorted(k for k, v in given.items() if v is not None and k not in names)
        missing = [t.name for t in self.inputs if given.get(t.name) is None]
        if unexpected or missing:
            raise ModelFormatError(f"network inputs mismatch for the exported {self.component}: missing {missing}, "
                                   f"unexpected {unexpected}; the export does not match this model's conditioning: "
                                   "re-run 'toolkit export'")
        feed = {}
        for tensor in self.inputs:
            value = given[tensor.name]
            if np.isscalar(value):
                value = np.array([value], dtype=tensor.dtype)
            feed[tensor.name] = np.asarray(value, dtype=tensor.dtype) if cast else value
        return feed

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["dims"] = {k: list(v) for k, v in self.dims.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict | Config) -> "ExportContract":
        """The contract manifest.json stores (``to_dict``); given as a ``Config`` (what read_manifest passes), every
        field is typed and bounded first, the error naming the manifest and the key."""
        if isinstance(data, Config):
            return _checked_contract(data)
        tensors = lambda items: tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in items)  # noqa: E731
        return cls(component=data["component"], inputs=tensors(data["inputs"]), outputs=tensors(data["outputs"]),
                   dims={k: tuple(v) for k, v in data["dims"].items()},
                   tolerances={k: Tolerance(**v) for k, v in data["tolerances"].items()},
                   fp16=data["fp16"], precision=data["precision"], note=data.get("note", ""))


# Bounds on a stored contract: profile dims (batch, latent or pixel sides) and tensor sizes at the profile's max,
# which export validation allocates as sample inputs and a backend as buffers.
MAX_PROFILE_DIM = MAX_RESOLUTION
MAX_TENSOR_ELEMENTS = 2 ** 28          # 1 GiB of float32 (Stable Diffusion's largest, the VAE output: 25M at 8x1024)
MAX_TENSORS, MAX_RANK, MAX_DIM_FACTOR = 16, 8, 64
DTYPES = ("float32", "float16", "int64", "int32")
FILLS = ("normal", "timestep", "guidance", "token_ids", "class_label")
PRECISIONS = ("float32", "float16")
_DIM_SYMBOL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,63})(?:\*([1-9][0-9]{0,2}))?$")


def _checked_contract(contract: Config) -> ExportContract:
    dims = contract.section("dims")
    if len(dims.data) > MAX_TENSORS:
        raise contract.error("dims", dims.data, f"at most {MAX_TENSORS} dims")
    bounds = {name: _profile(dims, name) for name in dims.data}
    tolerances = contract.section("tolerances")
    built = ExportContract(
        component=contract.text("component"), inputs=_tensors(contract, "inputs", bounds),
        outputs=_tensors(contract, "outputs", bounds), dims=bounds,
        tolerances={p: _tolerance(tolerances.section(p)) for p in PRECISIONS if p in tolerances.data},
        fp16=contract.flag("fp16"), precision=contract.text("precision", choices=PRECISIONS),
        note=contract.text("note", "", max_length=2000))
    if built.precision not in built.tolerances:
        raise tolerances.error(built.precision, REQUIRED, "the tolerance of the contract's precision")
    for tensor in built.inputs + built.outputs:
        elements = int(np.prod(resolve_shape(tensor.shape, built.dim_values("max")), dtype=object))
        if elements > MAX_TENSOR_ELEMENTS:
            raise ModelFormatError(f"{contract.source}: tensor '{tensor.name}' of '{contract.prefix.rstrip('.')}' has "
                                   f"{elements} elements at the profile's max, over {MAX_TENSOR_ELEMENTS}; "
                                   f"{contract.fix}")
    return built


def _profile(dims: Config, name: str) -> tuple[int, int, int]:
    bounds = dims.integers(name, 1, MAX_PROFILE_DIM, 3)
    if not _DIM_SYMBOL.match(name) or len(bounds) != 3 or not bounds[0] <= bounds[1] <= bounds[2]:
        raise dims.error(name, bounds, f"[min, opt, max] with 1 <= min <= opt <= max <= {MAX_PROFILE_DIM}, "
                                       "named by a plain identifier")
    return tuple(bounds)


def _tensors(contract: Config, key: str, dims: dict) -> tuple[TensorSpec, ...]:
    items = contract.data.get(key)
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_TENSORS or not all(isinstance(t, dict) for t in items):
        raise contract.error(key, items if key in contract.data else REQUIRED,
                             f"a list of 1 to {MAX_TENSORS} tensor objects")
    return tuple(_tensor(dataclasses.replace(contract, data=t, prefix=f"{contract.prefix}{key}[{i}]."), dims)
                 for i, t in enumerate(items))


def _tensor(tensor: Config, dims: dict) -> TensorSpec:
    shape = tensor.data.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_dim_ok(d, dims) for d in shape):
        raise tensor.error("shape", shape if "shape" in tensor.data else REQUIRED,
                           f"a list of at most {MAX_RANK} dims, each an integer in 1..{MAX_PROFILE_DIM} or a symbol "
                           f"of 'dims' (optionally '*k', k <= {MAX_DIM_FACTOR})")
    return TensorSpec(name=tensor.text("name"), dtype=tensor.text("dtype", choices=DTYPES), shape=tuple(shape),
                      fill=tensor.text("fill", "normal", choices=FILLS),
                      high=tensor.integer("high", 1, MAX_VOCABULARY, None, nullable=True),
                      follows_precision=tensor.flag("follows_precision", True))


def _dim_ok(dim, dims: dict) -> bool:
    if is_int(dim):
        return 1 <= dim <= MAX_PROFILE_DIM
    match = _DIM_SYMBOL.match(dim) if isinstance(dim, str) else None
    return bool(match) and match.group(1) in dims and int(match.group(2) or 1) <= MAX_DIM_FACTOR


def _tolerance(tolerance: Config) -> Tolerance:
    return Tolerance(atol=tolerance.number("atol", 0.0, 1e3), rtol=tolerance.number("rtol", 0.0, 1e3))


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


def resolve_shape(shape, dims: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape of a contract tensor: ints stay, a dim symbol ('batch') takes its value from
    ``dims``, and 'symbol*k' (an output dim derived from an input dim, e.g. the VAE's
    'latent_height*8') is that value times k. Lets a backend preallocate outputs before running."""
    out = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
            continue
        symbol, _, factor = str(dim).partition("*")
        if symbol not in dims:
            raise ModelFormatError(f"contract dim '{dim}' is not bound by any input; re-run 'toolkit export'")
        out.append(dims[symbol] * (int(factor) if factor else 1))
    return tuple(out)


def bind_dims(inputs, arrays: dict) -> dict[str, int]:
    """The value of every dim symbol, read off the actual input arrays (``inputs``: a contract's TensorSpecs)."""
    dims: dict[str, int] = {}
    for tensor in inputs:
        if tensor.name not in arrays:
            continue
        for dim, size in zip(tensor.shape, arrays[tensor.name].shape):
            if isinstance(dim, str):
                dims.setdefault(dim, int(size))
    return dims
