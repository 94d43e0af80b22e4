"""Export one network to ONNX from its contract, with the legacy TorchScript exporter.

``torch.onnx.export(..., dynamo=False)`` exports diffusers UNets in about a second and matches ONNX Runtime
to ~1e-6; the dynamo exporter needs Dim objects for every dynamic axis and was ~10x slower (see
../shared/ASSETS.md). Networks whose weights approach protobuf's 2 GiB limit (an SD-1.5 UNet in fp32 is
3.4 GB) are saved with ONNX external data: one ``model.onnx.data`` file beside ``model.onnx``.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from atdiff.runtime.contracts import ExportContract
from atdiff.export.torch_modules import contract_module, to_torch

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention and the UNets' ops need opset 14+
# protobuf cannot serialise a message over 2 GiB; switch to external data well before the limit,
# leaving room for the graph itself.
EXTERNAL_DATA_BYTES = int(0.9 * (2**31 - 1))


def export_network(network: torch.nn.Module, contract: ExportContract, path: Path, opset: int,
                   seed: int = 0, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """Trace ``network`` on the contract's 'opt' sample inputs and write ``path`` (plus ``path.data`` when its
    weights exceed ``external_data_bytes``); returns the files written. The written model passes onnx.checker."""
    module = contract_module(network, contract)
    device = next(module.parameters()).device
    args = to_torch(contract.sample_inputs("opt", seed), device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        traced = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.inference_mode():
            # TracerWarnings flag Python branches on shapes (diffusers' upsample-size check); the
            # contract's profiles keep every shape on the traced branch (sizes are multiples of the
            # UNet's downsampling), and validation runs each profile point to confirm it.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(traced), input_names=contract.input_names(),
                              output_names=contract.output_names(), dynamic_axes=contract.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(traced))  # also pulls in tensors the exporter wrote as external files
    return save_onnx(model, path, external_data_bytes)


def save_onnx(model: onnx.ModelProto, path: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """``model`` as one file, or with its weights in ``path.data`` when they exceed ``external_data_bytes``
    (above ~2 GiB it must: protobuf cannot serialise the message)."""
    if external_data_bytes > EXTERNAL_DATA_BYTES:
        raise ValueError(f"external_data_bytes {external_data_bytes} is above protobuf's limit ({EXTERNAL_DATA_BYTES})")
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > external_data_bytes:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        written = [path, data]
    else:
        onnx.save_model(model, str(path))
        written = [path]
    onnx.checker.check_model(str(path))  # by path: works for models with external data too
    return written
