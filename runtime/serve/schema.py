"""The body of ``POST /v1/generate`` and the server's limits. pydantic checks types (strictly: ``true`` is not a
step count, ``"2"`` or ``1.5`` is not a seed), the wire's own bounds (a 64-bit seed) and unknown fields; the body
then becomes a ``GenerationOptions`` (``GenerateBody.options``), checked as every caller's is: its ``precheck``
(counts, seed, guidance scale), and against the model (size multiple, guidance kind, prompts for an unconditional
model) by ``GenerationRequest.build``, the same code ``toolkit generate`` uses."""
from __future__ import annotations

import copy
import dataclasses
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from atdiff.runtime.generation import MINIMA, GenerationOptions
from atdiff.runtime.samplers import available_samplers

MAX_SEED = 2 ** 63 - 1   # the noise (numpy's PCG64) takes any non-negative int; this keeps a seed a signed 64-bit one


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    max_batch: int = 8            # images per pipeline call (and per request)
    max_wait_ms: float = 10.0     # how long the first request of a batch waits for company
    max_queue: int = 256          # requests waiting; beyond it: 503 + Retry-After
    timeout_s: float = 60.0       # per request, waiting included: 504 after it
    max_steps: int = 8
    max_prompt_chars: int = 2000
    max_size: Optional[int] = None   # pixels per side; None: the model's default resolution
    # the connection, before a request reaches the handlers (runtime/serve/body.py, runtime/serve/server.py)
    max_body_bytes: int = 1 << 20   # prompts are capped far below this; a bigger body is a mistake or an attack
    body_timeout_s: float = 10.0    # the whole body must arrive within this of the request head: 408 after it
    header_timeout_s: float = 10.0  # a connection must send a whole request head within this, or it is closed
    keep_alive_s: float = 5.0       # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024   # request line + headers; beyond: uvicorn's 400
    limit_concurrency: Optional[int] = None     # connections + requests in progress; None: see `concurrency`
    shutdown_timeout_s: Optional[float] = None  # SIGTERM's grace period; None: `timeout_s` + 1

    @property
    def concurrency(self) -> int:
        """Open connections and requests in progress at most (beyond: uvicorn's 503). By default room for a full
        queue, a running batch and 64 more (probes, scrapes, requests being validated), so the batcher's own JSON
        503 + Retry-After is what a busy server answers."""
        return self.limit_concurrency or self.max_queue + self.max_batch + 64

    @property
    def shutdown_grace_s(self) -> float:
        """How long SIGTERM waits for requests in flight: by default as long as one may take, plus a second."""
        return self.shutdown_timeout_s if self.shutdown_timeout_s is not None else self.timeout_s + 1


def _utf8(text: str) -> str:
    """JSON's \\ud800 escape decodes to a lone surrogate, which no tokenizer, PNG text chunk or JSON reply can
    encode: refuse it here, naming the problem, instead of failing deep in generation."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text has a lone surrogate at character {exc.start} ({text[exc.start]!r}), which is "
                         "not valid Unicode; send UTF-8 text") from None
    return text


def _integral(value):
    """JSON Schema's "integer" includes 2.0 (what some clients send for 2): take it as 2. Booleans, strings and 1.5
    stay refused by strict validation."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[str, AfterValidator(_utf8)]
Integer = Annotated[int, BeforeValidator(_integral)]


class GenerateBody(BaseModel):
    """The JSON fields: prompt or prompts (``GenerationOptions.prompts``), format (the reply's), and the rest each the
    ``GenerationOptions`` field of its name (``options()``). Least values are not declared here: ``precheck`` holds
    them (``request_schema`` publishes them)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Optional[Text] = Field(None, description="One prompt (text-to-image models).")
    prompts: Optional[list[Text]] = Field(None, min_length=1, description="Several prompts, one image each.")
    negative_prompt: Optional[Text] = Field(None, description="CFG negative prompt (non-LCM text-to-image models).")
    num_images: Integer = Field(1, description="Images per prompt, or in all for unconditional models.")
    steps: Optional[Integer] = Field(None, description="Sampling steps (default: the sampler's, 4 for LCM, 20 "
                                                    "for the others; either way at most the server's limit).")
    seed: Integer = Field(0, le=MAX_SEED, description="Image i gets seed + i.")
    guidance_scale: Optional[float] = Field(None, le=100, description="LCM's w or the CFG scale.")
    height: Optional[Integer] = Field(None, description="Pixels (default: the model's resolution).")
    width: Optional[Integer] = Field(None, description="Pixels (default: the model's resolution).")
    sampler: Optional[Text] = Field(None, description="lcm | ddim | dpmpp_2m | iddpm (default: the model's).")
    format: Literal["png", "json"] = Field("png", description="png: one image as image/png; json: base64 PNGs.")

    def prompt_list(self) -> list[str] | None:
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("give 'prompt' or 'prompts', not both")
        return [self.prompt] if self.prompt is not None else self.prompts

    def options(self) -> GenerationOptions:
        """The body as the ``GenerationOptions`` every caller builds, prechecked (ToolkitError naming the field)."""
        named = {name: getattr(self, name) for name in OPTION_FIELDS}
        options = GenerationOptions(prompts=self.prompt_list(), **named)
        options.precheck()
        return options

    def check_limits(self, limits: ServeLimits, default_size: int) -> None:
        """Raise ValueError naming the first field outside this server's limits (before the request is built, so
        that a huge value costs nothing)."""
        prompts = self.prompt_list() or []
        if self.steps is not None and self.steps > limits.max_steps:
            raise ValueError(f"steps {self.steps} is more than this server allows ({limits.max_steps})")
        for text in (*prompts, self.negative_prompt or ""):
            if len(text) > limits.max_prompt_chars:
                raise ValueError(f"a prompt has {len(text)} characters; this server takes at most "
                                 f"{limits.max_prompt_chars}")
        count = self.num_images * max(1, len(prompts))
        if count > limits.max_batch:
            raise ValueError(f"the request asks for {count} images; this server makes at most {limits.max_batch} "
                             "per request (--max-batch): split it")
        if self.format == "png" and count != 1:
            raise ValueError(f"format 'png' returns one image and this request makes {count}: ask for format 'json'")
        largest = limits.max_size or default_size
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value > largest:
                raise ValueError(f"{name} {value} is larger than this server serves ({largest} px; --max-size)")


OPTION_FIELDS = tuple(name for name in GenerateBody.model_fields if name not in ("prompt", "prompts", "format"))


def check_resolved_steps(sampler: str, steps: int, limits: ServeLimits) -> None:
    """The steps a built request will run against ``--max-steps``. Steps a request names were checked by
    ``check_limits``; this catches the sampler's default: a request naming no steps must not get 20 DDIM steps from
    a server that allows 8."""
    if steps > limits.max_steps:
        raise ValueError(f"sampler '{sampler}' runs {steps} steps by default, more than this server allows "
                         f"({limits.max_steps}): send \"steps\" of at most {limits.max_steps}")


def request_schema(limits: ServeLimits, spec) -> dict:
    """GenerateBody's JSON schema with this server's limits as maxima and the model's (``spec``) pixel multiple, for
    the OpenAPI document (what clients and schema-driven fuzzers read)."""
    schema = copy.deepcopy(GenerateBody.model_json_schema())
    largest = limits.max_size or spec.default_resolution
    maxima = {"steps": limits.max_steps, "num_images": limits.max_batch, "height": largest, "width": largest}
    for name, maximum in maxima.items():
        for branch in _typed_branches(schema["properties"][name], "integer"):
            branch["maximum"] = maximum
    for name in MINIMA.keys() & schema["properties"].keys():
        for branch in _typed_branches(schema["properties"][name], "integer", "number"):
            branch["minimum"] = MINIMA[name]
    for name in ("height", "width"):
        for branch in _typed_branches(schema["properties"][name], "integer"):
            branch["multipleOf"] = spec.pixel_multiple
    for name in ("prompt", "negative_prompt"):
        for branch in _typed_branches(schema["properties"][name], "string"):
            branch["maxLength"] = limits.max_prompt_chars
    for branch in _typed_branches(schema["properties"]["prompts"], "array"):
        branch["maxItems"] = limits.max_batch
        branch["items"]["maxLength"] = limits.max_prompt_chars
    for branch in _typed_branches(schema["properties"]["sampler"], "string"):
        branch["enum"] = available_samplers()
    return schema


def _typed_branches(prop: dict, *json_types: str) -> list[dict]:
    """The parts of a property's schema that describe ``json_types`` (Optional fields are anyOf [type, null])."""
    return [branch for branch in prop.get("anyOf", [prop]) if branch.get("type") in json_types]
