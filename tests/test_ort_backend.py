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

from conftest import requires_cuda
from atdiff.export.exporter import ExportSettings, run_export
from atdiff.runtime import Pipeline
from atdiff.runtime.backends import BackendError, get_backend_class
from atdiff.runtime.backends.ort_backend import CUDA_EP, OrtBackend
from atdiff.runtime.devices import DeviceError
from atdiff.runtime.export_manifest import read_manifest
from atdiff.runtime.model_spec import ModelFormatError
from tolerance import (EPS16, TINY_TEXT_ENCODER_LAYERS, TINY_TEXT_UNET_LAYERS, assert_close_scaled,
                       guidance_amplification, network_rel, sampler_ops_rel)

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


@pytest.fixture(scope="module")
def lcm_fp16_export(tiny_lcm_dir, tmp_path_factory):
    return _export(tiny_lcm_dir, tmp_path_factory.mktemp("ort") / "lcm-fp16", fp16=True)


@pytest.fixture(scope="module")
def sd_export(tiny_sd_dir, tmp_path_factory):
    return _export(tiny_sd_dir, tmp_path_factory.mktemp("ort") / "sd")


@pytest.fixture(scope="module")
def class_export(tmp_path_factory):
    from atdiff.train.core.tiny_models import build_tiny_unconditional
    model = build_tiny_unconditional(tmp_path_factory.mktemp("models") / "tiny-class", seed=0, num_class_embeds=3)
    return _export(model, tmp_path_factory.mktemp("ort") / "class")


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


def test_torch_backend_refuses_an_export_directory(uncond_export):
    # diffusers' from_pretrained would fail on it with a bare OSError (a traceback in the CLI)
    with pytest.raises(BackendError, match="is an ONNX export; the torch backend runs the diffusers directory"):
        Pipeline.load(uncond_export, backend="torch", device="cpu")


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
    with pytest.raises(DeviceError, match=r"pip install -e '\.\[gpu\]' \(in the toolkit's checkout\)"):
        Pipeline.load(uncond_export, backend="onnxruntime", device="cuda")


def test_batch_equals_single_runs(lcm_export):
    with Pipeline.load(lcm_export, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        both = pipe(["a red cube", "a blue ball"], steps=2, seed=7).latents
        first = pipe(["a red cube"], steps=2, seed=7).latents
        second = pipe(["a blue ball"], steps=2, seed=8).latents
    # batch 2 vs 1 may sum in another order: the text encoder and 2 UNet steps round differently
    assert_close_scaled(both, np.concatenate([first, second]),
                        network_rel(TINY_TEXT_ENCODER_LAYERS + 2 * TINY_TEXT_UNET_LAYERS))


def test_classifier_free_guidance_model_matches_torch(tiny_sd_dir, sd_export):
    # SD-style model: no w-embedding, so CFG runs the UNet on a batch of 2B (uncond + cond)
    out = sd_export
    request = dict(prompts=["astronaut in a jungle"], steps=3, seed=2, guidance_scale=7.5)
    with Pipeline.load(tiny_sd_dir, backend="torch", device="cpu") as pipe:
        expected = pipe(**request).latents
    with Pipeline.load(out, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        got = pipe(**request).latents
    # other kernels: the text encoder and 3 steps of the 2B-batch UNet (83 layers) round differently, CFG x14
    layers = TINY_TEXT_ENCODER_LAYERS + 3 * (TINY_TEXT_UNET_LAYERS - 1)
    assert_close_scaled(got, expected, network_rel(layers, guidance_amplification(request["guidance_scale"])))


def test_serving_an_export_needs_no_torch(lcm_export):
    # torch/diffusers imports are made to fail: the ORT path must not touch them
    code = ("import sys\nfor m in ('torch', 'diffusers', 'transformers'): sys.modules[m] = None\n"
            "from atdiff.runtime import Pipeline\n"
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


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_io_binding_path_matches_plain_run(lcm_export, component, arrays):
    # The CUDA path's buffer logic (one preallocated set per input shape, outputs sized from the
    # contract, e.g. the VAE's 'latent_height*4') run on CPU buffers (OrtValues or torch tensors), so it
    # is tested without a GPU.
    from atdiff.runtime.backends.ort_backend import OrtRunner
    from atdiff.runtime.backends.ort_binding import make_arrays
    manifest = read_manifest(lcm_export)
    contract = manifest.contract(component)
    adapter = make_arrays(arrays, "cpu", 0)
    plain = OrtRunner.for_component(manifest, component)
    bound = OrtRunner.for_component(manifest, component, arrays=adapter)
    output = contract.output_names()[0]
    for point in ("min", "max", "min"):            # the second 'min' reuses the first buffers
        inputs = contract.sample_inputs(point, seed=1)
        got = bound({name: adapter.from_numpy(value) for name, value in inputs.items()})[output]
        np.testing.assert_array_equal(adapter.to_numpy(got), plain(inputs)[output])
    assert len(bound._buffers) == 2


# ---- arrays="torch": the samplers compute on torch tensors, the networks read/write them by address ----

TORCH_CASES = {  # export fixture -> request (CFG with a 2B batch, LCM's w-embedding, int64 class labels,
    # per-step noise from the host, fp16 casts inside the binding)
    "lcm_export": dict(prompts=["astronaut in a jungle", "a red cube"], steps=3, seed=0),
    "lcm_fp16_export": dict(prompts=["astronaut in a jungle"], steps=3, seed=1),
    "sd_export": dict(prompts=["astronaut in a jungle"], steps=3, seed=2, guidance_scale=7.5, sampler="dpmpp_2m"),
    "uncond_export": dict(num_images=2, steps=3, seed=3, sampler="iddpm"),
    "class_export": dict(num_images=2, steps=3, seed=4, class_labels=[0, 2], sampler="ddim"),
}


@pytest.mark.parametrize("export", list(TORCH_CASES))
def test_torch_arrays_give_the_numpy_images(export, request):
    export_dir = request.getfixturevalue(export)
    with Pipeline.load(export_dir, backend="onnxruntime", device="cpu") as pipe:
        expected = pipe(**TORCH_CASES[export])
        assert "numpy arrays" in expected.backend and "IO binding" not in expected.backend
    with Pipeline.load(export_dir, backend="onnxruntime", device="cpu", arrays="torch") as pipe:
        got = pipe(**TORCH_CASES[export])
        assert "torch arrays, IO binding" in got.backend
    # the same ORT kernels on the same shapes (the networks agree bit for bit, see the IO-binding test above);
    # only the samplers' elementwise float32 ops run in torch instead of numpy
    steps = TORCH_CASES[export]["steps"]
    assert_close_scaled(got.latents, expected.latents, sampler_ops_rel(steps), what="latents")
    assert_close_scaled(got.samples, expected.samples, sampler_ops_rel(steps), what="samples")


def test_torch_arrays_stay_torch_between_steps(lcm_export):
    import torch
    with Pipeline.load(lcm_export, backend="onnxruntime", device="cpu", arrays="torch") as pipe:
        backend = pipe.backend
        x = backend.from_numpy(np.ones((1, 4, 8, 8), np.float32))
        assert isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
        context = backend.encode_text(np.zeros((1, 77), np.int64))
        assert isinstance(context, torch.Tensor) and context.dtype == torch.float32
        assert isinstance(backend.to_numpy(x), np.ndarray)


def test_torch_bound_buffers_are_reused_across_steps(lcm_export, monkeypatch):
    with Pipeline.load(lcm_export, backend="onnxruntime", device="cpu", arrays="torch") as pipe:
        unet = pipe.backend._runners["unet"]
        seen, returned = [], []
        denoise = pipe.backend.denoise

        def spy(*args, **kwargs):
            out = denoise(*args, **kwargs)
            (buffers,) = unet._buffers.values()      # one shape signature for the whole loop
            bound_out = buffers.binding.get_outputs()[0]
            seen.append((buffers.inputs["sample"].data_ptr(), buffers.outputs["model_output"].data_ptr(),
                         bound_out.data_ptr()))
            returned.append(out.data_ptr())
            return out
        monkeypatch.setattr(pipe.backend, "denoise", spy)
        pipe(["astronaut in a jungle"], steps=4, seed=0)
        pipe(["a red cube"], steps=2, seed=1)
    assert len(seen) == 6 and len(set(seen)) == 1                  # same addresses every step and call
    sample_ptr, output_ptr, ort_output_ptr = seen[0]
    assert ort_output_ptr == output_ptr                            # ORT writes into the torch tensor itself
    assert output_ptr not in returned and sample_ptr not in returned  # the sampler gets copies, never the buffers


def test_torch_arrays_without_torch_is_an_error(uncond_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)               # 'import torch' now raises ImportError
    with pytest.raises(BackendError, match=r"arrays='torch' needs torch.*pip install torch.*arrays='numpy'"):
        Pipeline.load(uncond_export, backend="onnxruntime", device="cpu", arrays="torch")
    with Pipeline.load(uncond_export, backend="onnxruntime", device="cpu") as pipe:   # the default needs none
        assert "numpy arrays" in pipe.backend.describe()


def test_unknown_arrays_is_an_error(uncond_export):
    with pytest.raises(BackendError, match="arrays 'cupy' is not one of numpy, torch"):
        Pipeline.load(uncond_export, backend="onnxruntime", device="cpu", arrays="cupy")


def test_default_arrays_on_cuda_follow_torch(monkeypatch):
    # the default rule itself (no GPU needed): torch when it can use the GPU, numpy otherwise; an explicit
    # arrays='torch' that torch cannot serve is an error, never a switch to numpy
    from atdiff.runtime.backends import ort_binding
    monkeypatch.setattr(ort_binding, "torch_cuda_usable", lambda: False)
    assert ort_binding.make_arrays(None, "cuda", 0).name == "numpy"
    assert ort_binding.make_arrays(None, "cpu", None).name == "numpy"
    monkeypatch.setattr(ort_binding, "torch_cuda_usable", lambda: True)
    assert ort_binding.make_arrays(None, "cpu", None).name == "numpy"
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA build of torch"):
            ort_binding.make_arrays("torch", "cuda", 0)


CUDA_VARIANTS = [pytest.param({"arrays": "numpy"}, id="numpy"),
                 pytest.param({"arrays": "numpy", "cuda_graph": True}, id="numpy-graph"),
                 pytest.param({"arrays": "torch"}, id="torch",
                              marks=requires_cuda),
                 pytest.param({"arrays": "torch", "cuda_graph": True}, id="torch-graph",
                              marks=requires_cuda)]


def _cpu_and_cuda(export_dir, **cuda_options):
    request = dict(prompts=["astronaut in a jungle", "a red cube"], steps=4, seed=0)
    with Pipeline.load(export_dir, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        expected = pipe(**request).latents
    with Pipeline.load(export_dir, backend="onnxruntime", device="cuda", dtype="float32", **cuda_options) as pipe:
        got = [pipe(**request) for _ in range(2)]   # the second run replays captured graphs
        assert f"{cuda_options['arrays']} arrays, IO binding" in got[0].backend
        if cuda_options["arrays"] == "torch":       # the latents stayed on the GPU: one buffer set, reused
            (buffers,) = pipe.backend._runners["unet"]._buffers.values()
            assert buffers.inputs["sample"].device.type == "cuda"
    return expected, [out.latents for out in got]


@needs_cuda_ep
@pytest.mark.parametrize("cuda_options", CUDA_VARIANTS)
def test_cuda_io_binding_matches_cpu(lcm_export, cuda_options):
    expected, got = _cpu_and_cuda(lcm_export, **cuda_options)
    for latents in got:   # CPU vs CUDA kernels: the text encoder and 4 UNet steps round differently
        assert_close_scaled(latents, expected, network_rel(TINY_TEXT_ENCODER_LAYERS + 4 * TINY_TEXT_UNET_LAYERS))


@needs_cuda_ep
@requires_cuda
def test_cuda_default_arrays_are_torch(uncond_export):
    with Pipeline.load(uncond_export, backend="onnxruntime", device="cuda") as pipe:
        assert "torch arrays, IO binding" in pipe.backend.describe()


@needs_cuda_ep
@requires_cuda
def test_cuda_torch_fp16_matches_cpu(lcm_fp16_export):
    request = dict(prompts=["astronaut in a jungle"], steps=4, seed=0)
    with Pipeline.load(lcm_fp16_export, backend="onnxruntime", device="cpu") as pipe:
        expected = pipe(**request).latents
    with Pipeline.load(lcm_fp16_export, backend="onnxruntime", device="cuda", arrays="torch",
                       cuda_graph=True) as pipe:
        got = [pipe(**request).latents for _ in range(2)]
    # fp16 kernels differ between providers: 4 UNet steps' layer outputs each round to fp16 on both sides. Counted
    # one after another (network_rel) that exceeds 1; independent roundings add as a random walk, sqrt(n) EPS16
    fp16_rel = (4 * TINY_TEXT_UNET_LAYERS) ** 0.5 * EPS16
    for latents in got:
        assert_close_scaled(latents, expected, fp16_rel)
