"""``toolkit train clip`` (a small open_clip CLIP for offline CLIP scores) and ``toolkit eval clip --clip-model DIR``
reading the trained model back (safetensors, no pickle)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tolerance import EPS32, layer_count, network_rel
from toolkit import app

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "models" / "demo-data"


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "run"
    result = CliRunner().invoke(app, ["train", "clip", "--data", str(DEMO_DATA), "--out", str(out), "--max-steps", "2",
                                      "--batch-size", "8", "--device", "cpu", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return out


def test_trained_clip_is_an_open_clip_model_dir(clip_run):
    model = clip_run / "model"
    record = json.loads((model / "training.json").read_text())
    assert record["command"] == "toolkit train clip" and "open_clip_model.safetensors" in record["files_sha256"]
    assert json.loads((model / "toolkit-clip.json").read_text())["vision_cfg"]["image_size"] == 32


def test_eval_clip_reads_the_trained_dir(clip_run, tmp_path):
    from atdiff.eval.clip_score import ClipScorer
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a photo of a bag\na photo of a coat\na photo of a sneaker\n")
    out = tmp_path / "clip.json"
    result = CliRunner().invoke(app, ["eval", "clip", str(images), "--prompts", str(tmp_path / "prompts.txt"),
                                      "--clip-model", str(clip_run / "model"), "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["num"] == 3 and record["clip_pretrained"].endswith("open_clip_model.safetensors")
    # the same weights give the same scores in-process (the trained weights were loaded, not a random init)
    scorer = ClipScorer(str(clip_run / "model"), None, device="cpu", seed=123)
    again = scorer([np.asarray(Image.open(images / f"{i}.png")) for i in range(3)],
                   ["a photo of a bag", "a photo of a coat", "a photo of a sneaker"])
    # in-process vs the CLI's batches: each layer may round differently, and the cosine (at most 1, times 100)
    # adds its norms' and dot product's roundings over the embedding
    embed_dim = scorer.model.visual.output_dim
    rel = network_rel(layer_count(scorer.model)) + 3 * embed_dim * EPS32 / 2
    assert again.mean() == pytest.approx(record["clip_score"], abs=100 * rel)


def test_a_directory_without_the_config_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["eval", "clip", str(tmp_path), "--clip-model", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2 and "without toolkit-clip.json" in result.output
