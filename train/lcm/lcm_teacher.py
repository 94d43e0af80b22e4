"""The teacher side of latent consistency distillation (Luo et al. 2023; diffusers'
``examples/consistency_distillation/train_lcm_distill_sd_wds.py``): loading and checking the teacher,
initialising the student with a guidance embedding, the DDIM solver step with classifier-free guidance,
and the LCMScheduler the distilled pipeline ships with.

Hand-written pieces (the solver, x0/eps conversions) follow the diffusers example line by line: they live
in an example script, not in the diffusers library, so they cannot be imported.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.model_source import resolve_model_path
from atdiff.runtime.model_spec import TEXT_TO_IMAGE, ModelFormatError, ModelSpec

DEFAULT_TIME_COND_PROJ_DIM = 256  # diffusers' --unet_time_cond_proj_dim default (LCM-Dreamshaper uses 256)


@dataclasses.dataclass
class Teacher:
    """Everything distillation needs from a Stable-Diffusion-style pipeline directory."""
    path: Path
    spec: ModelSpec
    tokenizer: object            # transformers CLIPTokenizer
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict


def load_teacher(source: str) -> Teacher:
    """Load a text-to-image teacher (local directory or hub id) on the CPU in float32, frozen.
    Not a text-to-image pipeline -> ToolkitError before anything heavy is loaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(source)
    try:
        spec = ModelSpec.from_diffusers_dir(path)
    except ModelFormatError as exc:
        raise ToolkitError(f"--teacher {source} is not a diffusers text-to-image pipeline ({exc}); pass a Stable-"
                           "Diffusion-style directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)") from None
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
    if spec.kind != TEXT_TO_IMAGE or missing or spec.cross_attention_dim is None:
        what = f"missing {', '.join(missing)}" if missing else f"a {spec.kind} model"
        raise ToolkitError(f"--teacher {source} is not a text-to-image pipeline ({what}); LCM distillation needs a "
                           "Stable-Diffusion-style teacher with unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    parts = dict(tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                 text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.float32),
                 vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32), unet=unet)
    for name in ("text_encoder", "vae", "unet"):
        parts[name].requires_grad_(False).eval()
    return Teacher(path=path, spec=spec, scheduler_config=dict(spec.scheduler_config), **parts)


def make_student(teacher_unet, *, w_embedding: bool, time_cond_proj_dim: int = DEFAULT_TIME_COND_PROJ_DIM,
                 init_from: str | None = None):
    """The online student: the teacher UNet's weights in a UNet that (with ``w_embedding``) also takes LCM's
    guidance embedding through ``time_cond_proj_dim`` (its new projection starts from the default init, as
    in diffusers). ``init_from``: a UNet or pipeline directory to start from instead (e.g. an earlier LCM)."""
    from diffusers import UNet2DConditionModel

    if init_from is not None:
        path = resolve_model_path(init_from)
        sub = "unet" if (path / "unet" / "config.json").exists() else None
        student = UNet2DConditionModel.from_pretrained(path, subfolder=sub, torch_dtype=torch.float32)
        if w_embedding and student.config.time_cond_proj_dim is None:
            raise ToolkitError(f"--student {init_from} has no time_cond_proj_dim (no guidance embedding) but "
                               "--w-embedding is on; pass a student made for LCM, or --no-w-embedding")
        return student.train()
    if w_embedding:
        dim = teacher_unet.config.time_cond_proj_dim or time_cond_proj_dim
        if dim is None or dim < 2:
            raise ToolkitError(f"--time-cond-proj-dim {dim} is too small for the guidance embedding; use e.g. 256")
    else:
        dim = teacher_unet.config.time_cond_proj_dim
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=dim)
    student.load_state_dict(teacher_unet.state_dict(), strict=False)
    return student.train()


def lcm_scheduler(scheduler_config: dict, num_ddim_timesteps: int, timestep_scaling: float):
    """The LCMScheduler the distilled pipeline samples with: the teacher's noise schedule, LCM's skipping
    grid over the solver's ``num_ddim_timesteps`` (original_inference_steps) and the same boundary scaling
    as training (``timestep_scaling``), so training and sampling use one c_skip/c_out."""
    from diffusers import LCMScheduler
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config.update(original_inference_steps=num_ddim_timesteps, timestep_scaling=timestep_scaling)
    return LCMScheduler.from_config(config)


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The teacher's alpha-bar schedule (float32, as diffusers' DDPMScheduler computes it)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.clone()


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's w-embedding of the Imagen-form guidance weight ``w`` (eps = eps_c + w (eps_c - eps_u)), i.e.
    of guidance_scale - 1 in the pipeline's form. The pipeline method does not touch ``self``; calling it
    keeps training and diffusers' sampling on one implementation."""
    from diffusers import LatentConsistencyModelPipeline
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def _gather(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    return values[index].reshape(-1, *([1] * (ndim - 1)))


def predicted_x0(output, t, sample, prediction_type: str, alphas_cumprod: torch.Tensor):
    """x0 from the raw UNet output (LCMScheduler.step, step 4)."""
    a = _gather(alphas_cumprod, t, sample.ndim).sqrt()
    s = (1 - _gather(alphas_cumprod, t, sample.ndim)).sqrt()
    if prediction_type == "epsilon":
        return (sample - s * output) / a
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return a * sample - s * output
    raise ToolkitError(f"teacher prediction_type {prediction_type!r} is not supported; "
                       "use epsilon, sample or v_prediction")


def predicted_eps(output, t, sample, prediction_type: str, alphas_cumprod: torch.Tensor):
    """eps from the raw UNet output (DDIMScheduler.step, step 3)."""
    a = _gather(alphas_cumprod, t, sample.ndim).sqrt()
    s = (1 - _gather(alphas_cumprod, t, sample.ndim)).sqrt()
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (sample - a * output) / s
    if prediction_type == "v_prediction":
        return a * output + s * sample
    raise ToolkitError(f"teacher prediction_type {prediction_type!r} is not supported; "
                       "use epsilon, sample or v_prediction")


class DDIMSolver:
    """The teacher's ODE solver over a ``num_ddim_timesteps`` grid [k-1, 2k-1, ..., T-1] (k = T / N, the
    skipping interval): from grid point ``index`` one DDIM (eta = 0) step lands k timesteps earlier."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int = 50):
        num_train = len(alphas_cumprod)
        if not 1 <= num_ddim_timesteps <= num_train or num_train % num_ddim_timesteps:
            raise ToolkitError(f"--num-ddim-timesteps {num_ddim_timesteps} must divide the teacher's "
                               f"{num_train} training timesteps (e.g. 50)")
        self.skip = num_train // num_ddim_timesteps
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.skip - 1
        self.alphas_cumprod = alphas_cumprod
        # the step from the first grid point lands on t = 0 (as in diffusers: alpha-bar_0, not 1)
        self.alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def to(self, device: torch.device) -> "DDIMSolver":
        self.timesteps, self.alphas_cumprod, self.alphas_prev = (
            v.to(device) for v in (self.timesteps, self.alphas_cumprod, self.alphas_prev))
        return self

    def endpoints(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n): the grid point and where one solver step from it lands (clamped at 0)."""
        start = self.timesteps[index]
        return start, (start - self.skip).clamp(min=0)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12 with sigma = 0): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
        a_prev = _gather(self.alphas_prev, index, x0.ndim)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def teacher_solver_step(unet, solver: DDIMSolver, x: torch.Tensor, index: torch.Tensor, cond: torch.Tensor,
                        uncond: torch.Tensor, w: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Phi_hat(x_{t+k}): one DDIM step of the teacher with classifier-free guidance in the Imagen form the
    diffusers example uses, x0 = x0_c + w (x0_c - x0_u) and eps likewise. Cond and uncond run as one batch."""
    start, _ = solver.endpoints(index)
    out = unet(torch.cat([x, x]), torch.cat([start, start]), encoder_hidden_states=torch.cat([cond, uncond])).sample
    out = out.float()
    x2, t2 = torch.cat([x, x]), torch.cat([start, start])
    x0_c, x0_u = predicted_x0(out, t2, x2, prediction_type, solver.alphas_cumprod).chunk(2)
    eps_c, eps_u = predicted_eps(out, t2, x2, prediction_type, solver.alphas_cumprod).chunk(2)
    w = w.reshape(-1, *([1] * (x.ndim - 1)))
    return solver.step(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), index)
