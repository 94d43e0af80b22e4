"""The PyTorch networks behind each export contract, as modules whose positional inputs are the contract's
inputs in order and whose single output is the contract's output.

Loading goes through the runtime's TorchBackend (one model-loading path for the project); this file only
adapts each network's call convention to the contract so ``torch.onnx.export`` and the validator's
reference run call them identically.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from atdiff.runtime.contracts import TEXT_ENCODER, UNET, VAE_DECODER, ExportContract
from atdiff.runtime.backends.torch_backend import TorchBackend
from atdiff.runtime.model_source import ModelSource
from atdiff.runtime.model_spec import ModelSpec

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# How each network is called with the contract's named inputs (keyword names = diffusers' own).
_CALLS: dict[str, Callable] = {
    UNET: lambda net, **inputs: net(**inputs, return_dict=False)[0],
    TEXT_ENCODER: lambda net, input_ids: net(input_ids=input_ids).last_hidden_state,
    VAE_DECODER: lambda net, latent: net.decode(latent, return_dict=False)[0],
}


class ContractModule(torch.nn.Module):
    def __init__(self, network: torch.nn.Module, contract: ExportContract):
        super().__init__()
        self.network = network
        self.names = contract.input_names()
        self.call = _CALLS[contract.component]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.call(self.network, **dict(zip(self.names, inputs)))


def load_networks(source_dir: str | Path, spec: ModelSpec, device: str = "cpu") -> dict[str, torch.nn.Module]:
    """The source model's networks in float32 on ``device``, keyed by component name."""
    backend = TorchBackend.load(source_dir, spec, device=device, dtype="float32")
    networks = {UNET: backend.unet}
    if spec.is_latent:
        networks.update({TEXT_ENCODER: backend.text_encoder, VAE_DECODER: backend.vae})
    return networks


@contextlib.contextmanager
def reference_pipeline(source: ModelSource, networks: dict[str, torch.nn.Module]) -> Iterator:
    """The float32 torch ``Pipeline`` on the CPU over ``networks`` (``load_networks``'s, already in memory): what
    ``Pipeline.load(source.path, backend="torch", device="cpu", dtype="float32")`` builds, without reading the
    weights again. Networks on another device (an export traced on CUDA) are moved to the CPU for the run and
    back afterwards, so the reference is the CPU's whatever the export's --device."""
    from atdiff.runtime.pipeline import Pipeline
    dtypes = {name: next(net.parameters()).dtype for name, net in networks.items()}
    if any(dtype != torch.float32 for dtype in dtypes.values()):
        raise ValueError(f"the end-to-end reference runs float32 networks, not {dtypes}")
    devices = {name: next(net.parameters()).device for name, net in networks.items()}
    moved = [name for name, device in devices.items() if device.type != "cpu"]
    try:
        for name in moved:
            networks[name].to("cpu")
        backend = TorchBackend.from_modules(source.spec, networks[UNET], networks.get(TEXT_ENCODER),
                                            networks.get(VAE_DECODER))
        with Pipeline(source, backend) as pipe:
            yield pipe
    finally:
        for name in moved:
            networks[name].to(devices[name])


def contract_module(network: torch.nn.Module, contract: ExportContract) -> ContractModule:
    """``network`` wrapped for ``contract``, converted to its precision (a copy when that changes the dtype,
    so the float32 network stays available as the validation reference)."""
    dtype = _TORCH_DTYPES[contract.precision]
    if next(network.parameters()).dtype != dtype:
        network = copy.deepcopy(network)
        # diffusers' ModelMixin.to warns "modules that should be kept in float32: []" on every dtype cast, even
        # with none to keep (diffusers 0.42); plain nn.Module.to casts the same way without that noise.
        cast = type(network).to if getattr(network, "_keep_in_fp32_modules", None) else torch.nn.Module.to
        network = cast(network, dtype)
    return ContractModule(network, contract).eval()


def to_torch(inputs: dict[str, np.ndarray], device: str | torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in inputs.values())


@torch.inference_mode()
def reference_outputs(network: torch.nn.Module, contract: ExportContract, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 PyTorch output for ``inputs`` (cast to float32 first, so fp16 exports are compared
    against the full-precision model on the very same input values)."""
    device = next(network.parameters()).device
    as_fp32 = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in inputs.items()}
    module = ContractModule(network, contract)
    return module(*to_torch(as_fp32, device)).float().cpu().numpy()
