"""Features and FID statistics of a source argument (folder, dataset name or .npz), with an optional
resumable chunk cache, and the check that two sets of statistics were made the same way."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atdiff.eval.features import DEFAULT_CHUNK, FeatureCache, Progress, chunked_measure
from atdiff.eval.fid import FeatureStats
from atdiff.eval.inception import InceptionFeatures
from atdiff.eval.sources import resolve_source, take
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.provenance import tree_fingerprint


FEATURES = ("inception", "fmnist-classifier")


def make_extractor(features: str = "inception", *, inception=None, device: str = "auto", resize: str = "clean",
                   batch_size: int = 50, engine: str = "auto"):
    """The feature network behind FID: the standard FID Inception, or the shipped in-domain Fashion-MNIST
    classifier (eval/classifier.py; 'classifier FID', ~100x cheaper on a CPU, comparable only with itself)."""
    if features == "inception":
        return InceptionFeatures(inception, device=device, resize=resize, batch_size=batch_size, engine=engine)
    if features == "fmnist-classifier":
        from atdiff.eval.classifier import FashionClassifierFeatures
        return FashionClassifierFeatures(device=device)
    raise ToolkitError(f"unknown --features {features!r}; use one of {', '.join(FEATURES)}")


def source_features(source, extractor: InceptionFeatures, *, cache_dir: str | os.PathLike | None = None,
                    chunk_size: int = DEFAULT_CHUNK, progress: Progress | None = None) -> np.ndarray:
    """Inception features [N, 2048] of an ImageSource, chunk by chunk (resumable with ``cache_dir``)."""
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, {"source": source.describe(), "extractor": extractor.describe(),
                                         "chunk_size": chunk_size})
    return chunked_measure(source.num, source.load, lambda images, *_: {"inception": extractor(images)},
                           chunk_size=chunk_size, cache=cache, progress=progress)["inception"]


def source_stats(arg: str | os.PathLike, extractor: InceptionFeatures, *, cache_dir: str | os.PathLike | None = None,
                 chunk_size: int = DEFAULT_CHUNK, progress: Progress | None = None,
                 num: int | None = None) -> FeatureStats:
    """FID statistics of ``arg``: loaded from a .npz, or computed from (the first ``num`` images of) a
    folder / dataset name."""
    source = resolve_source(arg)
    if isinstance(source, FeatureStats):
        return source
    source = take(source, num)
    feats = source_features(source, extractor, cache_dir=cache_dir, chunk_size=chunk_size, progress=progress)
    return FeatureStats.from_features(feats, meta={"source": source.describe(), "extractor": extractor.describe()})


def check_comparable(a: FeatureStats, b: FeatureStats, names: tuple[str, str] = ("GEN", "REF")) -> list[str]:
    """Refuse stats made with different networks or resize conventions; return notes for what cannot be
    checked (stats files from other tools carry no record of how they were made)."""
    ea, eb = a.meta.get("extractor"), b.meta.get("extractor")
    if ea is None or eb is None:
        missing = names[0] if ea is None else names[1]
        return [f"{missing} statistics carry no extractor record (made by another tool?); make sure they used "
                "the TF FID Inception and the same resize convention"]
    for field in ("weights_sha1", "resize"):
        if ea.get(field) != eb.get(field):
            raise ToolkitError(f"{names[0]} and {names[1]} statistics differ in '{field}' ({ea.get(field)} vs "
                               f"{eb.get(field)}), so their FID would be meaningless; recompute one with the other's "
                               "--resize / --inception")
    return []


def check_extractor(extractor: InceptionFeatures, ref: FeatureStats) -> list[str]:
    """``check_comparable`` before any features are computed: fail before a long generation run."""
    planned = FeatureStats(np.zeros(0), np.zeros((0, 0)), 0, {"extractor": extractor.describe()})
    return check_comparable(planned, ref)


def model_identity(pipe) -> dict:
    """What a feature cache of generated samples is keyed on for the model: its path and name, and the sha256
    of its files, so retraining or re-exporting into the same directory never reuses stale features
    (hashing costs seconds; generating the samples of one chunk costs more)."""
    fingerprint = tree_fingerprint(pipe.source.path)
    return {"path": fingerprint["path"], "name": pipe.spec.name, "sha256": fingerprint["sha256"]}


def cache_subdir(cache_dir: str | os.PathLike | None, name: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / name
