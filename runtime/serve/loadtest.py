"""A bounded load test of the HTTP server on 127.0.0.1: ``clients`` concurrent clients send ``requests`` generate
requests in all (one image each, seed = base seed + request index); every answer is checked to be a PNG for the
seed that was asked. ``toolkit bench serve`` runs it batched and with ``max_batch=1`` on one loaded model."""
from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time

PROMPTS = ("a photo of a sneaker", "a red dress", "a black and white picture of an ankle boot", "a bag",
           "a photo of a coat", "a shirt", "a sandal", "a pullover")


@dataclasses.dataclass
class LoadResult:
    clients: int
    requests: int
    max_batch: int
    max_wait_ms: float
    ok: int
    errors: int          # answered, but not 200 with the right image
    lost: int            # never answered (connection error, client-side timeout)
    wall_s: float
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float | None   # images per pipeline call, as the server reported per request

    def row(self) -> str:
        ms = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
        return (f"| {self.max_batch} | {self.clients} | {self.requests} | {self.throughput_rps:.1f} | "
                f"{ms(self.p50_ms)} | {ms(self.p99_ms)} | {self.mean_batch or 0:.2f} | {self.errors} | {self.lost} |")


TABLE_HEADER = ("| max batch | clients | requests | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch | errors | "
                "lost |\n|---|---|---|---|---|---|---|---|---|")


def run_load(url: str, *, clients: int, requests: int, steps: int | None, seed: int, max_batch: int,
             max_wait_ms: float, timeout_s: float = 300.0, headers: dict | None = None) -> LoadResult:
    return asyncio.run(_load(url, clients, requests, steps, seed, max_batch, max_wait_ms, timeout_s, headers or {}))


async def _load(url, clients, requests, steps, seed, max_batch, max_wait_ms, timeout_s, headers) -> LoadResult:
    import httpx
    latencies, batches, counts = [], [], {"ok": 0, "errors": 0, "lost": 0}
    queue = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s, headers=headers) as client:
        async def worker():
            for index in queue:  # one shared iterator: each request index is sent exactly once
                body = {"prompt": PROMPTS[index % len(PROMPTS)], "seed": seed + index, "format": "png"}
                if steps is not None:
                    body["steps"] = steps
                started = time.perf_counter()
                try:
                    answer = await client.post("/v1/generate", json=body)
                except httpx.HTTPError:
                    counts["lost"] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                good = (answer.status_code == 200 and answer.headers.get("x-seed") == str(seed + index)
                        and answer.content[:8] == b"\x89PNG\r\n\x1a\n")
                counts["ok" if good else "errors"] += 1
                if good:
                    batches.append(int(answer.headers.get("x-batch-size", "1")))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return LoadResult(clients=clients, requests=requests, max_batch=max_batch, max_wait_ms=max_wait_ms, **counts,
                      wall_s=round(wall, 3), throughput_rps=round(counts["ok"] / wall, 2),
                      p50_ms=_percentile_ms(latencies, 50), p99_ms=_percentile_ms(latencies, 99),
                      mean_batch=round(statistics.fmean(batches), 2) if batches else None)


def _percentile_ms(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)
