"""PyTorch backend: the diffusers networks run eagerly (fp32 / fp16 / bf16, optional channels_last and
torch.compile). The only place in runtime/ that imports torch or diffusers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from atdiff.runtime.backends.base import Backend, BackendError
from atdiff.runtime.config_checks import Config, read_json_object
from atdiff.runtime.devices import DeviceSupport, resolve_device
from atdiff.runtime.errors import unreadable_weights
from atdiff.runtime.model_source import MANIFEST
from atdiff.runtime.model_spec import MODEL_FIX, ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device_support() -> DeviceSupport:
    """Whether torch can use CUDA here (what --device auto and cuda are checked against)."""
    cuda = torch.cuda.is_available()
    return DeviceSupport("torch", cuda, torch.cuda.device_count() if cuda else 0,
                         missing=f"torch {torch.__version__} sees no CUDA GPU", fix="install a CUDA build of torch")


def torch_device(device: str) -> torch.device:
    """``device`` (auto | cpu | cuda | cuda:N) as torch's; asking for CUDA without one is an error, never a silent
    CPU run (runtime/devices.py)."""
    return torch.device(resolve_device(device, device_support))


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in _DTYPES:
        raise BackendError(f"unknown dtype '{dtype}'; choose one of {', '.join(_DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise BackendError("float16 inference needs a GPU; on CPU use --dtype float32 or bfloat16")
    return _DTYPES[dtype]


# What diffusers / transformers raise when a config.json's values cannot build the network ("down_block_types":
# ["Bogus"], a head count that does not divide the width, shapes that do not match the weights): the sizes were
# bounded by runtime/model_spec.py before, so these are configs that are well-formed but not a network.
_CONFIG_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, ZeroDivisionError)


def _built(network_cls, folder: Path, **kwargs) -> torch.nn.Module:
    """``network_cls.from_pretrained(folder)``, a config that does not build the network being one BackendError
    naming the folder's config.json (unreadable weights pass through: the CLI names the weights file)."""
    try:
        network, info = network_cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    except _CONFIG_ERRORS as exc:
        if unreadable_weights(exc) is not None:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BackendError(f"{network_cls.__name__} could not be built from {folder / 'config.json'} "
                           f"({type(exc).__name__}: {first}); {MODEL_FIX}") from None
    _refuse_missing_weights(network_cls, folder, info)
    return network


def _refuse_missing_weights(network_cls, folder: Path, info: dict) -> None:
    """transformers and diffusers start a weight the checkpoint lacks at random and only log it; a model that
    silently runs on random weights is worse than an error. Seen: transformers 5 saves CLIPTextModel without the
    ``text_model.`` prefix of the hub's checkpoints, and transformers 4.x then loads none of its weights."""
    missing = list(info.get("missing_keys") or [])
    if missing:
        import transformers
        raise BackendError(f"{folder} lacks {len(missing)} of {network_cls.__name__}'s weights (first: {missing[0]}); "
                           f"they would run at random. With transformers {transformers.__version__}: a checkpoint "
                           "saved by transformers >= 5 needs transformers >= 5 (pip install -U transformers), or "
                           "re-save it with the hub's key names; else the checkpoint is incomplete: re-copy it")


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def device_support(cls) -> DeviceSupport:
        return device_support()

    @classmethod
    def load(cls, source_dir, spec: ModelSpec, *, device: str, dtype: str, channels_last: bool = False,
             compile: bool = False, **options: Any) -> "TorchBackend":
        if options:
            raise BackendError(f"the torch backend has no option(s) {sorted(options)}; "
                               "it takes channels_last=true|false and compile=true|false")
        if (Path(source_dir) / MANIFEST).is_file():  # diffusers would fail on it with a bare OSError
            raise BackendError(f"{source_dir} is an ONNX export; the torch backend runs the diffusers directory "
                               "it was exported from (manifest.json's source.path), or pass --backend onnxruntime")
        backend = cls(spec, cls.resolve_device(device), dtype)   # 'auto' -> what describe() names
        backend._load(Path(source_dir), channels_last, compile)
        return backend

    @classmethod
    def from_modules(cls, spec: ModelSpec, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                     vae: torch.nn.Module | None = None) -> "TorchBackend":
        """A backend over networks already loaded (another TorchBackend's, or export/torch_modules.py's
        ``load_networks``), used as they are: not copied, cast or moved, so device and dtype are the UNet's. What
        ``load`` would do to them (eval mode, no grad) the caller did; ``close`` drops only this backend's
        references. A latent model needs all three networks."""
        if spec.is_latent and (text_encoder is None or vae is None):
            raise BackendError("a text-to-image model's torch backend needs its unet, text_encoder and vae")
        weight = next(unet.parameters())
        names = {dtype: name for name, dtype in _DTYPES.items()}
        if weight.dtype not in names:
            raise BackendError(f"the torch backend runs {', '.join(_DTYPES)}, not a {weight.dtype} UNet")
        backend = cls(spec, str(weight.device), names[weight.dtype])
        backend._device, backend._dtype = weight.device, weight.dtype
        backend.unet, backend.text_encoder, backend.vae = unet, text_encoder, vae
        return backend

    def _load(self, root: Path, channels_last: bool, compile: bool) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
        self._device = torch_device(self.device)
        self._dtype = torch_dtype(self.dtype, self._device)
        unet_cls = UNet2DConditionModel if self.spec.is_latent else UNet2DModel
        unet_dir = root / "unet" if (root / "unet").is_dir() else root
        self.unet = self._prepare(_built(unet_cls, unet_dir, torch_dtype=self._dtype), channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
        self.text_encoder = self.vae = None
        if self.spec.is_latent:
            from transformers import CLIPTextModel
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar; our CLI shows its own progress
            self.text_encoder = self._prepare(_built(CLIPTextModel, root / "text_encoder", dtype=self._dtype))
            self.vae = self._prepare(_built(AutoencoderKL, root / "vae", torch_dtype=self._vae_dtype(root)),
                                     channels_last)

    def _vae_dtype(self, root: Path) -> torch.dtype:
        """SD-family VAEs overflow in fp16 (NaN / black images); their config says so with ``force_upcast``
        (diffusers' default), so fp16 runs keep the VAE in fp32, as the ONNX export does. It runs once per
        image, so this costs little."""
        path = root / "vae" / "config.json"
        upcast = Config(read_json_object(path, MODEL_FIX), str(path), MODEL_FIX).flag("force_upcast", True)
        return torch.float32 if upcast and self._dtype == torch.float16 else self._dtype

    def _prepare(self, module: torch.nn.Module, channels_last: bool = False) -> torch.nn.Module:
        module = module.to(self._device).eval().requires_grad_(False)
        return module.to(memory_format=torch.channels_last) if channels_last else module

    def session(self):
        return torch.inference_mode()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self._device)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        array = array.detach()
        return (array.float() if array.is_floating_point() else array).cpu().numpy()

    def encode_text(self, input_ids: np.ndarray) -> torch.Tensor:
        if self.text_encoder is None:
            return super().encode_text(input_ids)
        return self.text_encoder(self.from_numpy(input_ids))[0].float()

    def denoise(self, sample, timestep: int, *, encoder_hidden_states=None, timestep_cond=None,
                class_labels=None) -> torch.Tensor:
        t = torch.tensor(timestep, device=self._device)
        if self.spec.is_latent:
            out = self.unet(sample.to(self._dtype), t, encoder_hidden_states.to(self._dtype),
                            timestep_cond=None if timestep_cond is None else timestep_cond.to(self._dtype)).sample
        else:
            out = self.unet(sample.to(self._dtype), t, class_labels=class_labels).sample
        return out.float()

    def decode(self, latents) -> torch.Tensor:
        if self.vae is None:
            return super().decode(latents)
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def close(self) -> None:
        self.unet = self.text_encoder = self.vae = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> str:
        vae = f", VAE {str(self.vae.dtype).removeprefix('torch.')}" if self.vae is not None and self.vae.dtype != self._dtype else ""
        return f"torch {torch.__version__} on {self.device} ({self.dtype}{vae})"
