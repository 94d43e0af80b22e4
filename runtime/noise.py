"""Per-sample seeded noise, drawn on the host so every backend sees identical numbers.

Sample i of a batch owns the generator ``numpy.random.Generator(PCG64(seeds[i]))`` and draws its initial
noise and then each step's noise from it in order, so a batch of N gets the same noise as N runs of one with
the same seeds, and its images equal theirs within ``BATCHED_PIXEL_TOLERANCE``; torch / ONNX Runtime /
TensorRT outputs are comparable pixel for pixel.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from atdiff.runtime.errors import ToolkitError

# The promise "same seed -> same image" made for batching (docs/serving.md): an image made in a batch of any size
# or company differs from the one made alone with the same seed (and prompt, steps ...) by at most this many
# uint8 levels (of 255) per channel. Not 0 because the noise is per seed and every network per sample, but a
# batched convolution or matmul may run another kernel or blocking, which adds its float sums in another order:
# they round differently (in float32 ~1e-5 of the range after a whole generation, far below the half level
# that moves a pixel), so only a pixel sitting on a uint8 rounding boundary can move, by one level. Measured 0
# on CPU (ONNX Runtime fp32 and fp16: the tiny test models and models/default); not measured here on GPUs,
# whose libraries may pick another algorithm per batch size. tests/test_serve.py and tests/test_triton.py
# assert this bound.
BATCHED_PIXEL_TOLERANCE = 1
MIN_SEED = 0   # numpy's PCG64 takes non-negative seeds only (a ValueError deep in sampling)


def seeds_for(num: int, seed: int | None = None, seeds: Sequence[int] | None = None) -> list[int]:
    """``seeds`` as given, or ``seed, seed+1, ...`` for ``num`` samples (seed defaults to 0)."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != num:
            raise ToolkitError(f"got {len(seeds)} seeds for {num} images; pass one seed per image or a single --seed")
    else:
        base = 0 if seed is None else int(seed)
        seeds = [base + i for i in range(num)]
    if seeds and min(seeds) < MIN_SEED:
        raise ToolkitError(f"seeds must be non-negative integers, got {min(seeds)}; pass --seed {MIN_SEED} or higher")
    return seeds


class SeededNoise:
    """Standard normal float32 noise of ``shape`` per sample, one independent stream per seed."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int]):
        self.shape = tuple(shape)
        self._rngs = [np.random.Generator(np.random.PCG64(s)) for s in seeds]

    def draw(self) -> np.ndarray:
        """The next noise tensor [B, *shape] (each sample from its own stream)."""
        return np.stack([rng.standard_normal(self.shape, dtype=np.float32) for rng in self._rngs])


class StepNoise:
    """The sampler's ``noise(i)`` callable over a ``SeededNoise``: draw 0 is the initial noise, draw i+1 the
    noise step i injects, each drawn once and in order (so every sampler consumes the per-sample streams
    identically no matter how it calls back)."""

    def __init__(self, seeded: SeededNoise, backend):
        self._seeded, self._backend = seeded, backend
        self._index, self._last = -1, None   # only the latest draw is kept: long samplers stay light

    def _draw(self, index: int):
        if index < self._index:
            raise RuntimeError(f"noise draw {index} asked after draw {self._index}; samplers draw in step order")
        while self._index < index:
            self._last = self._backend.from_numpy(self._seeded.draw())
            self._index += 1
        return self._last

    def initial(self):
        return self._draw(0)

    def __call__(self, step: int):
        return self._draw(step + 1)
