"""Issue 27, step 3: the same pipeline through the peers. Optimum runs in a venv of its own: optimum-onnx 0.1 pins
transformers<4.58, which needs huggingface-hub<1.0, which diffusers 0.42 refuses (it needs >=1.32), so that venv has
diffusers 0.35.2; diffusers' own pipeline runs in the toolkit's venv (diffusers 0.42.1). This file imports neither
the toolkit nor anything outside numpy / torch / diffusers / optimum:

    python -m venv /work/sd15/venv-optimum
    /work/sd15/venv-optimum/bin/pip install torch==2.14.1 'optimum-onnx[onnxruntime]==0.1.0' optimum==2.1.0 \
        transformers==4.57.3 'huggingface-hub<1.0' diffusers==0.35.2 onnxruntime==1.32.0 onnx==1.23.2
    /work/sd15/venv-optimum/bin/optimum-cli export onnx --model /work/sd15/pipe --task text-to-image /work/sd15/optimum
    /work/sd15/venv-optimum/bin/python export/sd15/peers.py optimum /work/sd15/optimum --out /work/sd15/peers
    python export/sd15/peers.py diffusers /work/sd15/pipe --out /work/sd15/peers

Each run makes one 4-step image with the noise the toolkit's runtime draws for the same seed (atdiff.runtime.noise:
``numpy.random.Generator(PCG64(seed))``, draw 0 the initial latents, draw i+1 the noise LCM's step i injects), fed to
diffusers' LCMScheduler in place of its own ``randn_tensor``, so the three images are comparable pixel for pixel. It
writes ENGINE.npy (uint8 [H, W, 3]) and ENGINE.json (load, per-step and end-to-end seconds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = "astronaut in a jungle, cold color palette, muted colors"
GUIDANCE = 8.5   # the toolkit's LCM default (atdiff.runtime.generation.LCM_DEFAULT_GUIDANCE), diffusers' too


class RuntimeNoise:
    """The toolkit runtime's noise stream for one seed (atdiff.runtime.noise.SeededNoise with one sample)."""

    def __init__(self, seed: int, shape: tuple[int, ...]):
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.shape = shape

    def draw(self):
        import torch
        return torch.from_numpy(self.rng.standard_normal(self.shape, dtype=np.float32)[None])


def patch_scheduler_noise(noise: RuntimeNoise) -> None:
    """LCMScheduler.step draws its re-noising with ``randn_tensor``; hand it the runtime's next draw instead."""
    from diffusers.schedulers import scheduling_lcm

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        value = noise.draw()
        assert tuple(value.shape) == tuple(shape), (value.shape, shape)
        return value.to(device=device, dtype=dtype)
    scheduling_lcm.randn_tensor = draw


def load(engine: str, model: Path):
    if engine == "optimum":
        from optimum.onnxruntime import ORTLatentConsistencyModelPipeline
        return ORTLatentConsistencyModelPipeline.from_pretrained(str(model))
    import torch
    from diffusers import LatentConsistencyModelPipeline
    torch.set_grad_enabled(False)
    return LatentConsistencyModelPipeline.from_pretrained(str(model), torch_dtype=torch.float32)


def generate(engine: str, model: Path, size: int, steps: int, seed: int) -> tuple[np.ndarray, dict]:
    began = time.perf_counter()
    pipe = load(engine, model)
    loaded = time.perf_counter()
    noise = RuntimeNoise(seed, (4, size // 8, size // 8))
    patch_scheduler_noise(noise)
    marks = []

    def on_step(pipeline, index, timestep, kwargs):
        marks.append(time.perf_counter())
        return kwargs
    start = time.perf_counter()
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                 latents=noise.draw(), output_type="np", callback_on_step_end=on_step).images[0]
    end = time.perf_counter()
    steps_s = [b - a for a, b in zip([start, *marks], marks)]   # step 0 includes the text encoder
    record = {"engine": engine, "model": str(model), "size": size, "steps": steps, "seed": seed,
              "load_s": round(loaded - began, 2), "end_to_end_s": round(end - start, 2),
              "step_s": [round(s, 3) for s in steps_s],
              "median_later_step_s": round(statistics.median(steps_s[1:] or steps_s), 3)}
    return (image * 255).round().astype(np.uint8), record   # as the runtime (and diffusers' numpy_to_pil)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=("optimum", "diffusers"))
    parser.add_argument("model", type=Path, help="optimum: its ONNX export; diffusers: the fixture directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    image, record = generate(args.engine, args.model, args.size, args.steps, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / f"{args.engine}.npy", image)
    (args.out / f"{args.engine}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
