"""Which timesteps a training batch sees: uniform (DDPM, Algorithm 1 line 3) or ADM's
loss-second-moment importance sampler (Nichol & Dhariwal 2021, improved-diffusion ``resample.py``).

Both return ``(t, weights)``: the loss of sample i is multiplied by ``weights[i]`` so the expected
weighted loss equals the uniform-t objective. Randomness comes from the caller's generator (the
trainer's per-step ``ctx.generator``), so a resumed run draws the same timesteps.

Hand-written rather than imported: improved-diffusion is not a package, and the sampler is ~40 lines.
Its state (the loss history) is checkpointed through ``state_dict``/``load_state_dict``.
"""
from __future__ import annotations

import torch

from atdiff.runtime.errors import ToolkitError


class UniformSampler:
    name = "uniform"

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch: int, generator: torch.Generator, device: torch.device):
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=generator.device)
        return t.to(device), torch.ones(batch, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling ignores the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentSampler:
    """p(t) proportional to sqrt(E[loss_t^2]) over the last ``history`` losses seen at t, mixed with
    ``uniform_prob`` of the uniform distribution; uniform until every t has a full history (ADM's
    warm-up). ``update`` must see the losses of ALL processes (the objective gathers them), so every
    process keeps the same history, as ADM's ``update_with_local_losses`` does."""

    name = "loss-second-moment"

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        p = self.losses.pow(2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch: int, generator: torch.Generator, device: torch.device):
        p = self.probabilities()
        # Draw on the generator's device so the stream is the trainer's per-step one.
        t = torch.multinomial(p.to(generator.device), batch, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t.cpu()])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[step] == self.history:
                self.losses[step] = torch.roll(self.losses[step], -1)
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses = state["losses"].clone().to(torch.float64)
        self.counts = state["counts"].clone().to(torch.long)


SAMPLERS = {cls.name: cls for cls in (UniformSampler, LossSecondMomentSampler)}


def make_timestep_sampler(name: str, num_timesteps: int):
    if name not in SAMPLERS:
        raise ToolkitError(f"unknown --timestep-sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](num_timesteps)
