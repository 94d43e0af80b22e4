"""``atdiff.runtime.Pipeline``: the embeddable generation API.

    pipe = Pipeline.load("models/tiny-lcm", backend="torch", device="auto", dtype="auto")
    out = pipe(["astronaut in a jungle"], steps=4, seed=0)          # text-to-image (latent)
    out = pipe(num_images=16, sampler="ddim", steps=10, seed=0)      # unconditional pixel UNet
    out.images, out.arrays, out.samples, out.seeds, out.timings, out.backend

The pipeline owns everything between the user and the networks that is *not* a network: tokenizing,
seeds and noise, conditioning (CFG / LCM's w-embedding / class labels), the schedule and the sampler,
latent scaling and image conversion. Networks run behind a ``Backend`` (torch, onnxruntime, tensorrt),
so a new backend never touches this file. Shapes are fixed for the whole call (one batch shape, one
timestep grid), which is what lets a backend preallocate buffers and capture the loop in a CUDA graph.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from atdiff.runtime.backends import Backend, get_backend_class
from atdiff.runtime.conditioning import Conditioning, build_conditioning
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.generation import GenerationOptions, GenerationOutput, GenerationRequest
from atdiff.runtime.images import to_uint8
from atdiff.runtime.model_source import ModelSource, open_model
from atdiff.runtime.noise import SeededNoise, StepNoise
from atdiff.runtime.samplers import eps_scaling, get_sampler
from atdiff.runtime.schedule import NoiseSchedule


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text encoder's context; the images follow only its first tokens."""


class Pipeline:
    def __init__(self, source: ModelSource, backend: Backend):
        self.source = source
        self.spec = source.spec
        self.backend = backend
        self.schedule = NoiseSchedule.from_config(self.spec.scheduler_config)
        self._tokenizer = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | os.PathLike, backend: str = "torch", device: str = "auto",
             dtype: str = "auto", **backend_options: Any) -> "Pipeline":
        """``model``: a diffusers directory, an export directory or a hub id. ``device``: auto | cpu | cuda |
        cuda:N, ``"auto"`` being the backend's best device (CUDA when it can use one; ``backend.describe()``
        names the one chosen); ``dtype="auto"`` is float16 on GPU, float32 on CPU."""
        backend_cls = get_backend_class(backend)
        device = backend_cls.resolve_device(device)
        source = open_model(model)
        dtype = backend_cls.auto_dtype(source.path, device) if dtype == "auto" else dtype
        return cls(source, backend_cls.load(source.path, source.spec, device=device, dtype=dtype,
                                            **backend_options))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def default_sampler(self) -> str:
        return self.spec.default_sampler

    # ---- generation ---------------------------------------------------------------------
    def __call__(self, prompts: str | Sequence[str] | None = None, *, num_images: int | None = None,
                 steps: int | None = None, seed: int | None = 0,
                 seeds: Sequence[int] | None = None, sampler: str | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None,
                 class_labels: int | Sequence[int] | None = None, eps_scale: float | None = None,
                 batch_size: int | None = None, sampler_options: dict | None = None,
                 progress=None) -> GenerationOutput:
        """Generate images. Text-to-image: ``prompts`` (``num_images`` per prompt, default 1).
        Unconditional: no prompts, ``num_images`` samples (class-conditional models need
        ``class_labels``). ``steps``: sampling steps (every sampler here makes one network call per step).
        ``seed=s`` gives image i the seed s+i; ``seeds`` sets them one by one. ``batch_size`` splits the
        work into chunks of that many images (default: up to 8, ``DEFAULT_BATCH_SIZE``); results do not depend on it.
        ``progress(done, total)`` is called after each network evaluation."""
        options = GenerationOptions(
            prompts=prompts, num_images=num_images, steps=steps, seed=seed, seeds=seeds, sampler=sampler,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, height=height, width=width,
            class_labels=class_labels, eps_scale=eps_scale, batch_size=batch_size, sampler_options=sampler_options)
        return self.generate(options, progress=progress)

    def generate(self, options: GenerationOptions, progress=None) -> GenerationOutput:
        """``__call__`` with its arguments in one ``GenerationOptions`` (what the CLI and the server pass)."""
        request = self.request(options)
        for message in request.truncation_warnings(self.spec.tokenizer_max_length):
            warnings.warn(message, PromptTruncatedWarning, stacklevel=3)
        return self.run(request, progress=progress)

    def request(self, options: GenerationOptions) -> GenerationRequest:
        """``options`` validated against this model (no network runs): what ``run`` takes."""
        tokenizer = self.tokenizer() if self.spec.is_latent else None
        return GenerationRequest.build(self.spec, self.schedule, tokenizer, options)

    def run(self, request: GenerationRequest, progress=None) -> GenerationOutput:
        timings = {"encode_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
        started = time.perf_counter()
        chunks, latents = [], []
        total_evals = len(request.chunks()) * request.steps
        done = [0]

        def tick():
            done[0] += 1
            if progress is not None:
                progress(done[0], total_evals)

        with self.backend.session():
            for lo, hi in request.chunks():
                images, final = self._generate_chunk(request, lo, hi, timings, tick)
                chunks.append(images)
                latents.append(final)
        timings["total_s"] = time.perf_counter() - started
        samples = np.concatenate(chunks)
        return GenerationOutput(arrays=to_uint8(samples), samples=samples, latents=np.concatenate(latents),
                                seeds=list(request.seeds), prompts=request.prompts, timings=timings,
                                backend=self.backend.describe(), request=request.record())

    def _generate_chunk(self, request: GenerationRequest, lo: int, hi: int, timings: dict, tick):
        backend, spec = self.backend, self.spec
        t0 = time.perf_counter()
        tokenizer = self.tokenizer() if spec.is_latent else None
        cond = build_conditioning(backend, spec, tokenizer, request, lo, hi)
        backend.synchronize()
        t1 = time.perf_counter()
        noise = StepNoise(SeededNoise(request.seeds[lo:hi], request.latent_shape), backend)
        model = _counting(cond.model_fn(backend, self.schedule), tick)
        if request.eps_scale is not None:
            model = eps_scaling(model, self.schedule, request.eps_scale)
        sampler = get_sampler(request.sampler)
        x = noise.initial()  # init_noise_sigma is 1 for every schedule here (variance-preserving)
        x = sampler.fn(model, x, self.schedule, request.timesteps, noise, **request.sampler_fn_options)
        backend.synchronize()
        t2 = time.perf_counter()
        if spec.is_latent:
            images = backend.decode(x * (1.0 / spec.vae_scaling_factor))
        else:
            images = x
        images, final = backend.to_numpy(images), backend.to_numpy(x)
        t3 = time.perf_counter()
        timings["encode_s"] += t1 - t0
        timings["sample_s"] += t2 - t1
        timings["decode_s"] += t3 - t2
        return images.astype(np.float32), final.astype(np.float32)

    # ---- helpers ------------------------------------------------------------------------
    def tokenizer(self):
        if self._tokenizer is None:
            from atdiff.runtime.tokenizer import PromptTokenizer
            self._tokenizer = PromptTokenizer(self.source.tokenizer_dir, self.spec.tokenizer_max_length)
        return self._tokenizer


def _counting(model, tick):
    def counted(x, t):
        out = model(x, t)
        tick()
        return out
    return counted


__all__ = ["Pipeline", "GenerationOptions", "GenerationOutput", "GenerationRequest", "Conditioning", "ToolkitError"]
