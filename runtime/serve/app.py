"""The HTTP API of ``toolkit serve`` (FastAPI): ``POST /v1/generate``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``, ``GET /openapi.json``. One loaded ``Pipeline`` behind a ``DynamicBatcher``; docs/serving.md has
the API and examples. Every answer, errors included, is JSON (or the PNG asked for): a request the handlers did not
foresee gets a JSON 500, counted in /metrics, never a plain-text page."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.generation import GenerationRequest
from atdiff.runtime.images import png_bytes
from atdiff.runtime.serve.batcher import DynamicBatcher, QueueFull
from atdiff.runtime.serve.body import BodyLimits
from atdiff.runtime.serve.metrics import ServeMetrics
from atdiff.runtime.serve.schema import MAX_SEED, GenerateBody, ServeLimits, check_resolved_steps, request_schema

log = logging.getLogger("toolkit.serve")
MAX_INT_DIGITS = len(str(MAX_SEED))   # no integer field takes more digits than the largest seed


class _Rejected(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers


UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer KEY'"


def create_app(pipe, limits: ServeLimits, *, api_key: str | None = None, record: dict | None = None,
               on_ready=None) -> FastAPI:
    """``pipe``: a loaded ``atdiff.runtime.Pipeline`` (the caller closes it). ``record``: what each reply and PNG
    generation record says about the model (``model_record``). With ``api_key``, /v1/generate, /metrics and
    /openapi.json need ``Authorization: Bearer KEY``, the browser docs (/docs, /redoc, which cannot send it) are
    off, and the probes stay open. ``on_ready()`` is called once warmed up."""
    service = _Service(pipe, limits, api_key, record or {})
    open_docs = api_key is None
    app = FastAPI(title="at-diffusion-toolkit", lifespan=lambda app: service.lifespan(on_ready),
                  openapi_url="/openapi.json" if open_docs else None)
    app.state.drain = service.batcher.drain   # called by DrainingServer when shutdown begins
    app.state.limits = limits                 # read by runtime/serve/server.py for the connection limits
    app.add_middleware(BodyLimits, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s,
                       on_reject=service.count)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, service.unexpected_error)
    app.get("/healthz")(service.healthz)
    app.get("/readyz")(service.readyz)
    app.get("/metrics")(service.metrics_endpoint)
    app.post("/v1/generate", openapi_extra=_generate_openapi(limits, pipe.spec))(service.generate)
    if not open_docs:
        _guard_openapi(app, api_key)
    return app


def _guard_openapi(app: FastAPI, api_key: str) -> None:
    """/openapi.json behind the API key (FastAPI's own route, and the browser docs that read it, are off)."""
    async def guarded_openapi(request: Request):
        if not _authorized(request, api_key):
            return _error_response(401, UNAUTHORIZED)
        return JSONResponse(app.openapi())
    app.get("/openapi.json", include_in_schema=False)(guarded_openapi)


def model_record(pipe, *, with_path: bool = False) -> dict:
    """What replies and PNG records say about the served model: its name and weights' sha256, and its filesystem
    path only when asked (``toolkit serve --expose-model-path``): a path tells clients about the server's disks."""
    from atdiff.runtime.fingerprint import model_sha256
    record = {"model": pipe.spec.name, "model_sha256": model_sha256(pipe.source.path)}
    return {**record, "model_path": str(pipe.source.path)} if with_path else record


def _generate_openapi(limits: ServeLimits, spec) -> dict:
    """The body is parsed by ``_parse`` (any content type), so FastAPI cannot see it: describe it by hand."""
    error = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}},
                                             "required": ["error"]}}}
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": request_schema(limits, spec)}}},
            "responses": {"200": {"description": "image/png (format png) or JSON with base64 PNGs (format json)",
                                  "content": {"image/png": {}, "application/json": {}}},
                          **{str(code): {"description": why, "content": error} for code, why in (
                              (400, "not JSON"), (401, "no or wrong API key"), (408, "body too slow"),
                              (413, "body too large"), (422, "invalid field"), (503, "queue full"),
                              (504, "not done within --timeout"))}}}


class _Service:
    """One pipeline behind one batcher, and the endpoints' handlers."""

    def __init__(self, pipe, limits: ServeLimits, api_key: str | None, record: dict):
        if pipe.spec.num_class_embeds:
            raise ToolkitError("class-conditional models are not served yet (the API has no class labels); "
                               "use 'toolkit generate --class-label' or embed atdiff.runtime.Pipeline")
        self.pipe, self.limits, self.api_key, self.record, self.ready = pipe, limits, api_key, record, False
        self.batcher = DynamicBatcher(lambda request: pipe.run(request).arrays, max_batch=limits.max_batch,
                                      max_wait_ms=limits.max_wait_ms, max_queue=limits.max_queue)
        self.metrics = ServeMetrics(lambda: self.batcher.depth)
        self.batcher.on_batch = self.metrics.batch_size.observe

    @contextlib.asynccontextmanager
    async def lifespan(self, on_ready):
        self.batcher.start()
        warm_up = GenerateBody(prompt="warm-up") if self.pipe.spec.is_latent else GenerateBody()
        await self.batcher.run_alone(self.pipe.request(warm_up.options()))
        self.ready = True   # the networks have run once: sessions created, memory allocated
        if on_ready is not None:
            on_ready()
        yield
        self.ready = False  # SIGTERM: uvicorn has stopped accepting; finish what is waiting, then stop
        await self.batcher.close()

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def metrics_endpoint(self, request: Request):
        if not _authorized(request, self.api_key):
            return _error_response(401, UNAUTHORIZED)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    def count(self, status: int, kind: str) -> None:
        """One failed request in /metrics (also called by the body limits middleware)."""
        self.metrics.requests.labels(status=str(status)).inc()
        self.metrics.errors.labels(kind=kind).inc()

    async def unexpected_error(self, request: Request, exc: Exception):
        """Whatever the handlers did not foresee: a JSON 500, counted; uvicorn logs the traceback."""
        self.count(500, "internal")
        return _error_response(500, f"internal error ({type(exc).__name__}); the server keeps serving, and its log "
                                    "has the details")

    async def generate(self, request: Request):
        started = time.perf_counter()
        try:
            if not _authorized(request, self.api_key):
                raise _Rejected(401, UNAUTHORIZED, "auth")
            body = _parse(await _read_body(request))
            wanted = _validated(self.pipe, body, self.limits)
            images, batch = await _generate(self.batcher, wanted, self.limits.timeout_s)
        except _Rejected as exc:
            self.count(exc.status, exc.kind)
            return _error_response(exc.status, str(exc), exc.headers)
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.requests.labels(status="200").inc()
        self.metrics.images.inc(len(images))
        about = {**self.record, "backend": self.pipe.backend.describe()}
        warnings = wanted.truncation_warnings(self.pipe.spec.tokenizer_max_length)
        # PNG encoding off the event loop (tens of ms for a 512 px image would stall every other request)
        return await asyncio.to_thread(_response, body, wanted, images, batch, about, warnings)


async def _read_body(request: Request) -> bytes:
    """The body, at most ``max_body_bytes`` within ``body_timeout_s`` (``BodyLimits`` enforces both as it streams)."""
    try:
        return await request.body()
    except ClientDisconnect:   # nobody reads this answer; it is counted like any bad request
        raise _Rejected(400, "the client disconnected before sending the whole body", "validation") from None


def _parse(raw: bytes) -> GenerateBody:
    """The request body -> GenerateBody, or a 4xx naming the problem. Parsed here rather than by FastAPI so that
    any content type works (curl -d sends form-encoded) and every error is one sentence."""
    if not raw.strip():
        raise _Rejected(400, 'the request needs a JSON body, e.g. {"prompt": "a photo of a sneaker", "steps": 4}',
                        "validation")
    try:
        data = json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Rejected(400, f"the request body is not valid JSON ({exc})", "validation") from None
    except RecursionError:   # [[[[... a few thousand deep: json's C parser gives up; the API nests two levels
        raise _Rejected(400, "the request body nests arrays or objects too deeply; a generate request is one flat "
                             "object", "validation") from None
    if not isinstance(data, dict):
        raise _Rejected(422, 'the request body must be a JSON object, e.g. {"prompt": "a photo of a sneaker"}',
                        "validation")
    unknown = [name for name in data if name not in GenerateBody.model_fields]
    if unknown:   # here, not by pydantic: it cannot even name a key holding a lone surrogate
        raise _Rejected(422, f"unknown field '{unknown[0]}'; the fields are: {', '.join(GenerateBody.model_fields)}",
                        "validation")
    try:
        return GenerateBody.model_validate(data)
    except ValidationError as exc:
        raise _Rejected(422, _validation_message(exc.errors()), "validation") from None


def _bounded_int(digits: str) -> int:
    """json's integer hook: refuse, before converting, an integer longer than any field takes (a 100,000-digit
    seed would otherwise hit Python's int-conversion limit, a ValueError from inside the parser)."""
    count = len(digits.lstrip("-"))
    if count > MAX_INT_DIGITS:
        raise _Rejected(422, f"the request has an integer with {count} digits; no field takes more than "
                             f"{MAX_INT_DIGITS} (seed: 0 to {MAX_SEED})", "validation")
    return int(digits)


def _no_constant(name: str):
    """json's hook for NaN and Infinity, which Python's parser accepts and JSON does not have."""
    raise _Rejected(400, f"the request body is not valid JSON ({name} is not a JSON number)", "validation")


def _validated(pipe, body: GenerateBody, limits: ServeLimits) -> GenerationRequest:
    try:
        options = body.options()   # the checks every caller's options get, then this server's limits, then the model's
        body.check_limits(limits, pipe.spec.default_resolution)
        wanted = pipe.request(options)
        check_resolved_steps(wanted.sampler, wanted.steps, limits)
        return wanted
    except (ValueError, ToolkitError) as exc:
        raise _Rejected(422, str(exc), "validation") from None


async def _generate(batcher: DynamicBatcher, wanted: GenerationRequest, timeout_s: float):
    try:
        return await asyncio.wait_for(batcher.submit(wanted), timeout_s)
    except QueueFull as exc:
        raise _Rejected(503, f"server busy: {exc}; retry later", "queue_full", {"Retry-After": "1"}) from None
    except asyncio.TimeoutError:
        raise _Rejected(504, f"not done within {timeout_s:g} s (--timeout)", "timeout") from None
    except ToolkitError as exc:
        raise _Rejected(422, str(exc), "validation") from None
    except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the server
        log.exception("generation failed")
        raise _Rejected(500, f"generation failed: {type(exc).__name__}: {exc}", "internal") from None


def _response(body: GenerateBody, wanted: GenerationRequest, images, batch: int, about: dict, warnings: list[str]):
    prompts = wanted.prompts or [None] * len(images)
    pngs = [png_bytes(image, {"prompt": text, "seed": seed, **about, **wanted.record()})
            for image, seed, text in zip(images, wanted.seeds, prompts)]
    headers = {"X-Batch-Size": str(batch)}
    if body.format == "png":
        return Response(pngs[0], media_type="image/png", headers={**headers, "X-Seed": str(wanted.seeds[0])})
    return JSONResponse({"images": [{"seed": seed, "prompt": text, "png_base64": base64.b64encode(png).decode()}
                                    for png, seed, text in zip(pngs, wanted.seeds, prompts)],
                         "sampler": wanted.sampler, "steps": wanted.steps, "batch_size": batch,
                         "warnings": warnings,
                         **about}, headers=headers)


def _error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The API's one error shape. A message may quote the request (a field name, a sampler), which may hold a lone
    surrogate that UTF-8 cannot encode: such characters are written as escapes, never a failed reply."""
    printable = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": printable}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (404 unknown path, 405 wrong method) in the API's error shape."""
    if exc.status_code < 400:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return _error_response(exc.status_code, f"{exc.detail}: {request.method} {request.scope['path']}", exc.headers)


def _authorized(request: Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _validation_message(errors: list) -> str:
    """pydantic's error list -> one sentence naming the field and the fix."""
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    if first.get("type") == "value_error":   # our own validators' sentence, without pydantic's "Value error, "
        return f"{where}: {first['ctx']['error']}"
    return f"{where}: {first['msg']}" if where else first["msg"]
