"""The shipped Fashion-MNIST classifier (eval/classifier.py): its card, its accuracy on the real test split, its
use as an FID feature network (``--features fmnist-classifier``), and ``toolkit train classifier``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import requires_fashion_mnist
from atdiff.eval.classifier import DEFAULT_WEIGHTS, FEATURE_DIM, FashionClassifierFeatures, card, file_sha256
from atdiff.eval.fid import FeatureStats
from atdiff.eval.measure import check_comparable, make_extractor
from atdiff.runtime.errors import ToolkitError


@pytest.fixture(scope="module")
def classifier():
    return FashionClassifierFeatures(device="cpu")


def test_shipped_weights_match_their_card():
    record = card()
    assert record["files_sha256"][DEFAULT_WEIGHTS.name] == file_sha256(DEFAULT_WEIGHTS)
    assert record["test_accuracy"] >= 0.85 and record["command"] == "toolkit train classifier"


@requires_fashion_mnist
def test_accuracy_on_the_real_test_split_matches_the_card(classifier):
    from atdiff.eval.sources import dataset_labels, dataset_source
    images, labels = dataset_source("fashion-mnist", "test").images[:2000], dataset_labels("fashion-mnist", "test")[:2000]
    accuracy = float((classifier.predict(images) == labels).mean())
    assert abs(accuracy - card()["test_accuracy"]) < 0.03


def test_features_take_grayscale_rgb_and_other_sizes(classifier):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    feats = classifier(gray)
    assert feats.shape == (5, FEATURE_DIM) and feats.dtype == np.float32
    # RGB of gray: v (0.299 + 0.587 + 0.114) in float32 is within 255 x 2 EPS32 of v, so rint gives v back, exactly
    np.testing.assert_array_equal(classifier(np.repeat(gray[..., None], 3, axis=-1)), feats)
    np.testing.assert_array_equal(classifier(gray[..., None]), feats)
    assert classifier(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)).shape == (3, FEATURE_DIM)
    assert classifier.predict(gray).shape == (5,)
    with pytest.raises(ToolkitError, match="uint8"):
        classifier(gray.astype(np.float32))


def test_statistics_of_another_feature_network_are_refused(classifier):
    ours = FeatureStats(np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM), 10, {"extractor": classifier.describe()})
    inception_like = FeatureStats(np.zeros(4), np.eye(4), 10, {"extractor": {"weights_sha1": "abc", "resize": "clean"}})
    with pytest.raises(ToolkitError, match="differ"):
        check_comparable(ours, inception_like)
    with pytest.raises(ToolkitError, match="unknown --features"):
        make_extractor("lenet")


def test_missing_or_corrupt_weights_are_one_clear_error(tmp_path):
    with pytest.raises(ToolkitError, match="do not exist"):
        FashionClassifierFeatures(tmp_path / "none.safetensors", device="cpu")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ToolkitError, match="could not load"):
        FashionClassifierFeatures(bad, device="cpu")


@requires_fashion_mnist
def test_eval_stats_and_fid_with_classifier_features(tmp_path):
    from toolkit import app
    runner = CliRunner()
    out = tmp_path / "test.npz"
    result = runner.invoke(app, ["eval", "stats", "fashion-mnist:test", "--features", "fmnist-classifier", "--num", "600",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "fid", "fashion-mnist:train", str(out), "--num", "600", "--features",
                                 "fmnist-classifier", "--device", "cpu", "--out", str(tmp_path / "fid.json")])
    assert result.exit_code == 0, result.output
    fid = json.loads((tmp_path / "fid.json").read_text())["fid"]
    assert 0 < fid < 20   # train vs test of the same data set: small (Inception gives ~60 at this N)


@requires_fashion_mnist
def test_train_classifier_command_writes_weights_and_card(tmp_path):
    from toolkit import app
    result = CliRunner().invoke(app, ["train", "classifier", "--out", str(tmp_path / "run"), "--max-steps", "3",
                                      "--batch-size", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = tmp_path / "run/model"
    record = json.loads((model / "fmnist-classifier.json").read_text())
    assert 0 <= record["test_accuracy"] <= 1 and record["options"]["max_steps"] == 3
    assert FashionClassifierFeatures(model / "fmnist-classifier.safetensors", device="cpu").describe()["weights_sha1"] \
        == record["files_sha256"]["fmnist-classifier.safetensors"]
