"""The order in which a training run visits its data, as a pure function of (seed, step).

Why not ``DataLoader(shuffle=True)`` + ``accelerator.prepare``: resuming there means replaying or
skipping batches through the loader's RNG. Here sample number ``p`` of the run (counted over all
steps, processes and micro-batches) is ``perm(seed, p // n)[p % n]``, where ``perm(seed, epoch)`` is a
``torch.randperm`` drawn from a generator seeded with ``(seed, epoch)``. Step ``s`` of a run therefore
sees the same samples whether the run was resumed or not, on any number of processes: a global
batch of ``batch_size`` samples is cut into ``grad_accum * world_size`` equal micro-batches, and
process ``rank`` takes micro-batches ``rank, rank + world_size, ...``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (run seed, step, rank, ...) without collisions between
    nearby tuples, which ``seed + step`` would have."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class EpochPermutations:
    """``perm(seed, epoch)`` with a one-epoch cache (the stream walks epochs in order)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def sample_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_samples, generator=gen)
            self._epoch = epoch
        return int(self._perm[offset])


class StepBatchSampler:
    """A ``batch_sampler`` for ``DataLoader``: yields this process's micro-batches (lists of dataset
    indices), ``grad_accum`` per step, from ``start_step`` to ``max_steps``."""

    def __init__(self, num_samples: int, batch_size: int, grad_accum: int, world_size: int,
                 rank: int, seed: int, start_step: int, max_steps: int):
        parts = grad_accum * world_size
        if batch_size % parts:
            raise ValueError(f"batch size {batch_size} is not divisible by grad_accum * processes = {parts}")
        self.perms = EpochPermutations(num_samples, seed)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.micro = batch_size // parts
        self.start_step, self.max_steps = start_step, max_steps

    def micro_batch(self, step: int, micro_index: int) -> list[int]:
        chunk = micro_index * self.world_size + self.rank
        first = step * self.batch_size + chunk * self.micro
        return [self.perms.sample_at(p) for p in range(first, first + self.micro)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            for micro_index in range(self.grad_accum):
                yield self.micro_batch(step, micro_index)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
