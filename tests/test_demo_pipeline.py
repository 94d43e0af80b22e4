"""The offline text-to-image demo pipeline's training commands: captioned Fashion-MNIST shards, the VAE, the
teacher (UNet + text encoder jointly), and LCM-AT distilled from that teacher, at tiny budgets."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import requires_fashion_mnist
from atdiff.eval.fashion_prompts import CLASS_PHRASES, caption, class_prompts, labels_of


def test_captions_name_their_class_and_vary_by_index():
    assert caption(7, 0) == "a photo of a sneaker" and caption(9, 1) == "a black and white picture of an ankle boot"
    assert len({caption(3, i) for i in range(8)}) == 8
    every = [caption(label, i) for label in range(10) for i in range(8)]
    np.testing.assert_array_equal(labels_of(every), np.repeat(np.arange(10), 8))  # "shirt" vs "t-shirt" too
    assert labels_of(["an astronaut in a jungle"]).tolist() == [-1]
    assert len(class_prompts()) == len(CLASS_PHRASES) == 10


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """captions -> vae -> teacher, 3-4 steps each, through the CLI."""
    from toolkit import app
    root, runner = tmp_path_factory.mktemp("demo"), CliRunner()

    def run(*args):
        result = runner.invoke(app, ["train", *map(str, args)])
        assert result.exit_code == 0, result.output
        return result

    run("captions", "--out", root / "data", "--num", "40")
    shards = f"{root / 'data'}/*.tar"
    run("vae", "--data", shards, "--out", root / "vae", "--max-steps", "3", "--batch-size", "8", "--device", "cpu")
    run("teacher", "--data", shards, "--vae", root / "vae/model", "--out", root / "teacher", "--max-steps", "3",
        "--batch-size", "8", "--device", "cpu")
    return root, run


@requires_fashion_mnist
def test_caption_shards_are_reproducible_png_and_text_pairs(chain, tmp_path):
    from atdiff.train.demo.fashion_captions import write_shards
    root, _ = chain
    again = write_shards(tmp_path, num=40)[0]
    assert again.read_bytes() == (root / "data" / again.name).read_bytes()
    with tarfile.open(again) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000.png", "000000.txt"] and len(names) == 80
        assert tar.extractfile("000000.txt").read().decode() == caption(9, 0)   # the first training image is a boot


@requires_fashion_mnist
def test_vae_and_teacher_export_loadable_diffusers_parts(chain):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    root, _ = chain
    vae = AutoencoderKL.from_pretrained(root / "vae/model")
    assert vae.config.scaling_factor > 0 and vae.config.latent_channels == 4
    pipe = StableDiffusionPipeline.from_pretrained(root / "teacher/model", safety_checker=None)
    assert pipe.unet.config.sample_size == 8 and pipe.text_encoder.config.hidden_size == 64
    record = json.loads((root / "teacher/model/training.json").read_text())
    assert record["command"] == "toolkit train teacher" and record["options"]["caption_dropout"] == 0.1


@requires_fashion_mnist
def test_lcm_at_distils_the_trained_teacher_and_generates(chain):
    from atdiff.runtime import Pipeline
    root, run = chain
    run("lcm-at", "--teacher", root / "teacher/model", "--data", f"{root / 'data'}/*.tar", "--out", root / "lcm-at",
        "--max-steps", "2", "--batch-size", "4", "--device", "cpu")
    with Pipeline.load(str(root / "lcm-at/model"), backend="torch", device="cpu") as pipe:
        out = pipe(["a photo of a sneaker"], steps=4, seed=0)
    assert out.arrays.shape == (1, 32, 32, 3)


@requires_fashion_mnist
def test_teacher_with_a_missing_vae_is_one_clear_error(chain, tmp_path):
    from toolkit import app
    root, _ = chain
    result = CliRunner().invoke(app, ["train", "teacher", "--data", f"{root / 'data'}/*.tar", "--vae",
                                      str(tmp_path / "none"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "is not an AutoencoderKL directory" in result.output


class Oracle:  # stands in for the classifier: 'sees' class 3 in every image
    def __init__(self, *args, **kwargs):
        pass

    def predict(self, images):
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        return np.full(len(images), 3)

    def describe(self):
        return {"network": "oracle-sees-class-3"}


def assert_oracle_rows(rows) -> None:
    """The known answer with Oracle: right for the dress prompt (class 3) only, 2 of 20 images."""
    from atdiff.eval.fashion_prompts import class_prompts
    assert [(r["steps"], r["num"], r["accuracy"]) for r in rows] == [(1, 20, 0.1)]
    assert rows[0]["per_class"] == {p: float(label == 3) for label, p in enumerate(class_prompts())}


@requires_fashion_mnist
def test_adherence_counts_the_classifier_agreeing_with_each_class_prompt(chain, tmp_path, monkeypatch):
    from atdiff.eval.adherence import AdherenceConfig, run_adherence
    root, _ = chain
    assert_oracle_rows(run_adherence(AdherenceConfig(model=str(root / "teacher/model"), steps=(1,), per_class=2,
                                                     device="cpu"), Oracle()))
    from toolkit import app
    monkeypatch.setattr("atdiff.eval.classifier.FashionClassifierFeatures", Oracle)   # what the CLI loads
    result = CliRunner().invoke(app, ["eval", "adherence", str(root / "teacher/model"), "--steps", "1",
                                      "--per-class", "2", "--device", "cpu", "--out", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "a.json").read_text())
    assert_oracle_rows(written["results"])
    assert written["classifier"] == Oracle().describe() and written["config"]["per_class"] == 2
