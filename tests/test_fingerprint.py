"""The cached model hash recorded by `toolkit generate`: equal to the full hash, not recomputed for an
unchanged directory, recomputed when a file changes."""
from __future__ import annotations

import os

import pytest

import atdiff.runtime.provenance as provenance
from atdiff.runtime.provenance import tree_fingerprint
from atdiff.runtime.fingerprint import model_sha256


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "weights.bin").write_bytes(b"\x01" * 1000)
    (root / "model_index.json").write_text("{}")
    return root


def test_cached_hash_equals_the_full_hash_and_is_reused(model_dir, monkeypatch):
    full = tree_fingerprint(model_dir)["sha256"]
    assert model_sha256(model_dir) == full

    def no_rehash(path):
        raise AssertionError(f"re-hashed {path}")
    monkeypatch.setattr(provenance, "sha256_file", no_rehash)
    assert model_sha256(model_dir) == full


def test_a_changed_file_changes_the_hash(model_dir):
    before = model_sha256(model_dir)
    weights = model_dir / "unet" / "weights.bin"
    stat = weights.stat()
    weights.write_bytes(b"\x02" * 1000)                       # same size ...
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # ... newer mtime
    assert model_sha256(model_dir) == tree_fingerprint(model_dir)["sha256"] != before


def test_unwritable_cache_still_gives_the_hash(model_dir, monkeypatch, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(blocker / "cache"))
    assert model_sha256(model_dir) == tree_fingerprint(model_dir)["sha256"]
