"""Dynamic batching for ``toolkit serve``: compatible requests waiting at the same time run as one pipeline call.

Requests are compatible when their ``GenerationRequest``s differ only in what is per image (prompts, negative
prompts, seeds, class labels): same sampler, timesteps, size and guidance. The first waiting request opens a
batch; it runs when ``max_batch`` images are collected or ``max_wait_ms`` after that request arrived, whichever is
first. Noise is drawn per seed and every network here is per-sample, so an image does not depend on what it was
batched with, up to float rounding: within runtime/noise.py's BATCHED_PIXEL_TOLERANCE (tests/test_serve.py).

Written here rather than taken from a serving library because what makes two requests batchable is the
pipeline's own request type; the whole scheduler is one asyncio task in front of one worker thread (networks run
one batch at a time, which is what a CPU or one GPU can do anyway).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from atdiff.runtime.generation import GenerationRequest


class QueueFull(Exception):
    """More requests are waiting than the server accepts (``max_queue``); the client should retry later."""


def batch_key(request: GenerationRequest) -> tuple:
    """What must be equal for two requests to share one pipeline call."""
    return (request.sampler, tuple(request.timesteps.tolist()), request.latent_shape, request.height,
            request.width, request.guidance, request.guidance_scale, request.eps_scale,
            tuple(sorted(request.sampler_fn_options.items())))


def merge(requests: list[GenerationRequest]) -> GenerationRequest:
    """One request generating every image of ``requests``, in order (all share one ``batch_key``)."""
    first = requests[0]

    def joined(field):
        values = [getattr(r, field) for r in requests]
        return None if values[0] is None else [v for value in values for v in value]
    labels = None if first.class_labels is None else np.concatenate([r.class_labels for r in requests])
    seeds = joined("seeds")
    return dataclasses.replace(first, prompts=joined("prompts"), negative_prompts=joined("negative_prompts"),
                               seeds=seeds, class_labels=labels, batch_size=len(seeds), truncated_prompts={})


@dataclasses.dataclass
class _Waiting:
    request: GenerationRequest
    key: tuple
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    """``await batcher.submit(request)`` -> the request's images (uint8 [N, H, W, 3]) and the batch size it ran in.

    ``run_batch(request) -> uint8 images`` is called on one worker thread. Start with ``start()`` inside the
    event loop; ``close()`` stops taking requests, finishes every waiting one and stops the worker."""

    def __init__(self, run_batch: Callable[[GenerationRequest], np.ndarray], *, max_batch: int, max_wait_ms: float,
                 max_queue: int, on_batch: Callable[[int], None] | None = None):
        self.run_batch, self.max_batch, self.max_queue = run_batch, max_batch, max_queue
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch or (lambda size: None)
        self._waiting: deque[_Waiting] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="toolkit-serve-worker")

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the batch running now)."""
        return len(self._waiting)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, request: GenerationRequest) -> tuple[np.ndarray, int]:
        if self._closing:
            raise QueueFull("the server is shutting down")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
        waiting = _Waiting(request, batch_key(request), asyncio.get_running_loop().create_future(), time.monotonic())
        self._waiting.append(waiting)
        self._wakeup.set()
        try:
            return await waiting.future
        except asyncio.CancelledError:   # the client's timeout: drop it if it has not started running
            if waiting in self._waiting:
                self._waiting.remove(waiting)
            raise

    async def run_alone(self, request: GenerationRequest) -> np.ndarray:
        """Run ``request`` on the worker now, outside any batch (the server's warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.run_batch, request)

    def drain(self) -> None:
        """Stop taking requests and run the waiting ones now, without waiting for more company (event loop only)."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """``drain``, wait until every waiting request is answered, stop the worker."""
        self.drain()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    async def _loop(self) -> None:
        while self._waiting or not self._closing:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill(self._waiting[0])
            batch = self._take(self._waiting[0].key)
            await self._run(batch)

    async def _fill(self, first: _Waiting) -> None:
        """Wait until ``first``'s batch is full, its wait is over, or the server is closing."""
        deadline = first.arrived + self.max_wait_s
        while not self._closing and self._images_for(first.key) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    def _images_for(self, key: tuple) -> int:
        return sum(w.request.num_samples for w in self._waiting if w.key == key)

    def _take(self, key: tuple) -> list[_Waiting]:
        """The compatible waiting requests, oldest first, up to ``max_batch`` images (the first one always)."""
        batch, images = [], 0
        for waiting in list(self._waiting):
            if waiting.key != key:
                continue
            if batch and images + waiting.request.num_samples > self.max_batch:
                break
            batch.append(waiting)
            images += waiting.request.num_samples
            self._waiting.remove(waiting)
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        merged = merge([w.request for w in batch])
        self.on_batch(merged.num_samples)
        try:
            images = await asyncio.get_running_loop().run_in_executor(self._worker, self.run_batch, merged)
        except Exception as exc:  # noqa: BLE001 - handed to every request of the batch; the server keeps serving
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        start = 0
        for waiting in batch:
            count = waiting.request.num_samples
            if not waiting.future.done():
                waiting.future.set_result((images[start:start + count], merged.num_samples))
            start += count
