"""Property-based fuzzing of ``toolkit serve``'s HTTP API (issue 31): requests generated from the server's own
OpenAPI document by Schemathesis (bodies that fit the schema and bodies that break it), plus arbitrary bytes and
arbitrary JSON, sent to a live server on 127.0.0.1 serving the tiny export. Every answer must be 2xx or 4xx, JSON
unless it is the PNG asked for, never 5xx, and the server must still answer /healthz and /readyz afterwards. And
Hypothesis over the request model: any request within the server's limits and the model's rules (odd Unicode
prompts, any seed, sampler, guidance scale, size) gets its images, with the seeds asked for.

Bounded for CI: a fixed number of examples per property, derandomized (the same examples on every run, so a
failure reproduces), and the server's limits kept small so a valid request generates at most 2 images of 2 steps."""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from atdiff.runtime import Pipeline
from atdiff.runtime.serve.app import create_app
from atdiff.runtime.samplers import available_samplers
from atdiff.runtime.serve.schema import MAX_SEED, ServeLimits
from atdiff.runtime.serve.server import RunningServer

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
LIMITS = ServeLimits(max_batch=2, max_steps=2, max_wait_ms=0, max_prompt_chars=200, max_size=32)


@pytest.fixture(scope="module")
def server(tiny_lcm_export):
    with Pipeline.load(tiny_lcm_export, backend="onnxruntime", device="cpu") as pipe:
        with RunningServer(lambda ready: create_app(pipe, LIMITS, on_ready=ready)) as running:
            yield running
            assert httpx.get(f"{running.url}/healthz").json() == {"status": "ok"}
            assert httpx.get(f"{running.url}/readyz").json() == {"ready": True}


def assert_answered_well(status: int, content_type: str, body: bytes, what) -> None:
    """2xx or 4xx; JSON, or the PNG of a 200 (and Prometheus text from /metrics); errors as {"error": ...}."""
    assert 200 <= status < 500, f"{status} for {what!r}: {body[:300]!r}"
    if content_type == "image/png":
        assert status == 200 and body.startswith(b"\x89PNG"), what
        return
    if what[:2] == ("GET", "/metrics") and status == 200:
        assert content_type.startswith("text/plain") and b"toolkit_requests_total" in body
        return
    assert content_type == "application/json", f"{status} {content_type} for {what!r}"
    data = json.loads(body)
    assert status < 300 or list(data) == ["error"], f"{status} {data} for {what!r}"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_requests_from_the_openapi_schema_get_2xx_or_a_json_4xx(server, mode):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/generate"), ("GET", "/healthz")}
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations])

    @FUZZ
    @given(case=strategy)
    def check(case):
        response = case.call(base_url=server.url, timeout=60)
        content_type = response.headers.get("content-type", [""])[0]   # schemathesis: every header is a list
        assert_answered_well(response.status_code, content_type, response.content, (case.method, case.path, case.body))
    check()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)
FIELDS = st.sampled_from(["prompt", "prompts", "negative_prompt", "num_images", "steps", "seed", "guidance_scale",
                          "height", "width", "sampler", "format"])
# JSON's \uXXXX escapes can spell lone surrogates, which Python strings (and so Hypothesis' text) never hold
SURROGATE_FIELD = st.tuples(FIELDS | st.just("\\udc00"), st.integers(0xD800, 0xDFFF)).map(
    lambda pair: ('{"%s": "x\\u%04x"}' % pair).encode())


@FUZZ
@given(body=st.binary(max_size=2048) | JSON.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(FIELDS, JSON, max_size=5).map(lambda v: json.dumps(v).encode()) | SURROGATE_FIELD)
def test_arbitrary_bytes_and_json_get_2xx_or_a_json_4xx(server, body):
    answer = httpx.post(f"{server.url}/v1/generate", content=body, timeout=60)
    assert_answered_well(answer.status_code, answer.headers.get("content-type", ""), answer.content,
                         ("POST", "/v1/generate", body))


@st.composite
def valid_requests(draw) -> dict:
    """A request this server must answer with images: within LIMITS, sizes on the tiny model's multiple of 8,
    steps always given (every sampler's default is above LIMITS.max_steps), no negative prompt (LCM has no CFG)."""
    prompts = draw(st.lists(st.text(max_size=LIMITS.max_prompt_chars), min_size=1, max_size=LIMITS.max_batch))
    body = {"prompt": prompts[0]} if len(prompts) == 1 and draw(st.booleans()) else {"prompts": prompts}
    body["num_images"] = draw(st.integers(1, LIMITS.max_batch // len(prompts)))
    body["steps"] = draw(st.integers(1, LIMITS.max_steps))
    body["format"] = "png" if body["num_images"] * len(prompts) == 1 and draw(st.booleans()) else "json"
    optional = {"seed": st.integers(0, MAX_SEED), "sampler": st.sampled_from(available_samplers()),
                "guidance_scale": st.floats(0, 100), "height": st.sampled_from([8, 16, 24, 32]),
                "width": st.sampled_from([8, 16, 24, 32])}
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        body[name] = draw(optional[name])
    return body


@settings(FUZZ, max_examples=40)
@given(body=valid_requests())
def test_any_request_within_the_limits_gets_its_images(server, body):
    answer = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert answer.status_code == 200, (body, answer.text)
    count = body["num_images"] * len(body.get("prompts") or [body.get("prompt")])
    seeds = [body.get("seed", 0) + i for i in range(count)]
    if body["format"] == "png":
        assert answer.content.startswith(b"\x89PNG") and answer.headers["x-seed"] == str(seeds[0])
    else:
        assert [image["seed"] for image in answer.json()["images"]] == seeds
