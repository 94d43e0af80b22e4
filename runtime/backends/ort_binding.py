"""IO binding for the onnxruntime backend: preallocated input/output buffers bound by address.

One design serves both array types the backend can hand to the samplers:
  - ``NumpyArrays``: the boundary is host numpy; buffers are ``OrtValue``s on the bound device, so on CUDA the
    latents cross PCIe twice per step (in and out).
  - ``TorchArrays``: the boundary is torch tensors on the backend's device; buffers are torch tensors, so on
    CUDA the latents never leave the GPU (only the step's scalar timestep is copied in from the host).
Either way a runner keeps one ``BoundBuffers`` per input-shape signature, copies each call's inputs into it
(casting to the graph's dtypes, e.g. float16) and runs on the same addresses, which is what CUDA graph
replay needs. Outputs are copied out of the buffers as float32, so a value the sampler holds is never
overwritten by the next call.

Threads: the copy-in / run / copy-out of one call holds that buffer set's lock, so calls of one shape from
many threads take turns on the shared buffers (they would contend for the device anyway, and a per-call
buffer set would break CUDA graph replay, which needs fixed addresses); calls of different shapes use
different buffer sets and run side by side. Without the lock, 8 threads got 7 wrong images (issue 12).

torch is imported only when ``TorchArrays`` is constructed, so serving with numpy never needs it.
"""
from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from atdiff.runtime.backends.base import BackendError
from atdiff.runtime.contracts import ExportContract, bind_dims, resolve_shape

TORCH_HINT = "pip install torch (a CUDA build for device cuda, see https://pytorch.org/get-started)"


class NumpyArrays:
    """Host numpy arrays at the boundary; bound buffers are OrtValues on ``(device_type, device_id)``."""

    name = "numpy"

    def __init__(self, device_type: str, device_id: int):
        self.device_type, self.device_id = device_type, device_id

    def from_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(array)

    def allocate(self, shape: tuple, dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device_type, self.device_id)

    def write(self, buffer: ort.OrtValue, value, dtype) -> None:
        buffer.update_inplace(np.ascontiguousarray(value, dtype=dtype))

    def read(self, buffer: ort.OrtValue) -> np.ndarray:
        out = buffer.numpy()  # a host copy already
        return out.astype(np.float32) if np.issubdtype(out.dtype, np.floating) else out

    def before_run(self) -> None:
        """update_inplace is synchronous: nothing to wait for."""

    def synchronize(self) -> None:
        """numpy work is synchronous."""


class TorchArrays:
    """torch tensors on the backend's device at the boundary; bound buffers are torch tensors there."""

    name = "torch"

    def __init__(self, device_type: str, device_id: int):
        torch = import_torch(device_type)
        self.torch, self.device_type, self.device_id = torch, device_type, device_id
        self.device = torch.device("cuda", device_id) if device_type == "cuda" else torch.device("cpu")

    def from_numpy(self, array: np.ndarray):
        return self.torch.tensor(np.asarray(array), device=self.device)  # always a copy, dtype kept

    def to_numpy(self, array) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array
        return array.detach().to("cpu", copy=True).numpy()  # a copy even on CPU: never a view of a buffer

    def allocate(self, shape: tuple, dtype):
        torch_dtype = getattr(self.torch, np.dtype(dtype).name)
        return self.torch.empty(tuple(shape), dtype=torch_dtype, device=self.device)

    def write(self, buffer, value, dtype) -> None:
        if isinstance(value, np.ndarray):  # token ids and the timestep come from the host
            value = self.torch.from_numpy(np.ascontiguousarray(value))
        buffer.copy_(value)  # casts (float32 -> float16 for fp16 exports) and moves in one kernel

    def read(self, buffer):
        return buffer.to(self.torch.float32, copy=True) if buffer.is_floating_point() else buffer.clone()

    def before_run(self) -> None:
        # ORT's CUDA EP runs on its own stream: wait for the copies into the bound buffers (queued on
        # torch's stream) before ORT reads them. ORT synchronizes its stream when run_with_iobinding
        # returns, so the outputs are complete before torch reads them. Sharing one stream instead
        # (user_compute_stream) would not work with cuda_graph: graphs cannot be captured on the legacy
        # default stream torch uses.
        if self.device_type == "cuda":
            self.torch.cuda.current_stream(self.device).synchronize()

    def synchronize(self) -> None:
        if self.device_type == "cuda":
            self.torch.cuda.synchronize(self.device)


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def import_torch(device_type: str):
    """torch, able to reach ``device_type``; a BackendError naming the fix otherwise."""
    torch = _torch_or_none()
    if torch is None:
        raise BackendError(f"arrays='torch' needs torch, which is not installed; {TORCH_HINT}, "
                           "or pass arrays='numpy'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"arrays='torch' on cuda needs a CUDA build of torch (torch {torch.__version__} sees "
                           f"no GPU); {TORCH_HINT}, or pass arrays='numpy'")
    return torch


def torch_cuda_usable() -> bool:
    """Whether the default for device cuda can be arrays='torch' (torch importable and seeing a GPU)."""
    torch = _torch_or_none()
    return torch is not None and torch.cuda.is_available()


def make_arrays(arrays: str | None, device_type: str, device_id: int | None):
    """The array adapter asked for; ``None`` picks torch on CUDA when torch can use the GPU, else numpy."""
    if arrays is None:
        arrays = "torch" if device_type == "cuda" and torch_cuda_usable() else "numpy"
    if arrays not in ADAPTERS:
        raise BackendError(f"arrays '{arrays}' is not one of {', '.join(ADAPTERS)}")
    return ADAPTERS[arrays](device_type, device_id or 0)


ADAPTERS = {"numpy": NumpyArrays, "torch": TorchArrays}


class BoundBuffers:
    """Input and output buffers for one input-shape signature, allocated once and bound by address (fixed
    addresses are what CUDA graph replay needs). Outputs are sized from the contract's derived dims."""

    def __init__(self, session: ort.InferenceSession, contract: ExportContract, feed: dict, arrays,
                 types: tuple[dict, dict], graph_id: int | None):
        input_types, output_types = types
        dims = bind_dims(contract.inputs, feed)
        self.binding = session.io_binding()
        self.inputs = {name: self._bind(arrays, self.binding.bind_input, name, tuple(value.shape), input_types[name])
                       for name, value in feed.items()}
        self.outputs = {}
        for tensor in contract.outputs:
            name = tensor.name
            shape = resolve_shape(tensor.shape, dims)
            self.outputs[name] = self._bind(arrays, self.binding.bind_output, name, shape, output_types[name])
        self.lock = threading.Lock()   # one call at a time on these addresses (see the module docstring)
        self.run_options = ort.RunOptions()
        if graph_id is not None:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    @staticmethod
    def _bind(arrays, bind, name: str, shape: tuple, dtype):
        # bind_input and bind_output take the same (name, device, id, type, shape, pointer) arguments
        buffer = arrays.allocate(shape, dtype)
        bind(name, arrays.device_type, arrays.device_id, dtype, list(shape), buffer.data_ptr())
        return buffer


def run_bound(session: ort.InferenceSession, buffers: BoundBuffers, feed: dict, arrays, input_types: dict) -> dict:
    """Copy ``feed`` into the bound inputs, run, and return float32 copies of the outputs (atomically per
    buffer set: another thread's call cannot write the inputs or read the outputs in between)."""
    with buffers.lock:
        for name, value in feed.items():
            arrays.write(buffers.inputs[name], value, input_types[name])
        arrays.before_run()
        session.run_with_iobinding(buffers.binding, buffers.run_options)
        return {name: arrays.read(buffer) for name, buffer in buffers.outputs.items()}
