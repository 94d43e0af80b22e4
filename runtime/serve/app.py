"""The HTTP API of ``toolkit serve`` (FastAPI): ``POST /v1/generate``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``. One loaded ``Pipeline`` behind a ``DynamicBatcher``; docs/serving.md has the API and examples."""
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

from runtime.errors import ToolkitError
from runtime.generation import GenerationOptions, GenerationRequest
from runtime.images import png_bytes
from runtime.serve.batcher import DynamicBatcher, QueueFull
from runtime.serve.metrics import ServeMetrics
from runtime.serve.schema import GenerateBody, ServeLimits

log = logging.getLogger("toolkit.serve")
MAX_BODY_BYTES = 1 << 20   # prompts are capped far below this; a bigger body is a mistake or an attack


class _Rejected(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers


UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer KEY'"


def create_app(pipe, limits: ServeLimits, *, api_key: str | None = None, record: dict | None = None,
               on_ready=None) -> FastAPI:
    """``pipe``: a loaded ``runtime.Pipeline`` (the caller closes it). ``record``: what each PNG's generation
    record says about the model (name, path, sha256). With ``api_key``, /v1/generate and /metrics need
    ``Authorization: Bearer KEY``; the probes stay open. ``on_ready()`` is called once warmed up."""
    service = _Service(pipe, limits, api_key, record or {})
    app = FastAPI(title="at-diffusion-toolkit", lifespan=lambda app: service.lifespan(on_ready))
    app.state.drain = service.batcher.drain   # called by DrainingServer when shutdown begins
    app.get("/healthz")(service.healthz)
    app.get("/readyz")(service.readyz)
    app.get("/metrics")(service.metrics_endpoint)
    app.post("/v1/generate")(service.generate)
    return app


class _Service:
    """One pipeline behind one batcher, and the endpoints' handlers."""

    def __init__(self, pipe, limits: ServeLimits, api_key: str | None, record: dict):
        if pipe.spec.num_class_embeds:
            raise ToolkitError("class-conditional models are not served yet (the API has no class labels); "
                               "use 'toolkit generate --class-label' or embed runtime.Pipeline")
        self.pipe, self.limits, self.api_key, self.record, self.ready = pipe, limits, api_key, record, False
        self.batcher = DynamicBatcher(lambda request: pipe.run(request).arrays, max_batch=limits.max_batch,
                                      max_wait_ms=limits.max_wait_ms, max_queue=limits.max_queue)
        self.metrics = ServeMetrics(lambda: self.batcher.depth)
        self.batcher.on_batch = self.metrics.batch_size.observe

    @contextlib.asynccontextmanager
    async def lifespan(self, on_ready):
        self.batcher.start()
        warm_up = GenerateBody(prompt="warm-up") if self.pipe.spec.is_latent else GenerateBody()
        await self.batcher.run_alone(self.pipe.request(_options(warm_up)))
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
            return JSONResponse({"error": UNAUTHORIZED}, 401)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def generate(self, request: Request):
        started = time.perf_counter()
        try:
            if not _authorized(request, self.api_key):
                raise _Rejected(401, UNAUTHORIZED, "auth")
            body = _parse(await request.body())
            wanted = _validated(self.pipe, body, self.limits)
            images, batch = await _generate(self.batcher, wanted, self.limits.timeout_s)
        except _Rejected as exc:
            return _count(self.metrics, exc)
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.requests.labels(status="200").inc()
        self.metrics.images.inc(len(images))
        about = {**self.record, "backend": self.pipe.backend.describe()}
        warnings = wanted.truncation_warnings(self.pipe.spec.tokenizer_max_length)
        # PNG encoding off the event loop (tens of ms for a 512 px image would stall every other request)
        return await asyncio.to_thread(_response, body, wanted, images, batch, about, warnings)


def _parse(raw: bytes) -> GenerateBody:
    """The request body -> GenerateBody, or a 4xx naming the problem. Parsed here rather than by FastAPI so that
    any content type works (curl -d sends form-encoded) and every error is one sentence."""
    if len(raw) > MAX_BODY_BYTES:
        raise _Rejected(413, f"the request body has {len(raw)} bytes; this server reads at most {MAX_BODY_BYTES}",
                        "validation")
    if not raw.strip():
        raise _Rejected(400, 'the request needs a JSON body, e.g. {"prompt": "a photo of a sneaker", "steps": 4}',
                        "validation")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Rejected(400, f"the request body is not valid JSON ({exc})", "validation") from None
    if not isinstance(data, dict):
        raise _Rejected(422, 'the request body must be a JSON object, e.g. {"prompt": "a photo of a sneaker"}',
                        "validation")
    try:
        return GenerateBody.model_validate(data)
    except ValidationError as exc:
        raise _Rejected(422, _validation_message(exc.errors()), "validation") from None


def _validated(pipe, body: GenerateBody, limits: ServeLimits) -> GenerationRequest:
    try:
        body.check_limits(limits, pipe.spec.default_resolution)
        return pipe.request(_options(body))
    except (ValueError, ToolkitError) as exc:
        raise _Rejected(422, str(exc), "validation") from None


def _options(body: GenerateBody) -> GenerationOptions:
    return GenerationOptions(prompts=body.prompt_list(), num_images=body.num_images, steps=body.steps, seed=body.seed,
                             sampler=body.sampler, guidance_scale=body.guidance_scale,
                             negative_prompt=body.negative_prompt, height=body.height, width=body.width)


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


def _count(metrics: ServeMetrics, exc: _Rejected) -> JSONResponse:
    metrics.requests.labels(status=str(exc.status)).inc()
    metrics.errors.labels(kind=exc.kind).inc()
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)


def _authorized(request: Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _validation_message(errors: list) -> str:
    """pydantic's error list -> one sentence naming the field and the fix."""
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{where}'; the fields are: {', '.join(GenerateBody.model_fields)}"
    return f"{where}: {first['msg']}" if where else first["msg"]
