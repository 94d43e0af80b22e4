"""Frechet distance between Gaussians fitted to features, and reference statistics files.

Statistics files are pytorch-fid's ``.npz`` format (``mu``: [D], ``sigma``: [D, D]), so published
reference stats work here and ours work there; we add ``num`` (sample count) and ``meta`` (a JSON string:
extractor, resize mode, source) which other tools ignore.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.staging import atomic_file


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray      # float64 [D]
    sigma: np.ndarray   # float64 [D, D]
    num: int = 0        # samples the stats came from (0: unknown, e.g. a published file without it)
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_features(cls, feats: np.ndarray, meta: dict | None = None) -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise ToolkitError(f"need at least 2 feature vectors [N, D] for a covariance, got shape {feats.shape}")
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False), len(feats), dict(meta or {}))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64.

    As in the TTUR reference code and pytorch-fid: when the product is singular (fewer samples than
    dimensions) sqrtm returns inf/nan, and the covariances are offset by ``eps * I`` before retrying; a
    small imaginary part from round-off is dropped, a large one is an error."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ToolkitError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                           f"{sigma2.shape}; compute both with the same feature extractor")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products (small N) are handled below; scipy's warning is noise
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ToolkitError(f"the covariance product has a matrix square root with imaginary part {worst:.3g}; "
                               "the statistics are too ill-conditioned: use more samples")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    for side in (a, b):
        if side.num and side.num < 2:
            raise ToolkitError("FID needs statistics from at least 2 samples")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def save_stats(stats: FeatureStats, path: str | os.PathLike) -> Path:
    """Write ``mu``/``sigma`` (+ ``num``, ``meta``) as .npz via a temp file, so a failed run keeps the old file."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ToolkitError(f"statistics file '{path}' must end in .npz (pytorch-fid's format)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".npz.tmp") as handle:
        np.savez(handle, mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num),
                 meta=np.array(json.dumps(stats.meta, sort_keys=True, default=str)))
    return path


def load_stats(path: str | os.PathLike) -> FeatureStats:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ToolkitError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(data.files)}); "
                                   "make reference stats with 'toolkit eval stats DATA --out ref.npz'")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            num = int(data["num"]) if "num" in data else 0
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"cannot read statistics file {path} ({exc}); pass a .npz with mu and sigma") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ToolkitError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return FeatureStats(mu, sigma, num, meta)


class ReferenceFID:
    """FID of many feature sets against one fixed reference, exact but cheap enough to bootstrap.

    Tr (S1 S2)^1/2 = Tr (R S1 R)^1/2 with R = S2^1/2 (similar matrices), and with S1 = A^T A / (n - 1) for
    the centred features A, R S1 R = (A R)^T (A R) / (n - 1) shares its nonzero eigenvalues with the n x n
    Gram matrix (A R)(A R)^T / (n - 1). So each evaluation is one symmetric eigendecomposition of size
    min(n, D) instead of a general D x D sqrtm, and R is computed once."""

    def __init__(self, ref: FeatureStats):
        w, v = np.linalg.eigh(ref.sigma)
        self.ref = ref
        self.root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        self.trace_ref = float(np.trace(ref.sigma))

    def __call__(self, feats: np.ndarray) -> float:
        return self.from_projected(np.asarray(feats, np.float64), np.asarray(feats, np.float64) @ self.root)

    def from_projected(self, feats: np.ndarray, projected: np.ndarray) -> float:
        """``projected`` = ``feats @ root`` (precomputed once when bootstrapping rows of ``feats``)."""
        n = len(feats)
        if n < 2:
            raise ToolkitError("FID needs at least 2 samples")
        mu = feats.mean(axis=0)
        centred = projected - projected.mean(axis=0)
        gram = centred @ centred.T if n <= centred.shape[1] else centred.T @ centred
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(gram / (n - 1)), 0.0, None)).sum()
        trace_own = float(((feats - mu) ** 2).sum() / (n - 1))
        diff = mu - self.ref.mu
        return float(diff @ diff + trace_own + self.trace_ref - 2.0 * tr_sqrt)

    def bootstrap_std(self, feats: np.ndarray, rounds: int = 20, seed: int = 0) -> float:
        """Std of FID over ``rounds`` resamplings (with replacement) of the samples: how much the metric
        moves between equally valid draws of N seeds, i.e. the seed noise at this sample count."""
        feats = np.asarray(feats, np.float64)
        projected = feats @ self.root
        rng = np.random.default_rng(seed)
        values = [self.from_projected(feats[idx], projected[idx])
                  for idx in (rng.integers(0, len(feats), len(feats)) for _ in range(rounds))]
        return float(np.std(values, ddof=1))
