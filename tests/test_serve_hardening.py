"""``toolkit serve`` under hostile or careless clients (issue 31): the step limit holds whatever the sampler's
default; types are strict; a body is limited while it streams (413) and must arrive in time (408); idle and
trickling connections are closed; shutdown is not held by a slow body; odd JSON (lone surrogates, huge integers,
deep nesting, NaN) gets a JSON 4xx; whatever is not foreseen gets a counted JSON 500; bad CLI values are refused
before the model loads; the API key covers the schema; replies do not carry the model's path.

Raw sockets where the bytes on the wire matter (an HTTP client would send the whole body at once); every read has
a socket timeout, so a server that never answers fails the test instead of hanging it."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from atdiff.runtime import Pipeline
from atdiff.runtime.serve.app import create_app, model_record
from atdiff.runtime.serve.body import BodyLimits
from atdiff.runtime.serve.schema import ServeLimits
from atdiff.runtime.serve.server import RunningServer

READ_TIMEOUT_S = 20   # a reply (or the close) must come long before this; only a broken server waits it out


@pytest.fixture(scope="module")
def pipe(tiny_lcm_export):
    with Pipeline.load(tiny_lcm_export, backend="onnxruntime", device="cpu") as loaded:
        yield loaded


def serving(pipe, api_key=None, record=None, **limits) -> RunningServer:
    return RunningServer(lambda ready: create_app(pipe, ServeLimits(**limits), api_key=api_key, record=record,
                                                  on_ready=ready))


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, max_wait_ms=0) as running:
        yield running


def post(url: str, body, **kwargs) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/generate", content=raw, timeout=60, **kwargs)


def assert_json_error(answer: httpx.Response, status: int, fragment: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json" and list(answer.json()) == ["error"]
    assert fragment in answer.json()["error"], answer.json()["error"]


def connect(url: str) -> socket.socket:
    where = urlsplit(url)
    return socket.create_connection((where.hostname, where.port), timeout=READ_TIMEOUT_S)


def head(length: int | None = None, chunked: bool = False, extra: str = "") -> bytes:
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
    return (f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}{extra}"
            "\r\n").encode()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout raises)."""
    data = b""
    for _ in range(100_000):
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    raise AssertionError("the server never closed the connection")


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response head (up to its blank line), and whatever arrived after it."""
    data = b""
    for _ in range(100_000):
        if b"\r\n\r\n" in data:
            head_, _, rest = data.partition(b"\r\n\r\n")
            return head_, rest
        piece = sock.recv(65536)
        assert piece, f"closed after {data!r}"
        data += piece
    raise AssertionError("no response head")


def parse_reply(data: bytes) -> tuple[int, dict, bytes]:
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines))
    return int(status_line.split()[1]), headers, body


def assert_raw_json_error(data: bytes, status: int, fragment: str) -> None:
    code, headers, body = parse_reply(data)
    assert code == status, data[:300]
    assert headers["content-type"] == "application/json" and fragment in json.loads(body)["error"]


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


# ---- 6: --max-steps holds whatever the sampler's default; strict types --------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "iddpm", "dpmpp_2m"])
def test_a_sampler_default_above_max_steps_is_refused_and_explicit_steps_run(server, sampler):
    assert_json_error(post(server.url, {"prompt": "a", "sampler": sampler}), 422,
                      f"sampler '{sampler}' runs 20 steps by default, more than this server allows (8)")
    answer = post(server.url, {"prompt": "a", "sampler": sampler, "steps": 2, "format": "json"})
    assert answer.status_code == 200 and answer.json()["steps"] == 2


@pytest.mark.parametrize("field, value", [("steps", True), ("num_images", True), ("seed", False), ("seed", 1.5),
                                          ("height", 64.5), ("steps", "2"), ("width", [64])])
def test_integer_fields_take_integers_only(server, field, value):
    # the field is named first; the rest of the sentence is pydantic's (its wording changes between releases)
    answer = post(server.url, {"prompt": "a", field: value})
    assert_json_error(answer, 422, f"{field}: ")
    assert answer.json()["error"].startswith(f"{field}: "), answer.json()["error"]


def test_an_integral_number_is_an_integer_as_json_schema_says(server):
    answer = post(server.url, {"prompt": "a", "steps": 2.0, "seed": 3.0, "format": "json"})
    assert answer.status_code == 200 and (answer.json()["steps"], answer.json()["images"][0]["seed"]) == (2, 3)


# ---- 7: the body limit holds while the body streams ---------------------------------------------------------------

def test_a_declared_content_length_over_the_limit_is_refused_before_any_body(server):
    with connect(server.url) as sock:
        sock.sendall(head(length=1 << 30))   # 1 GB announced, not a byte sent
        assert_raw_json_error(read_until_closed(sock), 413, "declares 1073741824 bytes; this server reads at most "
                                                            "1048576")


def test_a_chunked_body_is_refused_once_past_the_limit_without_its_end(server):
    chunk = b"x" * 65536
    with connect(server.url) as sock:   # 17 chunks: one byte past 1 MB at the 17th; the final 0-chunk never comes
        sock.sendall(head(chunked=True) + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)))
        assert_raw_json_error(read_until_closed(sock), 413, "sent more than 1048576 bytes")
    assert 'toolkit_requests_total{status="413"}' in metrics(server.url)


def test_the_body_limit_stops_reading_a_stream_at_the_limit():
    """In-process: a 1 GB stream of 64 KB messages is read only until it passes 1 MB, then answered 413 JSON."""
    pulled, sent, rejected = [], [], []

    async def endless_body():
        pulled.append(1)
        assert len(pulled) <= 16384, "read the whole gigabyte"
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send_):
        for _ in range(16385):
            if not (await receive()).get("more_body"):
                break
        raise AssertionError("the app got the whole stream")
    limited = BodyLimits(app, max_bytes=1 << 20, timeout_s=60, on_reject=lambda *why: rejected.append(why))
    asyncio.run(limited({"type": "http", "headers": []}, endless_body, send))
    assert len(pulled) == 17 and rejected == [(413, "validation")]
    assert sent[0]["status"] == 413 and "sent more than 1048576 bytes" in json.loads(sent[1]["body"])["error"]


# ---- 8: timeouts and connection limits ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_server(pipe):
    with serving(pipe, max_wait_ms=0, body_timeout_s=0.5, header_timeout_s=0.5, max_header_bytes=4096) as running:
        yield running


@pytest.mark.parametrize("sent", [b"", b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
                         ids=["idle", "trickled-head"])
def test_a_connection_without_a_whole_request_head_is_closed(strict_server, sent):
    with connect(strict_server.url) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""


def test_a_body_that_does_not_arrive_in_time_gets_408_json(strict_server):
    with connect(strict_server.url) as sock:
        sock.sendall(head(length=100) + b'{"prompt": ')
        assert_raw_json_error(read_until_closed(sock), 408, "did not arrive within 0.5 s (--body-timeout)")
    assert 'toolkit_errors_total{kind="timeout"}' in metrics(strict_server.url)


def test_a_request_head_growing_past_max_header_bytes_is_refused(strict_server):
    with connect(strict_server.url) as sock:   # a header that never ends: refused at 4 KB, not buffered on
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 8192)
        assert parse_reply(read_until_closed(sock))[0] == 400


def test_connections_beyond_limit_concurrency_get_503(pipe):
    with serving(pipe, limit_concurrency=3, keep_alive_s=60, header_timeout_s=60) as running:   # held, not closed
        held = [connect(running.url) for _ in range(2)]
        try:
            for sock in held:   # a whole keep-alive exchange: the server has surely counted this connection
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert httpx.get(f"{running.url}/healthz").status_code == 503
        finally:
            for sock in held:
                sock.close()


def test_a_slow_body_does_not_hold_shutdown_and_gets_408(pipe):
    running = serving(pipe, body_timeout_s=0.5)
    with connect(running.url) as sock:
        sock.sendall(head(length=100, extra="Expect: 100-continue\r\n") + b'{"pro')
        interim, rest = read_head(sock)
        assert interim.startswith(b"HTTP/1.1 100")   # the handler is reading the body now
        closing = threading.Thread(target=running.close)   # what SIGTERM does
        closing.start()
        reply = rest + read_until_closed(sock)
    closing.join(READ_TIMEOUT_S)
    assert not closing.is_alive(), "the slow body held the shutdown"
    assert_raw_json_error(reply, 408, "--body-timeout")


def test_cli_options_reach_the_server_limits(monkeypatch):
    from toolkit import app
    seen = {}
    monkeypatch.setattr("atdiff.runtime.serve.cli.run_server",
                        lambda model, limits, **kw: seen.update(limits=limits, **kw))
    result = CliRunner().invoke(app, ["serve", "some-export", "--body-timeout", "3", "--header-timeout", "4",
                                      "--keep-alive-timeout", "2", "--max-header-bytes", "8192",
                                      "--limit-concurrency", "99", "--shutdown-timeout", "7"])
    assert result.exit_code == 0, result.output
    limits = seen["limits"]
    assert (limits.body_timeout_s, limits.header_timeout_s, limits.keep_alive_s, limits.max_header_bytes,
            limits.concurrency, limits.shutdown_grace_s) == (3, 4, 2, 8192, 99, 7)
    assert seen["expose_model_path"] is False
    defaults = ServeLimits()
    assert (defaults.concurrency, defaults.shutdown_grace_s) == (256 + 8 + 64, 61)


# ---- 10: odd JSON gets a JSON 4xx; the unforeseen a counted JSON 500; bad CLI values ------------------------------

ODD_BODIES = [
    (b'{"prompt": "\\ud800"}', 422, "prompt: the text has a lone surrogate at character 0"),
    (b'{"prompts": ["ok", "a\\udfff"]}', 422, "prompts.1: the text has a lone surrogate at character 1"),
    (b'{"prompt": "a", "sampler": "\\ud800"}', 422, "sampler: the text has a lone surrogate"),
    (b'{"prompt": "a", "seed": ' + b"7" * 100_000 + b"}", 422, "an integer with 100000 digits; no field takes more "
                                                               "than 19 (seed: 0 to 9223372036854775807)"),
    (b'{"prompt": "a", "seed": 9223372036854775808}', 422, "seed: "),   # named; the rest is pydantic's wording
    (b"[" * 100_000 + b"]" * 100_000, 400, "nests arrays or objects too deeply"),
    (b'{"prompt": "a", "guidance_scale": NaN}', 400, "NaN is not a JSON number"),
    (b'{"prompt": "a", "guidance_scale": -Infinity}', 400, "-Infinity is not a JSON number"),
    (b'{"\\ud800": 1}', 422, "unknown field '\\ud800'; the fields are: prompt, prompts"),
]


@pytest.mark.parametrize("raw, status, fragment", ODD_BODIES, ids=[str(i) for i in range(len(ODD_BODIES))])
def test_odd_json_gets_a_json_4xx_and_the_server_keeps_serving(server, raw, status, fragment):
    assert_json_error(post(server.url, raw), status, fragment)
    assert post(server.url, {"prompt": "a bag", "steps": 1}).status_code == 200


def test_an_unforeseen_error_is_a_counted_json_500(pipe, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr("atdiff.runtime.serve.app._response", broken)
    with serving(pipe, max_wait_ms=0) as running:
        assert_json_error(post(running.url, {"prompt": "a", "steps": 1}), 500, "internal error (RuntimeError)")
        assert httpx.get(f"{running.url}/healthz").json() == {"status": "ok"}
        text = metrics(running.url)
    assert 'toolkit_requests_total{status="500"} 1.0' in text and 'toolkit_errors_total{kind="internal"} 1.0' in text


def test_unknown_paths_and_methods_get_json_errors(server):
    assert_json_error(httpx.get(f"{server.url}/nope"), 404, "Not Found: GET /nope")
    assert_json_error(httpx.get(f"{server.url}/v1/generate"), 405, "Method Not Allowed")


@pytest.mark.parametrize("option, value", [("--timeout", "0"), ("--timeout", "-1"), ("--timeout", "nan"),
                                           ("--timeout", "inf"), ("--max-wait-ms", "nan"), ("--max-wait-ms", "-5"),
                                           ("--body-timeout", "inf"), ("--header-timeout", "0"),
                                           ("--keep-alive-timeout", "nan"), ("--shutdown-timeout", "-inf")])
def test_cli_refuses_bad_durations_before_loading_the_model(option, value):
    from toolkit import app
    # the model path does not exist: an error about the option proves nothing was loaded first
    result = CliRunner().invoke(app, ["serve", "no-such-export", option, value])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} must be a finite number"), result.stderr


# ---- 11: the key covers the schema; replies carry the model's name, not its path ---------------------------------

def test_with_an_api_key_the_schema_needs_it_and_the_browser_docs_are_off(pipe):
    with serving(pipe, api_key="s3cret") as running:
        assert httpx.get(f"{running.url}/openapi.json").status_code == 401
        keyed = httpx.get(f"{running.url}/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert keyed.status_code == 200 and "/v1/generate" in keyed.json()["paths"]
        for path in ("/docs", "/redoc"):
            assert httpx.get(f"{running.url}{path}").status_code == 404
            assert httpx.get(f"{running.url}{path}", headers={"Authorization": "Bearer s3cret"}).status_code == 404


def test_without_a_key_the_docs_are_open_and_the_schema_describes_the_body(server):
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False and body["properties"]["steps"]["anyOf"][0]["maximum"] == 8


def test_replies_and_png_records_name_the_model_without_its_path(pipe):
    path = str(pipe.source.path)
    assert "model_path" not in model_record(pipe) and model_record(pipe)["model"] == pipe.spec.name
    assert model_record(pipe, with_path=True)["model_path"] == path
    with serving(pipe, record=model_record(pipe), max_wait_ms=0) as running:
        answer = post(running.url, {"prompt": "a", "steps": 1, "format": "json"})
    assert answer.status_code == 200 and answer.json()["model"] == pipe.spec.name
    png = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]["png_base64"])))
    assert path not in answer.text and path not in json.dumps(png.info)
    assert json.loads(png.info["at-diffusion-toolkit"])["model_sha256"] == model_record(pipe)["model_sha256"]
