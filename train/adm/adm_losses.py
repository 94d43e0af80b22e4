"""The ADM training objectives: plain DDPM (epsilon MSE), ADM-AT (Algorithm 1 of the seed paper, free
adversarial training) and ADM-IP (input perturbation, Ning et al. 2023), as objectives for
``atdiff.train.core.trainer.Trainer``.

With x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (per-sample mean over pixels, like ADM's ``mean_flat``):
- plain: ``|| eps_theta(x_t, t) - eps ||^2``
- AT:    ``|| eps_theta(x_t + delta, t) - eps - delta / sqrt(1 - abar_t) ||^2`` (paper eq. 14): the target
  moves with delta, so the model learns to undo the perturbation instead of ignoring it;
- IP:    ``|| eps_theta(sqrt(abar) x0 + sqrt(1 - abar) (eps + gamma xi), t) - eps ||^2``, xi ~ N(0, I).

Free AT: x0, t and eps are drawn once per batch and kept for the K inner steps; delta starts at 0;
each inner step is ONE forward/backward (``ctx.update``) that fills both the parameters' gradients and
``delta.grad``; the optimizer step (+ EMA) runs inside ``ctx.update`` and then
``delta += adv_lr * g / ||g||`` per sample, projected onto the ball of radius sqrt(C*H*W) * adv_max_norm
(train/core/adversarial.py). ``adv_target_grad``: 'full' (default) ascends the full gradient of the loss above
w.r.t. delta (through the model input and the target), as Algorithm 1 line 8 writes it; 'detach' stops
delta's gradient through the target term, as the authors' CIFAR-10 script does (adv_target_type=delta_detach).
The loss, and so the parameters' gradient, is the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atdiff.runtime.errors import ToolkitError
from atdiff.train.core.adversarial import free_at_steps, init_delta, per_sample_norm, radius_for


class NoiseLevels:
    """alphas_cumprod of a diffusers scheduler config and the per-sample coefficients. The schedule is
    runtime/'s float64 ``NoiseSchedule`` (diffusers keeps it in float32, ~1e-4 off near t=0), so training
    and the runtime samplers see the same numbers."""

    def __init__(self, scheduler_config: dict):
        from atdiff.runtime.schedule import NoiseSchedule
        schedule = NoiseSchedule.from_config(scheduler_config)
        if schedule.prediction_type != "epsilon":
            raise ToolkitError(f"ADM training predicts epsilon, but the scheduler config has prediction_type="
                               f"{schedule.prediction_type!r}; use an epsilon-prediction checkpoint")
        self.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod.copy())
        self.num_timesteps = len(self.alphas_cumprod)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) as float32 [B, 1, ..., 1] on ``like``'s device."""
        abar = self.alphas_cumprod[t.cpu()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (abar.sqrt().to(like.device, torch.float32).view(shape),
                (1 - abar).sqrt().to(like.device, torch.float32).view(shape))


# ---- the formulas (pure functions, tested on hand-made tensors) --------------------------------
def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dim, in at least float32 (a bf16/fp16 model output is upcast)."""
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)
    return (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)


def noisy_input(x0, eps, sqrt_abar, sqrt_one_minus, delta=None):
    x_t = sqrt_abar * x0 + sqrt_one_minus * eps
    return x_t if delta is None else x_t + delta


def at_target(eps, sqrt_one_minus, delta=None, detach: bool = False):
    if delta is None:
        return eps
    return eps + (delta.detach() if detach else delta) / sqrt_one_minus


def ip_input(x0, eps, xi, gamma: float, sqrt_abar, sqrt_one_minus):
    """DDPM-IP: the input sees eps + gamma * xi, the target stays eps."""
    return noisy_input(x0, eps + gamma * xi, sqrt_abar, sqrt_one_minus)


# ---- objectives ----------------------------------------------------------------------------------
@dataclass
class Draw:
    t: torch.Tensor
    weights: torch.Tensor
    eps: torch.Tensor
    sqrt_abar: torch.Tensor
    sqrt_one_minus: torch.Tensor
    xi: torch.Tensor | None = None


class ADMObjective:
    """Plain DDPM training; the base of the AT and IP objectives (``Trainer`` calls it once a step)."""

    optimizer_steps_per_batch = 1
    extra_noise = False

    def __init__(self, levels: NoiseLevels, sampler, class_cond: bool = False):
        self.levels, self.sampler, self.class_cond = levels, sampler, class_cond
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def draw(self, ctx, micro_batch: dict) -> Draw:
        """t, the importance weights, eps (and xi for IP), from the step's generator, in that order."""
        x0, gen = micro_batch["x"], ctx.generator
        t, weights = self.sampler.sample(x0.shape[0], gen, x0.device)
        eps = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device)
        xi = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device) if self.extra_noise else None
        return Draw(t, weights, eps, *self.levels.coefficients(t, x0), xi=xi)

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, micro_batch: dict) -> torch.Tensor:
        labels = micro_batch["label"] if self.class_cond else None
        return model(x, t, class_labels=labels).sample

    def weighted(self, losses: torch.Tensor, draw: Draw) -> torch.Tensor:
        self._seen.append((draw.t, losses.detach()))
        return (losses * draw.weights).mean()

    def loss(self, model, micro_batch: dict, draw: Draw) -> torch.Tensor:
        """The plain DDPM loss; subclasses with one optimizer step per batch override only this."""
        x_t = noisy_input(micro_batch["x"], draw.eps, draw.sqrt_abar, draw.sqrt_one_minus)
        return self.weighted(per_sample_mse(self.predict(model, x_t, draw.t, micro_batch), draw.eps), draw)

    def __call__(self, ctx, micro_batches: list) -> dict[str, float]:
        draws = [self.draw(ctx, mb) for mb in micro_batches]
        loss = ctx.update(micro_batches, lambda i, mb: self.loss(ctx.model, mb, draws[i]))
        self.update_sampler(ctx)
        return {"loss": loss}

    def update_sampler(self, ctx) -> None:
        """Feed every process's per-sample losses to the timestep sampler (same history everywhere)."""
        t = torch.cat([t for t, _ in self._seen])
        losses = torch.cat([loss for _, loss in self._seen])
        self._seen.clear()
        if ctx.accelerator.num_processes > 1:
            t, losses = ctx.accelerator.gather(t), ctx.accelerator.gather(losses)
        self.sampler.update(t, losses)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


class InputPerturbationObjective(ADMObjective):
    extra_noise = True

    def __init__(self, levels, sampler, gamma: float = 0.15, class_cond: bool = False):
        super().__init__(levels, sampler, class_cond)
        if gamma < 0:
            raise ToolkitError(f"--ip-gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def loss(self, model, micro_batch: dict, draw: Draw) -> torch.Tensor:
        x_t = ip_input(micro_batch["x"], draw.eps, draw.xi, self.gamma, draw.sqrt_abar, draw.sqrt_one_minus)
        return self.weighted(per_sample_mse(self.predict(model, x_t, draw.t, micro_batch), draw.eps), draw)


ADV_TARGET_GRADS = ("full", "detach")


class FreeATObjective(ADMObjective):
    """ADM-AT: K optimizer steps per batch (Algorithm 1 lines 5-10)."""

    def __init__(self, levels, sampler, adv_steps: int = 3, adv_lr: float = 0.1, adv_max_norm: float = 0.1,
                 class_cond: bool = False, adv_target_grad: str = "full"):
        super().__init__(levels, sampler, class_cond)
        if adv_steps < 1 or adv_lr < 0 or adv_max_norm < 0:
            raise ToolkitError(f"--adv-steps must be >= 1 and --adv-lr, --adv-max-norm >= 0 "
                               f"(got {adv_steps}, {adv_lr}, {adv_max_norm})")
        if adv_target_grad not in ADV_TARGET_GRADS:
            raise ToolkitError(f"unknown --adv-target-grad {adv_target_grad!r}; use one of {', '.join(ADV_TARGET_GRADS)}")
        self.adv_steps, self.adv_lr, self.adv_max_norm = adv_steps, adv_lr, adv_max_norm
        self.detach_target = adv_target_grad == "detach"
        self.optimizer_steps_per_batch = adv_steps

    def at_loss(self, model, micro_batch: dict, draw: Draw, delta: torch.Tensor) -> torch.Tensor:
        x_t = noisy_input(micro_batch["x"], draw.eps, draw.sqrt_abar, draw.sqrt_one_minus, delta)
        target = at_target(draw.eps, draw.sqrt_one_minus, delta, detach=self.detach_target)
        return self.weighted(per_sample_mse(self.predict(model, x_t, draw.t, micro_batch), target), draw)

    def radius(self, x: torch.Tensor) -> float | None:
        # adv_max_norm 0 means an unbounded ball, as in the reference implementation.
        return radius_for(x.shape, self.adv_max_norm) if self.adv_max_norm > 0 else None

    def __call__(self, ctx, micro_batches: list) -> dict[str, float]:
        draws = [self.draw(ctx, mb) for mb in micro_batches]  # x0, t, eps: fixed for the K inner steps
        deltas = [init_delta(mb["x"]) for mb in micro_batches]
        losses = free_at_steps(ctx, micro_batches, deltas,
                               lambda i, mb, delta: self.at_loss(ctx.model, mb, draws[i], delta),
                               self.adv_steps, self.adv_lr, self.radius(micro_batches[0]["x"]))
        self.update_sampler(ctx)
        delta_norm = torch.cat([per_sample_norm(d.detach()).flatten() for d in deltas]).mean().item()
        return {"loss": sum(losses) / len(losses), "loss_clean": losses[0], "loss_adv": losses[-1],
                "delta_norm": delta_norm}
