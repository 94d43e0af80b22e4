"""Issue 27, step 2: the SD-1.5-size pipeline through the toolkit's commands as a user types them, one at a time.

    toolkit bench sd15-fixture /work/sd15/pipe
    nice -n 10 toolkit bench sd15 --pipe /work/sd15/pipe --work /work/sd15

Each step runs under GNU time with a memory ceiling (process.py) and appends its numbers (command, wall, CPU, peak
RSS, sizes of what it wrote) to WORK/results.json; a step already there is skipped unless --redo names it, so an
interrupted run resumes. ``--table`` prints the results as the markdown table docs/performance.md carries.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from atdiff.export.sd15.process import TreeWatch, finish, measure, start, stop_children
from atdiff.export.sd15.report import directory_bytes, generate_timings, image_agreement, table
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.staging import write_json

PROMPT = "astronaut in a jungle, cold color palette, muted colors"
STEPS = ("export", "generate-ort", "generate-torch", "triton", "serve", "optimum-export", "optimum-generate",
         "diffusers-generate")
PEERS = Path(__file__).with_name("peers.py")
RESULTS = "results.json"


def step_argv(step: str, pipe: Path, work: Path, port: int, peers: Path, seed: int = 0) -> list[str]:
    """The command a user types for ``step``; ``peers`` is optimum-onnx's venv."""
    export, images, python = work / "E", work / "images", str(peers / "bin" / "python")
    seeded = ["--seed", str(seed)]
    return {
        "export": ["toolkit", "export", str(pipe), "--fp16", "--out", str(export)],
        "generate-ort": ["toolkit", "generate", PROMPT, "--model", str(export), "--backend", "onnxruntime",
                         "--device", "cpu", "--steps", "4", *seeded, "--out", str(images / "ort")],
        "generate-torch": ["toolkit", "generate", PROMPT, "--model", str(pipe), "--backend", "torch", "--device", "cpu",
                           "--steps", "4", *seeded, "--out", str(images / "torch")],
        "triton": ["toolkit", "export", "triton", str(export), "--out", str(work / "R")],
        # a CPU generation at this size takes longer than serve's default 60 s request timeout
        "serve": ["toolkit", "serve", str(export), "--port", str(port), "--timeout", "1800"],
        "optimum-export": [str(peers / "bin" / "optimum-cli"), "export", "onnx", "--model", str(pipe), "--task",
                           "text-to-image", str(work / "optimum")],
        "optimum-generate": [python, str(PEERS), "optimum", str(work / "optimum"), *seeded, "--out", str(images / "peers")],
        # diffusers' pipeline in this venv (diffusers 0.42): the peers' venv needs an older one (peers.py)
        "diffusers-generate": [sys.executable, str(PEERS), "diffusers", str(pipe), *seeded, "--out",
                               str(images / "peers")],
    }[step]


def written(step: str, pipe: Path, work: Path) -> dict:
    """Sizes of what the step wrote (bytes)."""
    target = {"export": work / "E", "triton": work / "R", "optimum-export": work / "optimum",
              "generate-ort": work / "images" / "ort",
              "generate-torch": work / "images" / "torch"}.get(step)
    sizes = {"source_bytes": directory_bytes(pipe)} if step.endswith("export") else {}
    if target is not None and target.exists():
        sizes["written_bytes"] = directory_bytes(target)
        sizes["files"] = {p.relative_to(target).as_posix(): p.stat().st_size
                          for p in sorted(target.rglob("*")) if p.is_file() and p.stat().st_size > 2**20}
    return sizes


def serve_once(argv: list[str], log: Path, port: int, max_rss_gb: float, seed: int = 0,
               ready_timeout_s: float = 3600) -> dict:
    """Start ``toolkit serve``, wait for /readyz (load + warm-up), POST one request, SIGTERM, measure the whole."""
    import httpx
    time_file = log.with_suffix(".time")
    process = start(argv, log, time_file)
    watch = TreeWatch(process, int(max_rss_gb * 2**20))
    watch.start()
    began, base, record = time.perf_counter(), f"http://127.0.0.1:{port}", {}
    try:
        while time.perf_counter() - began < ready_timeout_s and process.poll() is None and watch.stopped is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        record["ready_s"] = round(time.perf_counter() - began, 1)
        if process.poll() is None and watch.stopped is None:
            sent = time.perf_counter()
            reply = httpx.post(f"{base}/v1/generate", json={"prompt": PROMPT, "steps": 4, "seed": seed}, timeout=1800)
            record.update(request_s=round(time.perf_counter() - sent, 1), status=reply.status_code,
                          reply_bytes=len(reply.content), content_type=reply.headers.get("content-type"))
    finally:
        stop_children(process.pid)   # the server (SIGTERM: its drain); GNU time lives on to write its numbers
    measured = finish(process, watch, argv, log, time_file)
    return {**measured.__dict__, **record}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory / 2**20, 1),
            "load_average": os.getloadavg(), "python": platform.python_version()}


def run_step(step: str, pipe: Path, work: Path, port: int, peers: Path, max_rss_gb: float, seed: int) -> dict:
    argv, log = step_argv(step, pipe, work, port, peers, seed), work / "logs" / f"{step}.log"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    before = machine()["load_average"]
    result = serve_once(argv, log, port, max_rss_gb, seed) if step == "serve" else measure(argv, log, max_rss_gb).__dict__
    result.update(step=step, started=started, load_before=before, **written(step, pipe, work))
    images = work / "images"
    if step.startswith("generate-"):
        result["timings"] = generate_timings(log.read_text())
    if step == "generate-torch" and (images / "ort").exists():
        result["ort_vs_torch"] = image_agreement(images / "ort", images / "torch")
    if step.endswith("-generate") and (images / "peers" / f"{step.split('-')[0]}.json").exists():
        engine = step.split("-")[0]
        result["peer"] = json.loads((images / "peers" / f"{engine}.json").read_text())
        result["ort_vs_peer"] = image_agreement(images / "ort", images / "peers" / f"{engine}.npy")
    return result


def command(pipe: Optional[Path] = typer.Option(None, help="The fixture directory (toolkit bench sd15-fixture)."),
            work: Path = typer.Option(..., help="Where the export, repository, images, logs and results go."),
            steps: str = typer.Option(",".join(STEPS), help="Comma-separated steps, in order."),
            redo: bool = typer.Option(False, help="Run steps already in results.json again."),
            port: int = typer.Option(8127, help="Port of the serve step."),
            peers: Path = typer.Option(Path("/work/sd15/venv-optimum"), help="The venv of the peers' steps."),
            max_rss_gb: float = typer.Option(16.0, help="Stop a step whose process tree passes this RSS."),
            seed: int = typer.Option(0, min=0, help="Seed of every generation (the same for every engine)."),
            show: bool = typer.Option(False, "--table", help="Only print the results table.")) -> None:
    """Run the SD-1.5-size path step by step and record wall time, CPU time, peak RSS and sizes."""
    path = work / RESULTS
    results = json.loads(path.read_text()) if path.exists() else {"machine": machine(), "steps": {}}
    if show and not path.exists():
        raise ToolkitError(f"no {RESULTS} in {work}: run `toolkit bench sd15 --pipe DIR --work {work}` first")
    if pipe is None and not show:
        raise ToolkitError("--pipe is needed to run steps (a directory made by `toolkit bench sd15-fixture DIR`)")
    for step in ([] if show else steps.split(",")):
        if step not in STEPS:
            raise typer.BadParameter(f"unknown step '{step}'; choose from {', '.join(STEPS)}")
        if step in results["steps"] and not redo:
            continue
        print(f"running {step}: {' '.join(step_argv(step, pipe, work, port, peers, seed))}", flush=True)
        results["steps"][step] = run_step(step, pipe, work, port, peers, max_rss_gb, seed)
        write_json(path, results)   # whole or not at all: an interrupted run resumes from the last step
    print(table(results))

