"""The one interface every inference backend (torch, onnxruntime, tensorrt) implements.

The pipeline drives a backend through these methods only and never learns which one it is.
Arrays crossing this boundary are the backend's own array type (torch tensors, numpy arrays,
or device arrays), always float32 for latents/images at the boundary: a backend that runs its
network in fp16/bf16 casts inside, so the sampler arithmetic stays in float32.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, ClassVar

import numpy as np

from atdiff.runtime.devices import DeviceSupport, resolve_device
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.model_spec import ModelSpec


class BackendError(ToolkitError, RuntimeError):
    """A backend cannot do what was asked (missing package, missing GPU, wrong shape ...)."""


class Backend(abc.ABC):
    """A loaded model's networks on one device.

    Subclasses are constructed with ``load(source_dir, spec, device=..., dtype=..., **options)``
    and must be usable as context managers (``with backend: ...``) that free device memory on exit.
    """

    name: ClassVar[str]

    def __init__(self, spec: ModelSpec, device: str, dtype: str):
        self.spec = spec
        self.device = device
        self.dtype = dtype

    # ---- construction -------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(cls, source_dir, spec: ModelSpec, *, device: str, dtype: str, **options: Any) -> "Backend":
        """Load the networks named by ``spec`` from ``source_dir`` onto ``device``."""

    @classmethod
    def device_support(cls) -> DeviceSupport:
        """What this backend can run on (runtime/devices.py decides what ``device="auto"`` means from it)."""
        return DeviceSupport(cls.name, cuda=False, missing=f"the {cls.name} backend runs on the CPU only",
                             fix="pick another --backend")

    @classmethod
    def resolve_device(cls, device: str) -> str:
        """``device`` ('auto', 'cpu', 'cuda', 'cuda:N') checked for this backend: 'auto' becomes 'cuda' or 'cpu'
        (describe() then says which ran); a CUDA the backend cannot reach is an error naming the fix."""
        return resolve_device(device, cls.device_support)

    @classmethod
    def auto_dtype(cls, source_dir, device: str) -> str:
        """What dtype="auto" means: float32 on CPU, float16 on GPUs (a backend whose precision is
        fixed by its files, like an ONNX export, returns that)."""
        return "float32" if device == "cpu" else "float16"

    def session(self):
        """Context entered around one whole generation (e.g. torch.inference_mode); none by default."""
        return contextlib.nullcontext()

    # ---- array plumbing -----------------------------------------------------------------
    @abc.abstractmethod
    def from_numpy(self, array: np.ndarray) -> Any:
        """Copy a host array to this backend's device as its array type (dtype preserved)."""

    @abc.abstractmethod
    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy a backend array back to the host."""

    # ---- networks -----------------------------------------------------------------------
    def encode_text(self, input_ids: np.ndarray) -> Any:
        """Token ids [B, L] (int64, host) -> text encoder last hidden state [B, L, D] (float32)."""
        raise BackendError(f"backend '{self.name}' has no text encoder for a {self.spec.kind} model")

    @abc.abstractmethod
    def denoise(self, sample: Any, timestep: int, *, encoder_hidden_states: Any = None,
                timestep_cond: Any = None, class_labels: Any = None) -> Any:
        """One UNet evaluation. ``sample`` [B, C, H, W] float32, ``timestep`` one training-grid
        timestep shared by the batch; returns the raw model output (eps / v / x0 per the
        schedule's prediction_type) as float32 with the sample's shape."""

    def decode(self, latents: Any) -> Any:
        """VAE-decode *unscaled* latents (the pipeline already divided by the scaling factor)
        -> images [B, 3, H, W] float32 in about [-1, 1]."""
        raise BackendError(f"backend '{self.name}' has no VAE decoder for a {self.spec.kind} model")

    def synchronize(self) -> None:
        """Wait for queued device work (so phase timings are true); a no-op for synchronous backends."""

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Free device memory. Idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        """One line saying what actually runs (backend, device, dtype, provider ...)."""
        return f"{self.name} on {self.device} ({self.dtype})"
