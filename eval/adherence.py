"""Prompt adherence of a text-to-image model trained on captioned Fashion-MNIST: generate images for one prompt
per class and count how often the shipped classifier (eval/classifier.py) sees the class the prompt names.

Sample i of a class uses seed ``seed + i`` (the same seeds for every class and every model), so two models'
accuracies differ by the models, not by sampling luck; the standard error over images is reported with it.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from atdiff.eval.fashion_prompts import class_prompts
from atdiff.runtime.errors import ToolkitError


@dataclasses.dataclass(frozen=True)
class AdherenceConfig:
    model: str
    steps: tuple[int, ...]
    per_class: int = 100
    seed: int = 0
    sampler: str | None = None
    guidance_scale: float | None = None
    backend: str = "torch"
    device: str = "auto"
    batch_size: int = 50


def run_adherence(config: AdherenceConfig, classifier) -> list[dict]:
    """One row per step count: accuracy (and its standard error), per-class accuracy, seconds."""
    from atdiff.runtime.pipeline import Pipeline
    if config.per_class < 1:
        raise ToolkitError(f"--per-class must be at least 1, got {config.per_class}")
    prompts = class_prompts()
    rows = []
    with Pipeline.load(config.model, backend=config.backend, device=config.device) as pipe:
        if not pipe.spec.is_latent:
            raise ToolkitError(f"{config.model} is not a text-to-image model; prompt adherence needs prompts")
        for steps in config.steps:
            started = time.perf_counter()
            correct = np.zeros((len(prompts), config.per_class), dtype=bool)
            for label, prompt in enumerate(prompts):
                out = pipe([prompt], num_images=config.per_class, steps=steps, seed=config.seed,
                           sampler=config.sampler, guidance_scale=config.guidance_scale,
                           batch_size=config.batch_size)
                correct[label] = classifier.predict(out.arrays) == label
            accuracy = float(correct.mean())
            rows.append({"steps": steps, "accuracy": accuracy,
                         "accuracy_sem": float(correct.std(ddof=1) / np.sqrt(correct.size)) if correct.size > 1 else None,
                         "per_class": {p: float(c.mean()) for p, c in zip(prompts, correct)},
                         "num": int(correct.size), "seconds": round(time.perf_counter() - started, 2),
                         "backend": pipe.backend.describe()})
    return rows
