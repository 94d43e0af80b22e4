"""``toolkit serve``: a batched request gets the image it would get alone (within runtime/noise.py's
BATCHED_PIXEL_TOLERANCE); bad input gets one clear 4xx and
the server keeps serving; a full queue answers 503 + Retry-After; timeouts answer 504; the API key; metrics;
shutdown (SIGTERM) answers what is waiting; the load test (a small version of ``toolkit bench serve``)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from atdiff.runtime import Pipeline
from atdiff.runtime.serve.app import create_app
from atdiff.runtime.serve.loadtest import LoadResult, TABLE_HEADER, _percentile_ms, run_load
from atdiff.runtime.serve.schema import ServeLimits
from atdiff.runtime.serve.server import RunningServer
from tolerance import assert_same_seed_images

REPO = Path(__file__).resolve().parent.parent
KEEP_WAITING = dict(max_batch=2, max_wait_ms=600_000)   # a lone request waits for company until drained
FOUR_AT_ONCE = dict(max_batch=4, max_wait_ms=600_000)   # a batch runs only once 4 images wait: batching is forced


@pytest.fixture(scope="module")
def pipe(tiny_lcm_export):
    with Pipeline.load(tiny_lcm_export, backend="onnxruntime", device="cpu") as loaded:
        yield loaded


def serving(pipe, api_key=None, **limits) -> RunningServer:
    return RunningServer(lambda ready: create_app(pipe, ServeLimits(**limits), api_key=api_key, on_ready=ready))


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, max_batch=4, max_wait_ms=300) as running:
        yield running


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


async def post_all(url: str, bodies: list, headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        return await asyncio.gather(*(client.post("/v1/generate", json=body) for body in bodies))


def post(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", content=body if isinstance(body, bytes) else json.dumps(body),
                      timeout=60, **kwargs)


async def wait_for_queue_depth(client: httpx.AsyncClient, depth: int) -> None:
    for _ in range(100_000):   # each poll is a real request; bounded so a bug fails instead of hanging
        if f"toolkit_queue_depth {float(depth)}" in (await client.get("/metrics")).text:
            return
    raise AssertionError(f"the queue never reached depth {depth}")


def metric(text: str, name: str) -> float:
    """One sample's value in a /metrics page (``name`` with its labels, as Prometheus writes it)."""
    values = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name]
    assert len(values) == 1, (name, text)
    return values[0]


def test_batched_requests_get_the_images_made_alone(pipe):
    cases = [("astronaut in a jungle", 0), ("a red dress", 7), ("a bag", 3), ("astronaut in a jungle", 1)]
    with serving(pipe, **FOUR_AT_ONCE) as running:   # the first request waits until all four are in
        answers = asyncio.run(post_all(running.url, [{"prompt": p, "seed": s, "steps": 2} for p, s in cases]))
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.headers["x-batch-size"] for a in answers] == ["4"] * 4, "the four requests ran as one batch"
    assert [(a.headers["content-type"], a.headers["x-seed"]) for a in answers] == [("image/png", str(s))
                                                                                  for _, s in cases]
    alone = np.concatenate([pipe([prompt], seeds=[seed], steps=2).arrays for prompt, seed in cases])
    assert_same_seed_images(np.stack([decode(a.content) for a in answers]), alone, "served in one batch")
    record = json.loads(Image.open(io.BytesIO(answers[1].content)).info["at-diffusion-toolkit"])
    assert (record["prompt"], record["seed"], record["steps"]) == ("a red dress", 7, 2)


def test_json_format_returns_every_image_with_its_seed(server, pipe):
    answer = post(server.url, {"prompts": ["a bag", "a coat"], "num_images": 2, "seed": 5, "format": "json"})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    expected = pipe(["a bag", "a coat"], num_images=2, seed=5, steps=4)
    assert [(i["prompt"], i["seed"]) for i in data["images"]] == list(zip(expected.prompts, expected.seeds))
    assert_same_seed_images(np.stack([decode(base64.b64decode(i["png_base64"])) for i in data["images"]]),
                            expected.arrays, "json format")


BAD_REQUESTS = [
    (b"{bad", 400, "not valid JSON"),
    (b"", 400, "needs a JSON body"),
    (b"[1, 2]", 422, "must be a JSON object"),
    # least values: GenerationOptions.precheck's messages, the same as toolkit generate's (written once)
    ({"prompt": "x", "steps": 0}, 422, "^steps must be at least 1, got 0$"),
    ({"prompt": "x", "num_images": 0}, 422, "^num_images must be at least 1, got 0$"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "^guidance_scale must be >= 0 "),
    ({"prompt": "x", "height": 0}, 422, "^height must be at least 1, got 0$"),
    ({"prompt": "x", "steps": 100}, 422, r"steps 100 is more than this server allows \(8\)"),
    ({"prompt": "x", "steps": "four"}, 422, "^steps: "),
    ({"prompt": "x" * 100_000}, 422, "a prompt has 100000 characters; this server takes at most 2000"),
    ({"prompt": "x", "colour": "red"}, 422, "unknown field 'colour'; the fields are: prompt, prompts"),
    ({"prompt": "x", "prompts": ["y"]}, 422, "give 'prompt' or 'prompts', not both"),
    ({"prompt": "x", "num_images": 3}, 422, "format 'png' returns one image and this request makes 3"),
    ({"prompt": "x", "num_images": 5, "format": "json"}, 422, r"at most 4 per request \(--max-batch\)"),
    ({"prompt": "x", "height": 4096}, 422, "height 4096 is larger than this server serves"),
    ({"prompt": "x", "sampler": "euler"}, 422, "unknown sampler 'euler'"),
    ({"steps": 2}, 422, "no prompt given"),
    ({"prompt": "x", "seed": -1}, 422, "^seeds must be non-negative integers, got -1"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_one_clear_message_and_the_server_keeps_serving(server, body, status, message):
    answer = post(server.url, body)
    assert answer.status_code == status
    assert list(answer.json()) == ["error"]
    assert re.search(message, answer.json()["error"]), answer.json()["error"]
    assert post(server.url, {"prompt": "a bag", "steps": 1}).status_code == 200


def test_a_full_queue_answers_503_and_shutdown_answers_the_waiting_request(pipe):
    running = serving(pipe, max_queue=1, **KEEP_WAITING)

    async def scenario():
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            waiting = asyncio.create_task(client.post("/v1/generate", json={"prompt": "a bag", "seed": 1}))
            await wait_for_queue_depth(client, 1)
            refused = await client.post("/v1/generate", json={"prompt": "a coat"})
            running.server.should_exit = True          # what SIGTERM does
            return refused, await waiting
    try:
        refused, waited = asyncio.run(scenario())
    finally:
        running.close()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-queue 1" in refused.json()["error"]
    assert waited.status_code == 200 and waited.headers["x-seed"] == "1"


def test_a_request_past_its_timeout_gets_504_and_leaves_the_queue(pipe):
    with serving(pipe, timeout_s=0.2, **KEEP_WAITING) as running:
        answer = post(running.url, {"prompt": "a bag"})
        metrics = httpx.get(f"{running.url}/metrics").text
    assert answer.status_code == 504 and "not done within 0.2 s" in answer.json()["error"]
    assert "toolkit_queue_depth 0.0" in metrics
    assert 'toolkit_errors_total{kind="timeout"} 1.0' in metrics


def test_api_key_guards_generate_and_metrics_but_not_the_probes(pipe):
    with serving(pipe, api_key="s3cret") as running:
        assert post(running.url, {"prompt": "a bag"}).status_code == 401
        assert post(running.url, {"prompt": "a bag"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(running.url, {"prompt": "a bag"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{running.url}/metrics").status_code == 401
        assert httpx.get(f"{running.url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{running.url}/readyz").json() == {"ready": True}


def test_metrics_count_requests_batches_and_errors(pipe):
    with serving(pipe, max_wait_ms=0) as running:   # a fresh server: its counts are these requests' only
        assert post(running.url, {"prompt": "a bag", "steps": 9}).status_code == 422
        assert post(running.url, {"prompts": ["a bag", "a coat"], "steps": 1, "format": "json"}).status_code == 200
        text = httpx.get(f"{running.url}/metrics").text
    assert metric(text, 'toolkit_requests_total{status="200"}') == 1
    assert metric(text, 'toolkit_requests_total{status="422"}') == 1
    assert metric(text, 'toolkit_errors_total{kind="validation"}') == 1
    assert metric(text, "toolkit_images_total") == 2
    assert metric(text, "toolkit_request_latency_seconds_count") == 1   # successes only; the warm-up is not one
    assert (metric(text, "toolkit_batch_size_images_count"), metric(text, "toolkit_batch_size_images_sum")) == (1, 2)
    assert metric(text, 'toolkit_batch_size_images_bucket{le="1.0"}') == 0
    assert metric(text, "toolkit_queue_depth") == 0


def test_load_test_small_version_loses_nothing_and_batches(pipe):
    # 4 closed-loop clients and a batch that runs only when 4 images wait: every batch is exactly 4 requests
    with serving(pipe, **FOUR_AT_ONCE) as running:
        result = run_load(running.url, clients=4, requests=24, steps=2, seed=100, max_batch=4, max_wait_ms=600_000)
        text = httpx.get(f"{running.url}/metrics").text
    assert (result.ok, result.errors, result.lost, result.mean_batch) == (24, 0, 0, 4.0)
    assert metric(text, 'toolkit_requests_total{status="200"}') == 24
    assert metric(text, "toolkit_request_latency_seconds_count") == 24
    assert (metric(text, "toolkit_batch_size_images_count"), metric(text, "toolkit_batch_size_images_sum")) == (6, 24)


def test_load_latency_percentiles_are_the_inclusive_quantiles():
    latencies = [k / 1000 for k in range(100, 0, -1)]   # 1 ms .. 100 ms, unsorted
    assert (_percentile_ms(latencies, 50), _percentile_ms(latencies, 99)) == (50.5, 99.0)
    assert _percentile_ms([0.25], 99) == 250.0 and _percentile_ms([], 50) is None


def test_bench_serve_writes_both_configurations(tiny_lcm_export, tmp_path):
    from toolkit import app
    out = tmp_path / "bench"
    # 4 clients against --max-batch 4 and a wait longer than the run: every batched call holds exactly 4 images
    result = CliRunner().invoke(app, ["bench", "serve", str(tiny_lcm_export), "--clients", "4", "--requests", "16",
                                      "--max-batch", "4", "--max-wait-ms", "600000", "--steps", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "bench.json").read_text())
    results = record["results"]
    assert [(r["max_batch"], r["mean_batch"]) for r in results] == [(4, 4.0), (1, 1.0)]
    assert all(r["errors"] == 0 and r["lost"] == 0 and r["ok"] == 16 for r in results)
    assert record["batched_over_unbatched"] == results[0]["throughput_rps"] / results[1]["throughput_rps"]
    rows = [LoadResult(**r).row() for r in results]
    assert (out / "table.md").read_text() == "\n".join([TABLE_HEADER, *rows]) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_without_torch_and_sigterm_finishes_the_waiting_request(tiny_lcm_export):
    # torch/diffusers/transformers imports are made to fail: `toolkit serve` on an export must not need them
    port = free_port()
    code = ("import sys\nfor m in ('torch', 'diffusers', 'transformers'): sys.modules[m] = None\n"
            "import toolkit\nsys.argv = ['toolkit', *sys.argv[1:]]\ntoolkit.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(tiny_lcm_export), "--port", str(port),
                             "--max-batch", "2", "--max-wait-ms", "600000"], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stderr:   # uvicorn logs this once the lifespan (load + warm-up) is done
            if "Application startup complete" in line:
                break
        url = f"http://127.0.0.1:{port}"
        answers = []
        sender = threading.Thread(target=lambda: answers.append(post(url, {"prompt": "a bag", "seed": 2})))
        sender.start()

        async def queued():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                await wait_for_queue_depth(client, 1)
        asyncio.run(queued())
        proc.send_signal(signal.SIGTERM)
        sender.join(60)
        # uvicorn re-raises the SIGTERM it caught once shutdown is done, so the exit is "killed by SIGTERM" after
        # a clean drain (older uvicorn exits 0)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
    assert answers and answers[0].status_code == 200 and answers[0].headers["x-seed"] == "2"


def test_unconditional_export_serves_num_images_and_refuses_a_prompt(tiny_uncond_dir, tmp_path_factory):
    from atdiff.export.exporter import ExportSettings, run_export
    export = run_export(ExportSettings(model=str(tiny_uncond_dir), out=tmp_path_factory.mktemp("serve") / "uncond",
                                       validate=False), log=lambda m: None).out
    with Pipeline.load(export, backend="onnxruntime", device="cpu") as uncond, serving(uncond) as running:
        answer = post(running.url, {"num_images": 3, "seed": 4, "steps": 2, "format": "json"})
        refused = post(running.url, {"prompt": "a bag", "steps": 2})
        expected = uncond(num_images=3, seed=4, steps=2).arrays
    assert answer.status_code == 200, answer.text
    assert [i["seed"] for i in answer.json()["images"]] == [4, 5, 6]
    assert_same_seed_images(np.stack([decode(base64.b64decode(i["png_base64"])) for i in answer.json()["images"]]),
                            expected, "unconditional")
    assert refused.status_code == 422 and "unconditional and takes no prompt" in refused.json()["error"]


def test_the_body_maps_onto_generation_options_and_publishes_its_least_values():
    import dataclasses
    from atdiff.runtime.generation import MINIMA, GenerationOptions
    from atdiff.runtime.serve.schema import OPTION_FIELDS, GenerateBody, request_schema
    assert set(GenerateBody.model_fields) == {*OPTION_FIELDS, "prompt", "prompts", "format"}
    assert set(OPTION_FIELDS) <= {field.name for field in dataclasses.fields(GenerationOptions)}
    body = GenerateBody(prompt="a bag", num_images=2, steps=3, seed=5, guidance_scale=2.0, height=16, width=24,
                        sampler="lcm", format="json")
    assert body.options() == GenerationOptions(prompts=["a bag"], num_images=2, steps=3, seed=5, guidance_scale=2.0,
                                               height=16, width=24, sampler="lcm")
    spec = type("Spec", (), {"default_resolution": 32, "pixel_multiple": 8})()
    properties = request_schema(ServeLimits(), spec)["properties"]
    least = {name: [b.get("minimum") for b in properties[name].get("anyOf", [properties[name]]) if "type" in b
                    and b["type"] != "null"] for name in MINIMA.keys() & properties.keys()}
    assert least == {name: [MINIMA[name]] for name in ("num_images", "steps", "seed", "guidance_scale", "height",
                                                       "width")}
