"""studies/fid_bootstrap.py: FID from a finished cell's per-chunk feature cache equals FID of the same features
computed directly (scipy's sqrtm route), and the bootstrap std is positive and shrinks with more samples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atdiff.eval.fid import FeatureStats, fid_from_stats, save_stats
from atdiff.runtime.errors import ToolkitError
from studies import fid_bootstrap
from tolerance import fid_rounding_bound


def write_cache(directory: Path, feats: np.ndarray, chunk: int) -> None:
    directory.mkdir(parents=True)
    for i in range(0, len(feats), chunk):
        np.savez(directory / f"chunk-{i // chunk:05d}.npz", inception=feats[i:i + chunk])


def test_fid_and_bootstrap_std_from_a_chunk_cache(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 8))
    save_stats(FeatureStats.from_features(ref), tmp_path / "ref.npz")
    small, large = rng.normal(0.3, 1.0, size=(60, 8)), rng.normal(0.3, 1.0, size=(600, 8))
    write_cache(tmp_path / "small", small, 25)
    write_cache(tmp_path / "large", large, 250)
    assert fid_bootstrap.main(["--ref", str(tmp_path / "ref.npz"), str(tmp_path / "small"), str(tmp_path / "large"),
                               "--rounds", "30"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["num"] for r in rows] == [60, 600]
    for row, feats in zip(rows, (small, large)):
        own, theirs = FeatureStats.from_features(feats), FeatureStats.from_features(ref)
        direct = fid_from_stats(own, theirs)
        # the script's fast path (eigh of a Gram matrix) vs scipy's sqrtm: each within float64's rounding bound
        bound = fid_rounding_bound(own.mu, own.sigma, theirs.mu, theirs.sigma)
        assert row["fid"] == pytest.approx(direct, rel=0, abs=2 * bound)
    assert 0 < rows[1]["fid_std"] < rows[0]["fid_std"]


def test_an_empty_cache_directory_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolkitError, match="no chunk-"):
        fid_bootstrap.cached_features(tmp_path / "empty")
