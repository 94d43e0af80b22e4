"""The onnxruntime backend on export directories: options, errors, no-torch serving, CUDA paths (GPU only)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from export.exporter import ExportSettings, run_export
from runtime import Pipeline
from runtime.backends import BackendError, get_backend_class
from runtime.backends.ort_backend import CUDA_EP, OrtBackend
from runtime.export_manifest import read_manifest
from runtime.model_spec import ModelFormatError

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA_EP = CUDA_EP in ort.get_available_providers()
needs_cuda_ep = pytest.mark.skipif(not HAS_CUDA_EP, reason="needs onnxruntime-gpu with a CUDA GPU "
                                                           "(CUDAExecutionProvider not available here)")


def _export(model, out, **options):
    return run_export(ExportSettings(model=str(model), out=out, validate=False, **options), log=lambda m: None).out


@pytest.fixture(scope="module")
def lcm_export(tiny_lcm_dir, tmp_path_factory):
    return _export(tiny_lcm_dir, tmp_path_factory.mktemp("ort") / "lcm", batch_sizes=(1, 2))


@pytest.fixture(scope="module")
def uncond_export(tiny_uncond_dir, tmp_path_factory):
    return _export(tiny_uncond_dir, tmp_path_factory.mktemp("ort") / "uncond")


def test_registry_finds_the_backend():
    assert get_backend_class("onnxruntime") is OrtBackend


def test_session_options_reach_the_sessions(uncond_export):
    with Pipeline.load(uncond_export, backend="onnxruntime", device="cpu", dtype="float32", intra_op_threads=1,
                       graph_optimization="basic") as pipe:
        options = pipe.backend._runners["unet"].session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert "CPUExecutionProvider" in pipe.backend.describe() and "unet float32" in pipe.backend.describe()


@pytest.mark.parametrize("options, message", [
    ({"threads": 2}, "no option"),
    ({"graph_optimization": "max"}, "graph_optimization"),
    ({"cuda_graph": True}, "cuda_graph"),
])
def test_bad_options_are_errors(uncond_export, options, message):
    with pytest.raises(BackendError, match=message):
        Pipeline.load(uncond_export, backend="onnxruntime", device="cpu", **options)


def test_diffusers_directory_is_not_an_export(tiny_uncond_dir):
    with pytest.raises(ModelFormatError, match="toolkit export"):
        OrtBackend.load(tiny_uncond_dir, None, device="cpu", dtype="auto")


def test_missing_component_names_the_fix(lcm_export, tmp_path):
    # an export made with --components unet,vae_decoder (the manifest lists only what was exported)
    out = shutil.copytree(lcm_export, tmp_path / "partial")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["components"]["text_encoder"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("text_encoder/")}
    shutil.rmtree(out / "text_encoder")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="--components"):
        Pipeline.load(out, backend="onnxruntime", device="cpu", dtype="float32")


@pytest.mark.skipif(HAS_CUDA_EP, reason="this machine has the CUDA provider; the error case cannot happen")
def test_cuda_without_cuda_provider_says_install_gpu_extra(uncond_export):
    with pytest.raises(BackendError, match=r"at-diffusion-toolkit\[gpu\]"):
        Pipeline.load(uncond_export, backend="onnxruntime", device="cuda")


def test_batch_equals_single_runs(lcm_export):
    with Pipeline.load(lcm_export, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        both = pipe(["a red cube", "a blue ball"], steps=2, seed=7).latents
        first = pipe(["a red cube"], steps=2, seed=7).latents
        second = pipe(["a blue ball"], steps=2, seed=8).latents
    np.testing.assert_allclose(both, np.concatenate([first, second]), atol=1e-5)


def test_classifier_free_guidance_model_matches_torch(tiny_sd_dir, tmp_path):
    # SD-style model: no w-embedding, so CFG runs the UNet on a batch of 2B (uncond + cond)
    out = _export(tiny_sd_dir, tmp_path / "sd")
    request = dict(prompts=["astronaut in a jungle"], steps=3, seed=2, guidance_scale=7.5)
    with Pipeline.load(tiny_sd_dir, backend="torch", device="cpu") as pipe:
        expected = pipe(**request).latents
    with Pipeline.load(out, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        got = pipe(**request).latents
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_serving_an_export_needs_no_torch(lcm_export):
    # torch/diffusers imports are made to fail: the ORT path must not touch them
    code = ("import sys\nfor m in ('torch', 'diffusers', 'transformers'): sys.modules[m] = None\n"
            "from runtime import Pipeline\n"
            f"pipe = Pipeline.load({str(lcm_export)!r}, backend='onnxruntime', device='cpu', dtype='float32')\n"
            "out = pipe(['astronaut in a jungle'], steps=2, seed=0)\n"
            "print(out.arrays.shape, out.backend)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 64, 64, 3) onnxruntime" in result.stdout


def test_generate_cli_runs_an_export(lcm_export, tmp_path):
    from toolkit import app
    result = CliRunner().invoke(app, ["generate", "astronaut in a jungle", "--model", str(lcm_export), "--backend",
                                      "onnxruntime", "--device", "cpu", "--steps", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_io_binding_path_matches_plain_run(lcm_export, component):
    # The CUDA path's buffer logic (one preallocated set per input shape, outputs sized from the
    # contract, e.g. the VAE's 'latent_height*4') run on CPU OrtValues, so it is tested without a GPU.
    from export.contracts import ExportContract
    from runtime.backends.ort_backend import OrtRunner, session_options
    manifest = read_manifest(lcm_export)
    entry = manifest.components[component]
    contract = ExportContract.from_dict(entry["contract"])
    path = manifest.component_path(component)
    plain = OrtRunner(path, entry["contract"], session_options(), ["CPUExecutionProvider"])
    bound = OrtRunner(path, entry["contract"], session_options(), ["CPUExecutionProvider"], bind_to=("cpu", 0))
    output = contract.output_names()[0]
    for point in ("min", "max", "min"):            # the second 'min' reuses the first buffers
        inputs = contract.sample_inputs(point, seed=1)
        np.testing.assert_array_equal(bound(inputs)[output], plain(inputs)[output])
    assert len(bound._buffers) == 2


def _cpu_and_cuda(export_dir, **cuda_options):
    request = dict(prompts=["astronaut in a jungle", "a red cube"], steps=4, seed=0)
    with Pipeline.load(export_dir, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        expected = pipe(**request).latents
    with Pipeline.load(export_dir, backend="onnxruntime", device="cuda", dtype="float32", **cuda_options) as pipe:
        got = [pipe(**request).latents for _ in range(2)]   # the second run replays captured graphs
    return expected, got


@needs_cuda_ep
def test_cuda_io_binding_matches_cpu(lcm_export):
    expected, got = _cpu_and_cuda(lcm_export)
    for latents in got:
        np.testing.assert_allclose(latents, expected, atol=1e-3)


@needs_cuda_ep
def test_cuda_graphs_match_cpu(lcm_export):
    expected, got = _cpu_and_cuda(lcm_export, cuda_graph=True)
    for latents in got:
        np.testing.assert_allclose(latents, expected, atol=1e-3)
