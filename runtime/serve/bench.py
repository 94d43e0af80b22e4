"""``toolkit bench serve MODEL``: the load test of docs/serving.md, batched and unbatched, on one loaded model.

    toolkit bench serve exports/default-fp16 --clients 64 --requests 1024 --out bench/serve

Each configuration gets a fresh server (same loaded pipeline) on a free 127.0.0.1 port; results go to
OUT/bench.json and OUT/table.md (throughput, p50/p99 latency, mean batch, errors, lost requests)."""
from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path
from typing import Optional

import typer

from atdiff.runtime.devices import DEVICE_HELP
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.serve.loadtest import TABLE_HEADER


def command(
    model: str = typer.Argument(..., help="Export directory (or diffusers dir with --backend torch)."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    clients: int = typer.Option(64, help="Concurrent clients."),
    requests: int = typer.Option(512, help="Requests in all, per configuration."),
    max_batch: int = typer.Option(8, help="The batched configuration's --max-batch (the other has 1)."),
    max_wait_ms: float = typer.Option(10.0, help="The batched configuration's --max-wait-ms."),
    steps: Optional[int] = typer.Option(None, help="Steps per request (default: the model's)."),
    seed: int = typer.Option(0, help="Request i asks for seed + i."),
    out: Path = typer.Option(Path("bench/serve"), help="Directory for bench.json and table.md."),
) -> None:
    """Load-test `toolkit serve` on 127.0.0.1: batched vs --max-batch 1, same model, same requests."""
    if clients < 1 or requests < 1 or max_batch < 1:
        raise ToolkitError("--clients, --requests and --max-batch must be at least 1")
    from atdiff.runtime.pipeline import Pipeline
    from atdiff.runtime.staging import write_json
    from atdiff.runtime.provenance import versions
    with Pipeline.load(model, backend=backend, device=device) as pipe:
        typer.echo(f"load-testing {pipe.spec.name} on {pipe.backend.describe()}", err=True)
        results = [measure(pipe, clients=clients, requests=requests, max_batch=b, max_wait_ms=max_wait_ms,
                           steps=steps, seed=seed) for b in dict.fromkeys((max_batch, 1))]
        about = {"model": str(model), "backend": pipe.backend.describe(), "cpu_count": os.cpu_count(),
                 "machine": platform.platform(), "versions": versions()}
    speedup = results[0].throughput_rps / results[-1].throughput_rps if results[-1].throughput_rps else None
    table = "\n".join([TABLE_HEADER, *(r.row() for r in results)])
    write_json(out / "bench.json", {**about, "results": [dataclasses.asdict(r) for r in results],
                                    "batched_over_unbatched": speedup})
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    print(table)
    if speedup is not None:
        print(f"batched / unbatched throughput: {speedup:.2f}x ({out / 'bench.json'})")


def measure(pipe, *, clients: int, requests: int, max_batch: int, max_wait_ms: float, steps: int | None,
            seed: int):
    """One configuration: a fresh server around ``pipe`` with these limits, loaded by ``clients`` clients."""
    from atdiff.runtime.serve.app import create_app
    from atdiff.runtime.serve.loadtest import run_load
    from atdiff.runtime.serve.schema import ServeLimits
    from atdiff.runtime.serve.server import RunningServer
    limits = ServeLimits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max(256, 2 * clients),
                         timeout_s=600.0)
    with RunningServer(lambda ready: create_app(pipe, limits, on_ready=ready)) as server:
        return run_load(server.url, clients=clients, requests=requests, steps=steps, seed=seed, max_batch=max_batch,
                        max_wait_ms=max_wait_ms)
