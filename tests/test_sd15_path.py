"""Issue 27's path at CI size: the SD-1.5 LCM fixture (export/sd15) at real depth and reduced width, exported in
fp16 with the external-data threshold forced down so every network takes the >2 GiB route the full size takes (one
``model.onnx.data`` beside each ``model.onnx``), validated, generated from, and packaged for Triton. The full size is
the documented benchmark (docs/performance.md: toolkit bench sd15)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from typer.testing import CliRunner

from atdiff.export.exporter import ExportSettings, run_export
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.export_manifest import read_manifest
from atdiff.runtime.model_spec import ModelFormatError
from atdiff.export.sd15.fixture import FIXTURE_FILE, build_pipeline, load_configs
from conftest import requires_tritonclient

pytestmark = pytest.mark.slow
NETWORKS = ("text_encoder", "unet", "vae_decoder")
SIZE = 128   # pixels: a 16x16 latent, the smallest the 3 downsamplings and the VAE's 8x allow comfortably
THRESHOLD = 2**20   # 1 MiB: every network's weights are over it


@pytest.fixture(scope="module")
def ci_pipe(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("sd15") / "pipe", seed=0, width="ci")


@pytest.fixture(scope="module")
def ci_export(ci_pipe, tmp_path_factory):
    settings = ExportSettings(model=str(ci_pipe), out=tmp_path_factory.mktemp("sd15-export") / "E", fp16=True,
                              height=SIZE, width=SIZE, device="cpu", external_data_bytes=THRESHOLD)
    return run_export(settings, log=lambda message: None)


def test_ci_width_keeps_every_depth_setting_of_the_full_configs():
    full, ci = load_configs("full"), load_configs("ci")
    depth = {"unet": ("down_block_types", "up_block_types", "layers_per_block", "time_cond_proj_dim", "sample_size"),
             "text_encoder": ("num_hidden_layers", "vocab_size", "max_position_embeddings"),
             "vae": ("down_block_types", "up_block_types", "layers_per_block", "latent_channels")}
    for part, keys in depth.items():
        assert {k: ci[part][k] for k in keys} == {k: full[part][k] for k in keys}, part
    assert ci["unet"]["block_out_channels"] != full["unet"]["block_out_channels"]
    assert ci["unet"]["cross_attention_dim"] == ci["text_encoder"]["hidden_size"]
    assert full["unet"]["cross_attention_dim"] == full["text_encoder"]["hidden_size"] == 768
    assert ci["scheduler"] == full["scheduler"]


def test_fixture_is_a_diffusers_lcm_pipeline_with_the_configs_sizes(ci_pipe):
    from diffusers import LatentConsistencyModelPipeline
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(ci_pipe))
    assert pipe.unet.config.time_cond_proj_dim == 256 and len(pipe.unet.down_blocks) == 4
    assert pipe.text_encoder.config.num_hidden_layers == 12 and pipe.tokenizer.model_max_length == 77
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.scheduler.config.original_inference_steps == 50
    record = json.loads((ci_pipe / FIXTURE_FILE).read_text())
    assert record["parameters"]["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    assert pipe.tokenizer("astronaut").input_ids[0] == 49406   # the real CLIP BPE: <|startoftext|>
    from safetensors import safe_open
    with safe_open(ci_pipe / "text_encoder" / "model.safetensors", "pt") as weights:   # the hub's names, which
        assert all(k.startswith("text_model.") for k in weights.keys())                 # transformers 4.x reads too


def test_fixture_refuses_a_non_empty_directory(ci_pipe):
    with pytest.raises(ToolkitError, match="not an empty directory"):
        build_pipeline(ci_pipe, width="ci")


def test_forced_threshold_writes_every_network_with_external_data_listed_and_validated(ci_export):
    manifest = read_manifest(ci_export.out)
    files = manifest.data["files"]
    for name in NETWORKS:
        onnx_file, data = f"{name}/model.onnx", f"{name}/model.onnx.data"
        assert {onnx_file, data} <= set(files), name
        # the weights moved out; what stays is the graph (the UNet's ~1.1 MB of nodes) and tensors under 1 kB
        assert THRESHOLD < files[data]["bytes"] and files[onnx_file]["bytes"] < files[data]["bytes"] / 10, name
    assert manifest.data["settings"]["external_data_bytes"] == THRESHOLD
    assert manifest.components["unet"]["precision"] == "float16"
    assert ci_export.report.passed and {c.name for c in ci_export.report.checks} >= {*NETWORKS, "end-to-end"}


def test_a_changed_external_data_file_is_refused(ci_export, tmp_path):
    import shutil
    from atdiff.runtime import Pipeline
    copy = shutil.copytree(ci_export.out, tmp_path / "E")
    data = copy / "unet" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="sha256"):
        Pipeline.load(copy, backend="onnxruntime", device="cpu")


def test_generate_on_the_export_matches_generate_on_the_source(ci_pipe, ci_export, tmp_path):
    from toolkit import app
    images = {}
    for backend, model in (("onnxruntime", ci_export.out), ("torch", ci_pipe)):
        out = tmp_path / backend
        result = CliRunner().invoke(app, ["generate", "astronaut in a jungle", "--model", str(model), "--backend",
                                          backend, "--device", "cpu", "--steps", "4", "--height", str(SIZE),
                                          "--width", str(SIZE), "--out", str(out)])
        assert result.exit_code == 0, result.output
        (png,) = out.glob("*.png")
        images[backend] = np.asarray(Image.open(png).convert("RGB")).astype(np.float64)
        assert images[backend].shape == (SIZE, SIZE, 3)
    mse = np.mean((images["onnxruntime"] - images["torch"]) ** 2)
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 30   # the export validation's fp16 limit


@requires_tritonclient
def test_triton_repository_carries_each_networks_external_data(ci_export, tmp_path):
    from atdiff.export.triton import write_repository
    repo = write_repository(ci_export.out, tmp_path / "R", kind="cpu")
    manifest = read_manifest(ci_export.out)
    for name in NETWORKS:
        assert (repo / name / "1" / "model.onnx.data").stat().st_size == manifest.data["files"][
            f"{name}/model.onnx.data"]["bytes"]
    contract = manifest.contract("unet")
    feed = contract.sample_inputs("opt", seed=0)
    feed = {k: v.astype(np.float16) if v.dtype == np.float32 and k != "timestep" else v for k, v in feed.items()}
    ours = ort.InferenceSession(str(ci_export.out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(str(repo / "unet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(theirs.run(None, feed)[0], ours.run(None, feed)[0])
