"""The body of ``POST /v1/generate`` and the server's limits. pydantic checks types, ranges and unknown fields;
what depends on the model (size multiple, guidance kind, prompts for an unconditional model) is checked by
``GenerationRequest.build``, the same code ``toolkit generate`` uses."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    max_batch: int = 8            # images per pipeline call (and per request)
    max_wait_ms: float = 10.0     # how long the first request of a batch waits for company
    max_queue: int = 256          # requests waiting; beyond it: 503 + Retry-After
    timeout_s: float = 60.0       # per request, waiting included: 504 after it
    max_steps: int = 8
    max_prompt_chars: int = 2000
    max_size: Optional[int] = None   # pixels per side; None: the model's default resolution


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = Field(None, description="One prompt (text-to-image models).")
    prompts: Optional[list[str]] = Field(None, min_length=1, description="Several prompts, one image each.")
    negative_prompt: Optional[str] = Field(None, description="CFG negative prompt (non-LCM text-to-image models).")
    num_images: int = Field(1, ge=1, description="Images per prompt, or in all for unconditional models.")
    steps: Optional[int] = Field(None, ge=1, description="Sampling steps (default: the model's, 4 for LCM).")
    seed: int = Field(0, ge=0, lt=2 ** 63, description="Image i gets seed + i.")
    guidance_scale: Optional[float] = Field(None, ge=0, le=100, description="LCM's w or the CFG scale.")
    height: Optional[int] = Field(None, ge=1, description="Pixels (default: the model's resolution).")
    width: Optional[int] = Field(None, ge=1, description="Pixels (default: the model's resolution).")
    sampler: Optional[str] = Field(None, description="lcm | ddim | dpmpp_2m | iddpm (default: the model's).")
    format: Literal["png", "json"] = Field("png", description="png: one image as image/png; json: base64 PNGs.")

    def prompt_list(self) -> list[str] | None:
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("give 'prompt' or 'prompts', not both")
        return [self.prompt] if self.prompt is not None else self.prompts

    def check_limits(self, limits: ServeLimits, default_size: int) -> None:
        """Raise ValueError naming the first field outside this server's limits."""
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
