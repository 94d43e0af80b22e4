"""One generation call: what the caller asked (``GenerationOptions``, model-free), the same validated against the
model (``GenerationRequest``), and its result (``GenerationOutput``).

Everything a user can get wrong is checked in ``GenerationRequest.build`` before any network runs, so a
bad call costs nothing and fails with one message naming the fix.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.model_spec import ModelSpec
from atdiff.runtime.noise import MIN_SEED, seeds_for
from atdiff.runtime.samplers import get_sampler
from atdiff.runtime.schedule import NoiseSchedule

LCM_DEFAULT_GUIDANCE = 8.5   # LCM-Dreamshaper's default w (diffusers' LatentConsistencyModelPipeline)
CFG_DEFAULT_GUIDANCE = 7.5   # Stable Diffusion's default classifier-free guidance scale
DEFAULT_STEPS = {"lcm": 4}   # few-step LCM; the other samplers default to 20 network evaluations
OTHER_DEFAULT_STEPS = 20
# Images per network batch when the caller does not say: bounded, so --num-images 128 on a real model does
# not try to hold 128 images' activations at once (results do not depend on the batch size).
DEFAULT_BATCH_SIZE = 8
# The least value of each numeric option, checked (once) by ``GenerationOptions.precheck``; the HTTP server publishes
# them as its request schema's minima. eps_scale has none: it must be above 0.
MINIMA = {"num_images": 1, "steps": 1, "batch_size": 1, "height": 1, "width": 1, "seed": MIN_SEED,
          "guidance_scale": 0}


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Everything a caller can ask of one generation call, as given (None: the model's default). The CLI, the HTTP
    server, ``Pipeline.__call__`` and eval's ``SamplingPlan`` each build one; ``GenerationRequest.build`` checks it
    against the model. ``steps``: sampling steps, which are network evaluations here (one per step; the CLI's
    ``--nfe`` is another name for ``--steps``)."""
    prompts: str | Sequence[str] | None = None
    num_images: int | None = None
    steps: int | None = None
    seed: int | None = 0
    seeds: Sequence[int] | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    negative_prompt: str | Sequence[str] | None = None
    height: int | None = None
    width: int | None = None
    class_labels: int | Sequence[int] | None = None
    eps_scale: float | None = None
    batch_size: int | None = None
    sampler_options: dict | None = None

    def precheck(self) -> None:
        """The checks that need no model (sampler name, counts, seed, scales), so a caller can run them before a
        model loads; the only place they are written (``GenerationRequest.build`` starts with them)."""
        if self.sampler is not None:
            get_sampler(self.sampler)
        for name in ("num_images", "steps", "batch_size", "height", "width"):  # sizes: the model's multiple later
            if getattr(self, name) is not None:
                _at_least(getattr(self, name), name)
        seeds_for(1, self.seed)
        if self.eps_scale is not None and not float(self.eps_scale) > 0:   # also refuses NaN
            raise ToolkitError(f"eps_scale must be positive (about 1.017 for ES sampling), got {self.eps_scale}")
        least = MINIMA["guidance_scale"]
        if self.guidance_scale is not None and not float(self.guidance_scale) >= least:
            raise ToolkitError(f"guidance_scale must be >= {least} (LCM's w, or the CFG scale; 0-1 turns CFG off), "
                               f"got {self.guidance_scale}")


@dataclasses.dataclass
class GenerationRequest:
    sampler: str
    steps: int
    timesteps: np.ndarray
    sampler_fn_options: dict
    seeds: list[int]
    latent_shape: tuple[int, int, int]
    height: int
    width: int
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    guidance: str = "none"                 # none | cfg | embedding
    guidance_scale: float | None = None
    class_labels: np.ndarray | None = None
    eps_scale: float | None = None
    batch_size: int = 1
    truncated_prompts: dict[int, int] = dataclasses.field(default_factory=dict)  # index -> token count

    @property
    def num_samples(self) -> int:
        return len(self.seeds)

    def chunks(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.batch_size, self.num_samples))
                for lo in range(0, self.num_samples, self.batch_size)]

    def record(self) -> dict[str, Any]:
        """What went into the images, for PNG metadata and reports."""
        return {"sampler": self.sampler, "steps": self.steps, "timesteps": self.timesteps.tolist(),
                "sampler_options": self.sampler_fn_options, "height": self.height, "width": self.width,
                "guidance": self.guidance, "guidance_scale": self.guidance_scale,
                "eps_scale": self.eps_scale,
                "class_labels": None if self.class_labels is None else self.class_labels.tolist(),
                **({"truncated_prompts": self.truncated_prompts} if self.truncated_prompts else {})}

    def truncation_warnings(self, max_length: int) -> list[str]:
        return [f"prompt {i + 1} has {n} tokens; the text encoder reads only the first {max_length} "
                f"({self.prompts[i][:40]!r}...)" for i, n in self.truncated_prompts.items()]

    @classmethod
    def build(cls, spec: ModelSpec, schedule: NoiseSchedule, tokenizer, options: GenerationOptions):
        """``options`` checked against the model: ``tokenizer`` (latent models) counts prompt tokens."""
        o = options
        o.precheck()
        sampler = o.sampler or spec.default_sampler
        sampler_obj = get_sampler(sampler)
        steps = DEFAULT_STEPS.get(sampler, OTHER_DEFAULT_STEPS) if o.steps is None else int(o.steps)
        ts_options, fn_options = _split_options(sampler_obj, o.sampler_options or {})
        timesteps = np.asarray(sampler_obj.timesteps(schedule, steps, **ts_options), dtype=np.int64)
        height, width = (_size(v, spec.default_resolution, spec.pixel_multiple, name)
                         for v, name in ((o.height, "height"), (o.width, "width")))
        factor = spec.vae_scale_factor
        fields = dict(sampler=sampler, steps=steps, timesteps=timesteps, sampler_fn_options=fn_options,
                      latent_shape=(spec.unet_in_channels, height // factor, width // factor),
                      height=height, width=width, eps_scale=_eps_scale(o.eps_scale, schedule.prediction_type))
        if spec.is_latent:
            fields.update(_text_fields(spec, o.prompts, o.num_images, o.negative_prompt, o.guidance_scale,
                                       o.class_labels))
            fields["truncated_prompts"] = tokenizer.too_long(fields["prompts"])
            count = len(fields["prompts"])
        else:
            fields.update(_unconditional_fields(spec, o.prompts, o.num_images, o.guidance_scale, o.negative_prompt,
                                                o.class_labels))
            count = fields.pop("count")
        fields["seeds"] = seeds_for(count, o.seed, o.seeds)
        fields["batch_size"] = min(count, DEFAULT_BATCH_SIZE) if o.batch_size is None else int(o.batch_size)
        return cls(**fields)


def _at_least(value: int, name: str) -> None:
    if int(value) < MINIMA[name]:
        raise ToolkitError(f"{name} must be at least {MINIMA[name]}, got {value}")


def _split_options(sampler_obj, options: dict) -> tuple[dict, dict]:
    """Options the sampler's ``timesteps`` function names (e.g. a spacing) go there, the rest to the
    sampler itself (e.g. DDIM's eta); an option neither accepts is an error, not silently dropped."""
    ts_params = inspect.signature(sampler_obj.timesteps).parameters
    fn_params = inspect.signature(sampler_obj.fn).parameters
    ts_options = {k: v for k, v in options.items() if k in ts_params}
    fn_options = {k: v for k, v in options.items() if k not in ts_params}
    unknown = [k for k in fn_options if k not in fn_params]
    if unknown:
        known = sorted((set(ts_params) | set(fn_params)) - {"model", "x", "schedule", "timesteps", "noise", "steps"})
        raise ToolkitError(f"sampler '{sampler_obj.name}' has no option(s) {unknown}; it takes {known}")
    return ts_options, fn_options


def _size(value: int | None, default: int, multiple: int, name: str) -> int:
    value = default if value is None else int(value)
    if value < multiple or value % multiple:
        nearest = max(multiple, value // multiple * multiple)
        raise ToolkitError(f"{name} {value} is not a positive multiple of {multiple}, which this model needs "
                           f"(its default is {default}); pass e.g. --{name} {nearest}")
    return value


def _eps_scale(eps_scale: float | None, prediction_type: str) -> float | None:
    """``eps_scale`` (checked positive by ``precheck``) for this model; None when it changes nothing."""
    if eps_scale is None or float(eps_scale) == 1.0:
        return None
    if prediction_type != "epsilon":  # checked here too so a bad call fails before any network runs
        raise ToolkitError(f"epsilon scaling needs an epsilon-prediction model; this one predicts "
                           f"'{prediction_type}': drop --eps-scale")
    return float(eps_scale)


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in items):
        raise ToolkitError(f"{name} must be strings, got {[type(p).__name__ for p in items]}")
    return items


def _text_fields(spec, prompts, num_images, negative_prompt, guidance_scale, class_labels) -> dict:
    prompts = _as_list(prompts, "prompts")
    if not prompts:
        raise ToolkitError("no prompt given: this is a text-to-image model; pass at least one prompt, "
                           'e.g. toolkit generate "astronaut in a jungle"')
    if class_labels is not None:
        raise ToolkitError("class labels are for class-conditional pixel models; this model takes prompts")
    per_prompt = 1 if num_images is None else int(num_images)
    negatives = _as_list(negative_prompt, "negative_prompt") or [""]
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ToolkitError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                           "pass one negative prompt, or one per prompt")
    expand = lambda items: [p for p in items for _ in range(per_prompt)]  # noqa: E731
    if guidance_scale is None and spec.default_guidance_scale is not None:
        guidance_scale = spec.default_guidance_scale
    if spec.time_cond_proj_dim:
        guidance, scale = "embedding", LCM_DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
    else:
        # An LCM without the w-embedding (`toolkit train lcm --no-w-embedding`, LCM-LoRA's layout) has its
        # guidance baked in: by default it samples without CFG, as docs/lcm-at.md says.
        default = 1.0 if spec.scheduler_class == "LCMScheduler" else CFG_DEFAULT_GUIDANCE
        scale = default if guidance_scale is None else float(guidance_scale)
        guidance = "cfg" if scale > 1.0 else "none"
    if negative_prompt is not None and guidance != "cfg":  # it would be silently unused
        raise ToolkitError("a negative prompt needs classifier-free guidance: "
                           + ("this LCM embeds the guidance scale instead" if guidance == "embedding"
                              else f"guidance scale {scale} <= 1 turns it off") + "; drop the negative prompt"
                           + ("" if guidance == "embedding" else " or pass a guidance scale above 1"))
    return dict(prompts=expand(prompts), negative_prompts=expand(negatives) if guidance == "cfg" else None,
                guidance=guidance, guidance_scale=scale)


def _unconditional_fields(spec, prompts, num_images, guidance_scale, negative_prompt, class_labels) -> dict:
    if prompts:
        raise ToolkitError(f"model '{spec.name}' is unconditional and takes no prompt; "
                           "omit it and pass num_images (--num-images)")
    if guidance_scale is not None or negative_prompt is not None:
        raise ToolkitError(f"model '{spec.name}' is unconditional; guidance scale and negative prompts do not apply")
    count = 1 if num_images is None else int(num_images)
    return dict(count=count, class_labels=_class_labels(spec, class_labels, count))


def _class_labels(spec, class_labels, count: int) -> np.ndarray | None:
    classes = spec.num_class_embeds
    if not classes:
        if class_labels is not None:
            raise ToolkitError(f"model '{spec.name}' is not class-conditional; drop the class label")
        return None
    if class_labels is None:
        raise ToolkitError(f"model '{spec.name}' is class-conditional ({classes} classes); "
                           "pass a class label (--class-label N), or one per image")
    labels = np.asarray([class_labels] * count if np.ndim(class_labels) == 0 else class_labels, dtype=np.int64)
    if labels.shape != (count,):
        raise ToolkitError(f"got {labels.size} class labels for {count} images; pass one label or one per image")
    if labels.min() < 0 or labels.max() >= classes:
        raise ToolkitError(f"class labels must be in 0..{classes - 1}, got {labels.tolist()}")
    return labels


@dataclasses.dataclass
class GenerationOutput:
    arrays: np.ndarray              # uint8 [N, H, W, 3]
    samples: np.ndarray             # float32 [N, C, H, W] in about [-1, 1] (decoded images)
    latents: np.ndarray             # float32 final sampler output (latents for latent models)
    seeds: list[int]
    prompts: list[str] | None
    timings: dict[str, float]
    backend: str
    request: dict

    @property
    def images(self) -> list:
        from atdiff.runtime.images import to_pil
        return to_pil(self.arrays)
