"""Chunked, resumable feature extraction.

Work is cut into fixed chunks of sample indices ``[k * chunk, (k + 1) * chunk)``. Each chunk's images are
produced (read from disk, or generated with per-sample seeds ``seed + i``, so a chunk is the same whenever
it is made), measured (Inception features, CLIP scores: named arrays with one row per sample), and, with a
cache directory, written as ``chunk-00007.npz`` atomically.
A rerun with the same cache directory loads the finished chunks and computes only the missing ones, so an
interrupted 50k-sample evaluation resumes where it stopped. ``key.json`` records what the features depend
on (source, extractor, chunk size); a cache made for something else is refused, never mixed in.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.staging import atomic_file

DEFAULT_CHUNK = 1000
Produce = Callable[[int, int], np.ndarray]      # (start, stop) -> uint8 images [stop - start, H, W, C]
Measure = Callable[[np.ndarray, int, int], dict]  # (images, start, stop) -> {name: one row per image}
Progress = Callable[[int, int], None]           # (samples done, total)


class FeatureCache:
    """A directory of per-chunk feature files for one (source, extractor, chunk size) key."""

    def __init__(self, directory: str | os.PathLike, key: dict):
        self.dir = Path(directory)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))  # normalised, JSON-comparable
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if key_file.exists():
            stored = json.loads(key_file.read_text())
            if stored != self.key:
                raise ToolkitError(f"feature cache {self.dir} was made for {stored}, not {self.key}; "
                                   "pass another --cache directory or delete this one")
        else:
            with atomic_file(key_file) as handle:
                handle.write(json.dumps(self.key, indent=2, sort_keys=True).encode())

    def path(self, index: int) -> Path:
        return self.dir / f"chunk-{index:05d}.npz"

    def load(self, index: int, expected_rows: int) -> dict | None:
        path = self.path(index)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        if any(len(a) != expected_rows for a in arrays.values()):  # from a run with another --num: redo it
            return None
        return arrays

    def save(self, index: int, arrays: dict) -> None:
        with atomic_file(self.path(index), suffix=".npz.tmp") as handle:
            np.savez(handle, **arrays)


def chunked_measure(num: int, produce: Produce, measure: Measure, *, chunk_size: int = DEFAULT_CHUNK,
                    cache: FeatureCache | None = None, progress: Progress | None = None) -> dict:
    """``measure`` over samples ``0..num-1``, chunk by chunk, reusing chunks already in ``cache``;
    returns each named array concatenated over all samples."""
    if num < 1:
        raise ToolkitError(f"need at least one sample to compute features, got {num}")
    if chunk_size < 1:
        raise ToolkitError(f"chunk size must be at least 1, got {chunk_size}")
    parts = []
    for index, start in enumerate(range(0, num, chunk_size)):
        stop = min(start + chunk_size, num)
        arrays = cache.load(index, stop - start) if cache is not None else None
        if arrays is None:
            arrays = {name: np.asarray(a) for name, a in measure(produce(start, stop), start, stop).items()}
            if cache is not None:
                cache.save(index, arrays)
        parts.append(arrays)
        if progress is not None:
            progress(stop, num)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
