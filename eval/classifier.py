"""The in-domain Fashion-MNIST classifier: a cheap FID feature extractor and the prompt-adherence judge.

The FID Inception runs at ~19 images/s on a 2-core CPU; the results grids need 10k samples x 3 seeds per
cell, so their FID uses this small CNN's 128-d penultimate activations instead (the "classifier FID",
as Fashion-MNIST / MNIST generative papers do with their own LeNet-style nets). It is trained by the
toolkit (``toolkit train classifier``) and shipped as safetensors beside this file; the file's sha256 is
part of ``describe()``, so statistics made with another network are refused, never compared.

Inputs: uint8 images [N, H, W] or [N, H, W, C] (RGB is converted to luma; sizes other than 28x28 are
resized with PIL bicubic, as the FID Inception path does).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # torch is imported lazily, inside the functions that use it
    import torch

from atdiff.runtime.errors import ToolkitError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "fmnist-classifier.safetensors"
SIZE = 28
FEATURE_DIM = 128
NUM_CLASSES = 10
NETWORK = "fmnist-classifier-cnn-128"


def build_network():
    """conv 32 -> conv 64 (stride 2) -> conv 128 (stride 2) -> global mean -> 128 (features) -> 10 logits."""
    import torch.nn as nn

    class FashionClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(128, FEATURE_DIM), nn.ReLU())
            self.dropout = nn.Dropout(0.3)
            self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

        def forward(self, x):
            """x: float [N, 1, 28, 28] in [-1, 1] -> (logits [N, 10], features [N, 128])."""
            features = self.body(x)
            return self.head(self.dropout(features)), features

    return FashionClassifier()


def to_input(images) -> "torch.Tensor":
    """uint8 [N, H, W(, C)] -> float32 torch [N, 1, 28, 28] in [-1, 1]."""
    import torch
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ToolkitError(f"the classifier takes uint8 images, got {images.dtype}; "
                           "convert with atdiff.runtime.images.to_uint8")
    if images.ndim == 4 and images.shape[-1] == 3:
        images = np.rint(images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    elif images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ToolkitError(f"the classifier takes [N, H, W] or [N, H, W, 1|3] images, got shape {images.shape}")
    if images.shape[1:] != (SIZE, SIZE):
        from PIL import Image
        images = np.stack([np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.BICUBIC)) for img in images])
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FashionClassifierFeatures:
    """The extractor interface of ``atdiff.eval.inception.InceptionFeatures``: ``__call__(uint8 images) -> [N, 128]``
    float32 features and ``describe()``; plus ``predict`` (class indices) for prompt adherence."""

    def __init__(self, weights: str | os.PathLike | None = None, *, device: str = "auto", batch_size: int = 500):
        import torch
        from safetensors.torch import load_file

        from atdiff.runtime.backends.torch_backend import TorchBackend
        self.path = Path(weights) if weights else DEFAULT_WEIGHTS
        if not self.path.is_file():
            raise ToolkitError(f"classifier weights '{self.path}' do not exist; train them with "
                               "'toolkit train classifier' or reinstall the toolkit (they ship in eval/assets/)")
        self.sha256 = file_sha256(self.path)
        self.device = TorchBackend.resolve_device(device)   # auto | cpu | cuda | cuda:N (runtime/devices.py)
        self.batch_size = int(batch_size)
        self.model = build_network()
        try:
            self.model.load_state_dict(load_file(str(self.path)))
        except Exception as exc:  # a truncated file or another network's weights
            raise ToolkitError(f"could not load classifier weights {self.path}: {str(exc).splitlines()[0]}") from None
        self.model.to(self.device).eval()
        self._torch = torch

    def describe(self) -> dict:
        # weights_sha1 / resize are the fields atdiff.eval.measure.check_comparable compares between statistics
        return {"network": NETWORK, "weights_sha1": self.sha256, "resize": "bicubic-28", "features": FEATURE_DIM}

    def _run(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = to_input(images)
        logits, feats = [], []
        with self._torch.inference_mode():
            for lo in range(0, len(x), self.batch_size):
                out, f = self.model(x[lo:lo + self.batch_size].to(self.device))
                logits.append(out.float().cpu().numpy())
                feats.append(f.float().cpu().numpy())
        if not logits:
            return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(logits), np.concatenate(feats)

    def __call__(self, images) -> np.ndarray:
        return self._run(images)[1]

    def predict(self, images) -> np.ndarray:
        """Predicted class index per image (int64)."""
        return self._run(images)[0].argmax(axis=1)


def card(path: Path = DEFAULT_WEIGHTS) -> dict:
    """The JSON record shipped beside the weights (test accuracy, command, sha256)."""
    record = path.with_suffix(".json")
    return json.loads(record.read_text()) if record.is_file() else {}
