"""The input perturbation machinery shared by ADM-AT and LCM-AT ("free" adversarial training).

Free AT (Shafahi et al. 2019; Algorithm 1 of the seed paper): the perturbation ``delta`` is a leaf
tensor that requires grad; ONE backward of the training loss fills both ``delta.grad`` and the
parameters' ``.grad``. The optimizer step then uses the parameters' gradients and ``ascend`` uses
delta's, so K inner steps cost about K plain training steps, not 2K. ``free_at_steps`` is that loop
(Algorithm 1, lines 5-10); ADM-AT and LCM-AT differ only in the loss they hand it.

Norms are per sample (over all non-batch dims), as in the paper's ``g / ||g||``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped [B, 1, ..., 1] so it broadcasts against ``x``."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def radius_for(shape: torch.Size | tuple[int, ...], max_norm: float) -> float:
    """The projection radius ``sqrt(C*H*W) * max_norm`` used by the open ADM-AT implementation:
    ``max_norm`` is a per-element RMS budget, so the ball scales with the image size."""
    return math.sqrt(math.prod(shape[1:])) * max_norm


def init_delta(like: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, line 5: delta <- 0, as a float32 leaf that collects its gradient."""
    return torch.zeros_like(like, dtype=torch.float32).requires_grad_(True)


@torch.no_grad()
def ascend(delta: torch.Tensor, step_size: float, radius: float | None, eps: float = 1e-12) -> None:
    """Algorithm 1, line 8, in place: ``delta += step_size * g / ||g||`` per sample, then project
    onto ``{||delta|| <= radius}`` (no projection when ``radius`` is None). Clears delta.grad."""
    g = delta.grad
    if g is None:
        raise RuntimeError("delta has no gradient: run backward on a loss that depends on delta first")
    g = g.float()
    norm = per_sample_norm(g)
    # An fp16 loss-scale overflow gives inf/nan gradients (the optimizer skips that step); the
    # samples hit keep their delta instead of turning it into nan. The scale itself cancels in g/||g||.
    finite = torch.isfinite(norm)
    step = torch.where(finite, g / (norm + eps), torch.zeros_like(g))
    delta.add_(step.to(delta.dtype), alpha=step_size)
    if radius is not None:
        project_(delta, radius)
    delta.grad = None


@torch.no_grad()
def project_(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each sample of ``delta`` back onto the L2 ball of ``radius`` if it left it."""
    scale = (radius / (per_sample_norm(delta) + 1e-12)).clamp(max=1.0)
    return delta.mul_(scale)


def free_at_steps(ctx, micro_batches: list, deltas: list[torch.Tensor],
                  loss_fn: Callable[[int, Any, torch.Tensor], torch.Tensor], steps: int, step_size: float,
                  radius: float | None, after_update: Callable[[], None] | None = None) -> list[float]:
    """Algorithm 1, lines 6-10, on one step's micro-batches (``deltas[i]``: micro-batch i's ``init_delta``).
    ``steps`` times: ONE forward/backward of ``loss_fn(i, micro_batch, deltas[i])`` plus the optimizer step
    (``ctx.update``), then ``after_update()`` (e.g. a target-network EMA), then the ascent on each delta.
    Returns the ``steps`` mean losses; the deltas end as the last loss saw them.

    The last ascent is skipped: its delta would never be used. When the optimizer skipped its step (an fp16
    loss-scale overflow: the gradients are inf/NaN) delta does not move either, as lines 8 and 9 share one
    gradient."""
    losses = []
    for k in range(steps):
        losses.append(ctx.update(micro_batches, lambda i, mb: loss_fn(i, mb, deltas[i])))
        if after_update is not None:
            after_update()
        skipped = ctx.accelerator.optimizer_step_was_skipped
        for delta in deltas:
            if k < steps - 1 and not skipped:
                ascend(delta, step_size, radius)
            else:
                delta.grad = None
    return losses
