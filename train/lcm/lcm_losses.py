"""Latent consistency distillation (LCD) and its adversarial variant (LCM-AT) as a trainer objective.

LCD (Luo et al. 2023, Algorithm 1; diffusers' train_lcm_distill_sd_wds.py): for z_{t+k} = q(z | x0) at a
grid point of the teacher's DDIM solver,

    L = d( f_theta(z_{t+k}, w, c, t+k),  f_theta-(Phi_hat(z_{t+k}, w, c), w, c, t) )

where Phi_hat is one teacher DDIM step with CFG weight w, f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) and
f_theta- is the EMA target network (stop-gradient on its parameters). LCM-AT (seed paper, "Consistency
Distillation" objective) takes the sup over ||delta|| <= eta of the same distance with the earlier point
moved to Phi_hat(z_{t+k}) + delta (see docs/lcm-at.md for how we read the formula). delta is found free-AT
style (train/core/adversarial.py): ONE backward gives delta's gradient, through the target network's input,
and the student's parameter gradient; K optimizer steps per batch with an ascent step between each two
(``atdiff.train.core.adversarial.free_at_steps``, the loop ADM-AT runs too).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from atdiff.runtime.errors import ToolkitError
from atdiff.train.core.adversarial import free_at_steps, init_delta, per_sample_norm, radius_for
from atdiff.train.lcm.lcm_teacher import DDIMSolver, guidance_embedding, predicted_x0, teacher_solver_step


@dataclasses.dataclass(frozen=True)
class LCDSettings:
    w_min: float = 5.0          # Imagen-form CFG weight range, diffusers' defaults for SD teachers
    w_max: float = 15.0
    loss: str = "l2"            # l2 | huber
    huber_c: float = 0.001
    ema_decay: float = 0.95     # target network
    timestep_scaling: float = 10.0

    def check(self) -> None:
        if not 0 <= self.w_min <= self.w_max:
            raise ToolkitError(f"--w-min {self.w_min} / --w-max {self.w_max}: need 0 <= w-min <= w-max (e.g. 5 and 15)")
        if self.loss not in ("l2", "huber"):
            raise ToolkitError(f"--loss {self.loss!r} is unknown; use l2 or huber")
        if self.huber_c <= 0:
            raise ToolkitError(f"--huber-c {self.huber_c} must be > 0 (diffusers uses 0.001)")
        if not 0 <= self.ema_decay < 1:
            raise ToolkitError(f"--ema-decay {self.ema_decay} must be in [0, 1) (LCM uses 0.95)")


@dataclasses.dataclass(frozen=True)
class AdvSettings:
    steps: int = 2             # K: optimizer steps (and delta ascents) per batch
    lr: float = 0.05           # ascent step, per-element RMS (x sqrt(C*H*W) per sample, like max_norm)
    max_norm: float = 0.05     # eta, per-element RMS of delta in latent units

    def check(self) -> None:
        if self.steps < 1:
            raise ToolkitError(f"--adv-steps {self.steps} must be >= 1 (free AT makes K optimizer steps per batch)")
        if self.lr < 0 or self.max_norm < 0:
            raise ToolkitError("--adv-lr and --adv-max-norm must be >= 0")


@dataclasses.dataclass
class Prepared:
    """One micro-batch after the frozen parts ran: what the student and the target network see."""
    x_start: torch.Tensor       # z_{t+k}
    t_start: torch.Tensor
    x_prev: torch.Tensor        # Phi_hat(z_{t+k}): the teacher solver's point at t
    t_prev: torch.Tensor
    w: torch.Tensor             # Imagen-form CFG weight per sample
    w_emb: torch.Tensor | None
    prompt_embeds: torch.Tensor


class ConsistencyDistillation:
    """Trainer objective for ``toolkit train lcm`` (``adv=None``) and ``lcm-at``.

    Owns the frozen teacher parts and the EMA target network (checkpointed via state_dict). The batch is
    either raw (``pixel_values``, ``input_ids``) or cached (``latent_moments``, ``prompt_embeds``)."""

    def __init__(self, teacher, student: torch.nn.Module, solver: DDIMSolver, scheduler,
                 settings: LCDSettings, adv: AdvSettings | None = None):
        settings.check()
        if adv is not None:
            adv.check()
        self.teacher, self.solver, self.scheduler = teacher, solver, scheduler
        self.settings, self.adv = settings, adv
        self.optimizer_steps_per_batch = adv.steps if adv is not None else 1
        self.prediction_type = teacher.scheduler_config.get("prediction_type", "epsilon")
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.target.train()  # as diffusers: same mode as the student (no dropout in SD UNets)
        self.w_dim = student.config.time_cond_proj_dim
        self.uncond_embeds = encode_prompts(teacher, [""], torch.device("cpu"))
        self.device = torch.device("cpu")

    # ---- checkpointed state: the target network -----------------------------------------------
    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])

    def to(self, device: torch.device) -> "ConsistencyDistillation":
        if device != self.device:
            for module in (self.teacher.unet, self.teacher.vae, self.teacher.text_encoder, self.target):
                module.to(device)
            self.uncond_embeds = self.uncond_embeds.to(device)
            self.solver.to(device)
            self.device = device
        return self

    # ---- the trainer calls this once per step --------------------------------------------------
    def __call__(self, ctx, micro_batches: list) -> dict[str, float]:
        self.to(ctx.device)
        autocast = ctx.accelerator.autocast
        prepared = [self.prepare(mb, ctx.generator, autocast) for mb in micro_batches]
        student = ctx.accelerator.unwrap_model(ctx.model)
        if self.adv is None:
            loss = ctx.update(prepared, lambda i, p: self.loss(ctx.model, p, autocast=autocast))
            self._after_update(ctx, student)
            return {"loss": loss}
        shape = prepared[0].x_prev.shape  # lr and eta are per-element RMS: scale both by sqrt(C*H*W)
        deltas = [init_delta(p.x_prev) for p in prepared]
        losses = free_at_steps(ctx, prepared, deltas, lambda i, p, delta: self.loss(ctx.model, p, delta, autocast),
                               self.adv.steps, radius_for(shape, self.adv.lr), radius_for(shape, self.adv.max_norm),
                               after_update=lambda: self._after_update(ctx, student))
        norms = torch.cat([per_sample_norm(d.detach()).flatten() for d in deltas])
        return {"loss": sum(losses) / len(losses), "loss_clean": losses[0], "loss_adv": losses[-1],
                "delta_rms": norms.mean().item() / radius_for(shape, 1.0)}

    def _after_update(self, ctx, student) -> None:
        if not ctx.accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no EMA tick
            self.update_target(student)

    @torch.no_grad()
    def update_target(self, student: torch.nn.Module) -> None:
        """theta- <- decay theta- + (1 - decay) theta, after every optimizer step (diffusers' update_ema)."""
        for target, online in zip(self.target.parameters(), student.parameters()):
            target.lerp_(online.detach().to(target.dtype), 1.0 - self.settings.ema_decay)

    # ---- the maths ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: dict, generator: torch.Generator, autocast=contextlib.nullcontext) -> Prepared:
        """Latents, t_{n+k}, noise and w from ``generator``; the teacher's CFG DDIM step (no grad)."""
        latents, prompt_embeds = self._latents_and_text(batch, generator, autocast)
        n, device = latents.shape[0], latents.device
        index = torch.randint(0, len(self.solver.timesteps), (n,), generator=generator, device=device)
        t_start, t_prev = self.solver.endpoints(index)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        a = self.solver.alphas_cumprod[t_start].reshape(-1, 1, 1, 1)
        x_start = a.sqrt() * latents + (1 - a).sqrt() * noise      # q(z_{t+k} | z_0), DDPM eq. 4
        w = torch.rand(n, generator=generator, device=device) * (self.settings.w_max - self.settings.w_min)
        w = w + self.settings.w_min
        uncond = self.uncond_embeds.expand(n, -1, -1)
        with autocast():
            x_prev = teacher_solver_step(self.teacher.unet, self.solver, x_start, index, prompt_embeds, uncond, w,
                                         self.prediction_type)
        w_emb = guidance_embedding(w.cpu(), self.w_dim).to(device) if self.w_dim else None
        return Prepared(x_start, t_start, x_prev.float(), t_prev, w, w_emb, prompt_embeds)

    def _latents_and_text(self, batch: dict, generator, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        if "latent_moments" in batch:  # from the cache: the VAE's posterior, sampled here as diffusers does
            moments, embeds = batch["latent_moments"].float(), batch["prompt_embeds"].float()
        else:  # the VAE stays in float32 outside autocast (diffusers: fp16 VAEs overflow to NaN)
            moments = self.teacher.vae.encode(batch["pixel_values"].float()).latent_dist.parameters.float()
            with autocast():
                embeds = self.teacher.text_encoder(batch["input_ids"])[0].float()
        latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
        cfg = self.teacher.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (latents - shift) * cfg.scaling_factor, embeds

    def consistency_fn(self, unet, x: torch.Tensor, t: torch.Tensor, p: Prepared) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) (LCM eq. 8; LCMScheduler's boundary scalings)."""
        out = unet(x, t, timestep_cond=p.w_emb, encoder_hidden_states=p.prompt_embeds).sample.float()
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(t.float())
        c_skip, c_out = (c.reshape(-1, 1, 1, 1) for c in (c_skip, c_out))
        return c_skip * x + c_out * predicted_x0(out, t, x, self.prediction_type, self.solver.alphas_cumprod)

    def target_value(self, p: Prepared, delta: torch.Tensor | None = None, autocast=contextlib.nullcontext):
        """f_theta-(Phi_hat + delta, t). Without delta: no graph at all. With delta: a graph through the
        target's input only (its parameters do not require grad), so backward reaches delta."""
        grad = delta is not None
        with torch.set_grad_enabled(grad), autocast():
            x = p.x_prev + delta if grad else p.x_prev
            return self.consistency_fn(self.target, x, p.t_prev, p)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.float(), b.float()
        if self.settings.loss == "l2":
            return torch.nn.functional.mse_loss(a, b)
        c = self.settings.huber_c  # pseudo-Huber, as diffusers' --loss_type huber
        return (torch.sqrt((a - b) ** 2 + c * c) - c).mean()

    def loss(self, model, p: Prepared, delta: torch.Tensor | None = None, autocast=contextlib.nullcontext):
        prediction = self.consistency_fn(model, p.x_start, p.t_start, p)
        return self.distance(prediction, self.target_value(p, delta, autocast))


@torch.no_grad()
def encode_prompts(teacher, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Text embeddings [N, L, D] (last hidden state, as Stable Diffusion conditions on)."""
    ids = teacher.tokenizer(prompts, padding="max_length", max_length=teacher.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    return teacher.text_encoder.to(device)(ids.to(device))[0].float()
