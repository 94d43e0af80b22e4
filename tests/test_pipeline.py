"""atdiff.runtime.Pipeline end to end on tiny random models: parity with diffusers' own pipelines, seeds,
batching, save/load round trip, and bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from atdiff.runtime import Pipeline
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.noise import SeededNoise
from atdiff.runtime.schedule import NoiseSchedule
from tolerance import (TINY_PIXEL_UNET_LAYERS, TINY_TEXT_ENCODER_LAYERS, TINY_TEXT_UNET_LAYERS, TINY_VAE_DECODER_LAYERS,
                       assert_close_scaled, clipped_step_growth, guidance_amplification, layer_count, network_rel,
                       sampler_ops_rel, schedule_rel)

PROMPTS = ["astronaut in a jungle", "a red cube"]


@pytest.fixture(scope="module")
def lcm_pipe(tiny_lcm_dir):
    with Pipeline.load(tiny_lcm_dir, backend="torch", device="cpu") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def uncond_pipe(tiny_uncond_dir):
    with Pipeline.load(tiny_uncond_dir, backend="torch", device="cpu") as pipe:
        yield pipe


def _our_noise(seeds, shape, draws):
    """The noise our pipeline draws: draw 0 is the initial latent, draw i+1 what step i injects."""
    stream = SeededNoise(seeds, shape)
    return [torch.from_numpy(stream.draw()) for _ in range(draws)]


def diffusers_rel(ref_pipe, steps: int, guidance_scale: float = 1.0) -> float:
    """ours vs a diffusers pipeline that ran (its scheduler holds the grid) the same torch networks: its float32
    alphas_cumprod is off ours by delta relative to alpha_bar or 1 - alpha_bar on the grid (read from the two
    schedules), moving each step's sqrt(alpha_bar) / sqrt(1 - alpha_bar) by up to that; the two round ~10
    elementwise ops per step (the guided eps's scaled by CFG) and a few preparing the VAE's input (one step more)."""
    ours = NoiseSchedule.from_config(dict(ref_pipe.scheduler.config)).alphas_cumprod
    delta = schedule_rel(ref_pipe.scheduler.alphas_cumprod, ours, ref_pipe.scheduler.timesteps)
    return steps * delta + sampler_ops_rel(steps + 1) * guidance_amplification(guidance_scale)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_matches_diffusers_pipeline(tiny_lcm_dir, lcm_pipe, monkeypatch, steps):
    from diffusers import LatentConsistencyModelPipeline
    import diffusers.schedulers.scheduling_lcm as lcm_module

    ref = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    noise = _our_noise([0, 1], (4, 16, 16), steps + 1)
    # diffusers' LCM re-injects noise through randn_tensor between steps; feed it our step noise
    injected = iter(noise[1:])
    monkeypatch.setattr(lcm_module, "randn_tensor", lambda *a, **k: next(injected))
    expected = ref(PROMPTS, num_inference_steps=steps, guidance_scale=8.5, latents=noise[0],
                   output_type="np").images
    out = lcm_pipe(PROMPTS, steps=steps, seed=0, guidance_scale=8.5)
    ours = np.clip(out.samples / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert_close_scaled(ours, expected, diffusers_rel(ref, steps))   # the w-embedding is no CFG: no amplification
    assert out.arrays.shape == (2, 64, 64, 3) and out.arrays.dtype == np.uint8


def test_cfg_ddim_matches_diffusers_sd_pipeline(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    latents = _our_noise([5], (4, 16, 16), 1)[0]
    expected = ref(PROMPTS[:1], num_inference_steps=5, guidance_scale=7.5, latents=latents, output_type="np",
                   negative_prompt=["blurry"]).images
    with Pipeline.load(tiny_sd_dir, device="cpu") as pipe:
        assert pipe.default_sampler == "ddim"
        out = pipe(PROMPTS[:1], steps=5, seed=5, guidance_scale=7.5, negative_prompt="blurry")
    assert out.request["guidance"] == "cfg"
    ours = np.clip(out.samples / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert_close_scaled(ours, expected, diffusers_rel(ref, 5, 7.5))
    with Pipeline.load(tiny_sd_dir, device="cpu") as pipe, \
            pytest.raises(ToolkitError, match="guidance scale 1.0 <= 1 turns it off"):  # was silently unused
        pipe(PROMPTS[:1], steps=1, guidance_scale=1.0, negative_prompt="blurry")


def test_tolerance_layer_counts_are_the_tiny_models(lcm_pipe, uncond_pipe, tiny_sd_dir):
    """tests/tolerance.py's network tolerances count these layers (the ONNX tests cannot load the torch models)."""
    backend = lcm_pipe.backend
    assert layer_count(backend.text_encoder) == TINY_TEXT_ENCODER_LAYERS
    assert layer_count(backend.unet) == TINY_TEXT_UNET_LAYERS
    assert layer_count(backend.vae.decoder) + layer_count(backend.vae.post_quant_conv) == TINY_VAE_DECODER_LAYERS
    assert layer_count(uncond_pipe.backend.unet) == TINY_PIXEL_UNET_LAYERS
    with Pipeline.load(tiny_sd_dir, backend="torch", device="cpu") as sd:
        assert layer_count(sd.backend.unet) == TINY_TEXT_UNET_LAYERS - 1   # no guidance embedding


def test_deterministic_and_seed_sensitive(lcm_pipe):
    a = lcm_pipe(PROMPTS[:1], steps=2, seed=7).arrays
    b = lcm_pipe(PROMPTS[:1], steps=2, seed=7).arrays
    c = lcm_pipe(PROMPTS[:1], steps=2, seed=8).arrays
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_batch_equals_per_sample_runs(lcm_pipe):
    batch = lcm_pipe(PROMPTS, steps=3, seed=10)
    assert batch.seeds == [10, 11]
    singles = [lcm_pipe([p], steps=3, seeds=[s]).samples for p, s in zip(PROMPTS, batch.seeds)]
    # batch 2 vs 1: torch may pick other kernels, so the text encoder, 3 UNet steps and the VAE round differently
    rel = network_rel(TINY_TEXT_ENCODER_LAYERS + 3 * TINY_TEXT_UNET_LAYERS + TINY_VAE_DECODER_LAYERS)
    assert_close_scaled(batch.samples, np.concatenate(singles), rel, what="per sample")
    chunked = lcm_pipe(PROMPTS, steps=3, seed=10, batch_size=1)
    assert_close_scaled(batch.samples, chunked.samples, rel, what="chunked")


def test_unconditional_samplers_and_batching(uncond_pipe):
    assert uncond_pipe.default_sampler == "ddim"
    for sampler in ("ddim", "dpmpp_2m", "iddpm"):
        out = uncond_pipe(num_images=3, sampler=sampler, steps=4, seed=0)
        assert out.arrays.shape == (3, 16, 16, 3) and out.request["steps"] == 4
        one = uncond_pipe(num_images=1, sampler=sampler, steps=4, seeds=[2])
        # batched conv sums round differently: 4 UNet evaluations' layers, grown by the clipping samplers' steps
        assert_close_scaled(out.samples[2:], one.samples, _pixel_batch_rel(uncond_pipe, out), what=sampler)
        assert np.isfinite(out.samples).all()


def _pixel_batch_rel(pipe, out) -> float:
    clips = pipe.schedule.clip_sample and out.request["sampler"] != "dpmpp_2m"   # DPM-Solver never clips
    growth = clipped_step_growth(pipe.schedule, out.request["timesteps"]) if clips else 1.0
    return network_rel(len(out.request["timesteps"]) * TINY_PIXEL_UNET_LAYERS, growth)


def test_eps_scaling_changes_output(uncond_pipe):
    plain = uncond_pipe(num_images=1, steps=5, seed=0).samples
    scaled = uncond_pipe(num_images=1, steps=5, seed=0, eps_scale=1.017).samples
    same = uncond_pipe(num_images=1, steps=5, seed=0, eps_scale=1.0).samples
    np.testing.assert_array_equal(plain, same)
    assert np.abs(plain - scaled).max() > 1e-4


def test_round_trip_through_save_and_load(tiny_lcm_dir, lcm_pipe, tmp_path):
    from diffusers import LatentConsistencyModelPipeline
    LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_dir, safety_checker=None).save_pretrained(tmp_path / "copy")
    with Pipeline.load(tmp_path / "copy", device="cpu") as copy:
        np.testing.assert_array_equal(copy(PROMPTS, steps=2, seed=3).arrays, lcm_pipe(PROMPTS, steps=2, seed=3).arrays)


def test_class_conditional_model(tmp_path):
    from atdiff.train.core.tiny_models import build_tiny_unconditional
    with Pipeline.load(build_tiny_unconditional(tmp_path / "cls", num_class_embeds=4), device="cpu") as pipe:
        a = pipe(num_images=2, class_labels=[0, 3], steps=2, seed=0)
        b = pipe(num_images=2, class_labels=1, steps=2, seed=0)
        assert a.request["class_labels"] == [0, 3] and b.request["class_labels"] == [1, 1]
        assert np.abs(a.samples - b.samples).max() > 0
        with pytest.raises(ToolkitError, match="class-conditional"):
            pipe(num_images=1)
        with pytest.raises(ToolkitError, match="0..3"):
            pipe(num_images=1, class_labels=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "no prompt"),
    (dict(prompts=PROMPTS, steps=0), "steps must be at least 1"),
    (dict(prompts=PROMPTS, height=60), "multiple of 8"),
    (dict(prompts=PROMPTS, seeds=[1]), "2 images"),
    (dict(prompts=PROMPTS, sampler="euler"), "euler"),
    (dict(prompts=PROMPTS, negative_prompt=["a", "b", "c"]), "negative prompts"),
    (dict(prompts=PROMPTS, negative_prompt="blurry"), "embeds the guidance"),   # was silently unused on an LCM
    (dict(prompts=PROMPTS, sampler_options={"bogus": 1}), "bogus"),
    (dict(prompts=PROMPTS, class_labels=1), "class labels"),
    (dict(prompts=PROMPTS, seed=-1), "non-negative"),          # was a ValueError from numpy's PCG64
    (dict(prompts=PROMPTS, seeds=[0, -5]), "non-negative"),
])
def test_bad_text_to_image_input(lcm_pipe, kwargs, message):
    prompts = kwargs.pop("prompts")
    with pytest.raises(ToolkitError, match=message):
        lcm_pipe(prompts, **kwargs)


def test_steps_is_the_one_name_in_the_api(uncond_pipe):
    from atdiff.runtime.generation import GenerationOptions
    assert "nfe" not in {field.name for field in dataclasses.fields(GenerationOptions)}
    with pytest.raises(TypeError, match="nfe"):
        uncond_pipe(num_images=1, nfe=2)


def test_bad_unconditional_input(uncond_pipe):
    with pytest.raises(ToolkitError, match="unconditional"):
        uncond_pipe(["a prompt"])
    with pytest.raises(ToolkitError, match="not class-conditional"):
        uncond_pipe(num_images=1, class_labels=0)


@pytest.mark.parametrize("model, kwargs, message", [
    ("does/not/exist/here", {}, "does not exist"),
    ("SimianLuo/LCM_Dreamshaper_v7", {}, "not in the local Hugging Face cache"),
    (None, dict(backend="tensorflow"), "unknown backend"),
    (None, dict(dtype="float16"), "float16 inference needs a GPU"),
    (None, dict(device="cudax"), "unknown device 'cudax'"),     # was a bare RuntimeError from torch.device
    (None, dict(device="cuda:one"), "unknown device 'cuda:one'"),
])
def test_bad_load_arguments(tiny_lcm_dir, model, kwargs, message):
    with pytest.raises(ToolkitError, match=message):
        Pipeline.load(model or tiny_lcm_dir, **{"device": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
def test_cuda_without_gpu_is_an_error(tiny_lcm_dir):
    with pytest.raises(ToolkitError, match="no CUDA GPU"):
        Pipeline.load(tiny_lcm_dir, device="cuda")


@pytest.mark.parametrize("options", [dict(dtype="bfloat16"), dict(channels_last=True)])
def test_torch_backend_variants_stay_close_to_fp32(tiny_lcm_dir, lcm_pipe, options):
    reference = lcm_pipe(PROMPTS[:1], steps=2, seed=1).samples
    with Pipeline.load(tiny_lcm_dir, device="cpu", **options) as pipe:
        out = pipe(PROMPTS[:1], steps=2, seed=1)
    tolerance = 0.1 if "dtype" in options else 1e-4   # bf16 keeps ~3 significant digits
    assert np.isfinite(out.samples).all()
    assert np.abs(out.samples - reference).mean() < tolerance
    assert options.get("dtype", "float32") in out.backend


def test_fp16_keeps_force_upcast_vaes_in_fp32(tiny_lcm_dir):
    # fp16 needs a GPU, so the rule is checked on its own here (the CUDA test below checks it end to end)
    from pathlib import Path
    from atdiff.runtime.backends.torch_backend import TorchBackend
    backend = TorchBackend.__new__(TorchBackend)
    backend._dtype = torch.float16
    assert backend._vae_dtype(Path(tiny_lcm_dir)) == torch.float32   # diffusers' VAEs default to force_upcast
    backend._dtype = torch.bfloat16
    assert backend._vae_dtype(Path(tiny_lcm_dir)) == torch.bfloat16  # bf16 has fp32's range: no overflow


@requires_cuda
@pytest.mark.parametrize("model", ["lcm", "uncond"])
def test_torch_backend_auto_on_cuda_is_fp16_and_close_to_cpu(tiny_lcm_dir, tiny_uncond_dir, model):
    # the GPU path end to end: host noise moved to the device, fp16 casts inside, float32 back at the boundary
    path, request = {"lcm": (tiny_lcm_dir, dict(prompts=PROMPTS, steps=2, seed=1)),
                     "uncond": (tiny_uncond_dir, dict(num_images=2, steps=2, seed=1))}[model]
    with Pipeline.load(path, device="cpu") as pipe:
        reference = pipe(**request)
    with Pipeline.load(path, device="cuda", dtype="auto") as pipe:
        out = pipe(**request)
    assert "cuda" in out.backend and "float16" in out.backend
    assert model == "uncond" or "VAE float32" in out.backend   # force_upcast VAEs stay fp32
    assert out.samples.dtype == np.float32 and np.isfinite(out.samples).all()
    assert np.abs(out.samples - reference.samples).mean() < 0.1   # fp16 keeps ~3 significant digits


def test_a_training_runs_model_is_named_after_the_run(tiny_uncond_dir, tmp_path):
    # runs/NAME/model used to be called 'model', so `toolkit export` wrote every run to exports/model
    import shutil
    from atdiff.runtime.model_spec import ModelSpec
    model = tmp_path / "fm-adm-at" / "model"
    shutil.copytree(tiny_uncond_dir, model)
    assert ModelSpec.from_diffusers_dir(model).name == "model"      # not a training output: its own name
    (model / "training.json").write_text("{}")
    assert ModelSpec.from_diffusers_dir(model).name == "fm-adm-at"
    with pytest.raises(ToolkitError, match="looks like a training run: its model is .*fm-adm-at/model"):
        ModelSpec.from_diffusers_dir(model.parent)   # the run directory instead of its model


def test_eps_scaling_on_a_v_prediction_model_fails_before_any_network_runs(tiny_uncond_dir, tmp_path):
    import json
    import shutil
    model = shutil.copytree(tiny_uncond_dir, tmp_path / "v-model")
    config_path = model / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    with Pipeline.load(model, device="cpu") as pipe:
        pipe.backend.denoise = None   # any network call would now fail with a TypeError, not the message
        with pytest.raises(ToolkitError, match="epsilon-prediction"):
            pipe(num_images=1, steps=2, eps_scale=1.017)


def test_lcm_without_w_embedding_samples_without_cfg_by_default(tiny_sd_dir, tmp_path):
    # `toolkit train lcm --no-w-embedding` saves an SD pipeline with an LCMScheduler, guidance baked in; it
    # used to get CFG 7.5 by default, against docs/lcm-at.md ("sample it without CFG")
    import json
    import shutil
    model = tmp_path / "lcm-no-w"
    shutil.copytree(tiny_sd_dir, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "LCMScheduler", "original_inference_steps": 50}))
    with Pipeline.load(model, device="cpu") as pipe:
        assert pipe(PROMPTS[:1], steps=1).request["guidance"] == "none"
        assert pipe(PROMPTS[:1], steps=1, guidance_scale=2.0).request["guidance"] == "cfg"


def test_planned_tensorrt_backend_says_it_is_not_built_yet(tiny_lcm_dir):
    with pytest.raises(ToolkitError, match="planned .* not implemented yet"):
        Pipeline.load(tiny_lcm_dir, backend="tensorrt")


def test_default_batch_is_bounded_and_changes_nothing(uncond_pipe):
    """Without batch_size the network sees at most DEFAULT_BATCH_SIZE images at once (a big --num-images
    must not run out of memory); the images equal one batch of all of them."""
    from atdiff.runtime.generation import DEFAULT_BATCH_SIZE
    calls = []
    out = uncond_pipe(num_images=DEFAULT_BATCH_SIZE + 3, steps=2, seed=0,
                      progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == 2 * 2   # two chunks x two steps
    whole = uncond_pipe(num_images=DEFAULT_BATCH_SIZE + 3, steps=2, seed=0, batch_size=DEFAULT_BATCH_SIZE + 3)
    assert_close_scaled(out.samples, whole.samples, _pixel_batch_rel(uncond_pipe, out))


def test_long_prompts_warn_from_the_python_api(lcm_pipe):
    from atdiff.runtime.pipeline import PromptTruncatedWarning
    with pytest.warns(PromptTruncatedWarning, match="first 77"):
        out = lcm_pipe([" ".join(["word"] * 100)], steps=1, seed=0)
    assert list(out.request["truncated_prompts"]) == [0]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        assert "truncated_prompts" not in lcm_pipe(["short"], steps=1, seed=0).request
