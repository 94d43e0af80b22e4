"""Parity tolerances stated relative to the magnitude compared, so they follow from the arithmetic on the
path (rounding unit per op, times the number of ops, times any amplification) and not from one machine's
result. Roundings are to nearest: one op in a format with machine epsilon EPS errs by at most EPS / 2."""
from __future__ import annotations

import numpy as np

EPS64 = float(np.finfo(np.float64).eps)   # 2.2e-16
EPS32 = float(np.finfo(np.float32).eps)   # 1.19e-7
EPS16 = float(np.finfo(np.float16).eps)   # 9.8e-4
# diffusers' schedulers keep alphas_cumprod as a float32 cumprod of 1000 factors, each product rounding by
# <= EPS32/2: relative to our float64 one it is good to 1000 EPS32/2 (6e-5) at worst
FLOAT32_CUMPROD = 1000 * EPS32 / 2


def as_float64(x) -> np.ndarray:
    """numpy copy in float64 of an array, a torch tensor (any device or dtype) or a number."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs(*arrays) -> float:
    """Largest |value| over all of ``arrays`` (the magnitude the rounding errors are relative to)."""
    return max(float(np.abs(as_float64(a)).max(initial=0.0)) for a in arrays)


def scaled_error(got, ref, scale: float | None = None) -> float:
    """max |got - ref| / scale, scale defaulting to max |ref|; shapes must match."""
    got, ref = as_float64(got), as_float64(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != reference's {ref.shape}"
    scale = max_abs(ref) if scale is None else scale
    err = float(np.abs(got - ref).max(initial=0.0))
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def assert_close_scaled(got, ref, rel: float, scale: float | None = None, what: str = ""):
    """|got - ref| <= rel * scale everywhere (scale defaulting to max |ref|): an absolute bound derived
    from a relative one, since the rounding of a sum is relative to its largest terms, not to each
    element (an element near zero carries the error of its neighbours' magnitude)."""
    err = scaled_error(got, ref, scale)
    label = f"{what}: " if what else ""
    assert err <= rel, f"{label}max |got - ref| is {err:.3g} of the scale, over the {rel:.3g} allowed"


# ---- networks: two evaluations whose kernels round differently (ONNX Runtime vs PyTorch, another batch
# size, CPU vs CUDA). Each layer's output rounds once per evaluation on each side (<= EPS apart, relative),
# and those differences add up over the layers a result passes through, step after step.

# layer_count of train/core/tiny_models.py's networks (checked in test_pipeline.py; the ONNX tests cannot load them)
TINY_TEXT_ENCODER_LAYERS = 14        # 2 of them embedding tables
TINY_TEXT_UNET_LAYERS = 84          # 83 without LCM's guidance embedding (the SD-style model)
TINY_VAE_DECODER_LAYERS = 26
TINY_PIXEL_UNET_LAYERS = 51


def layer_count(module) -> int:
    """Layers of a torch module (TorchScript too) that each round their output once per evaluation: the
    modules owning a weight matrix or kernel (convolutions, linear layers, attention projections; embedding
    tables count as well). An upper bound on its depth, as parallel branches count too."""
    return sum(any(p.dim() >= 2 for p in m.parameters(recurse=False)) for m in module.modules())


def network_rel(layers: int, amplification: float = 1.0, eps: float = EPS32) -> float:
    """Relative difference allowed after ``layers`` layer evaluations that round differently on the two
    sides: one rounding each (<= ``eps`` apart), adding up, times what the sampler multiplies them by."""
    return layers * amplification * eps


def guidance_amplification(scale: float) -> float:
    """Classifier-free guidance (1 - g) eps_uncond + g eps_cond: a difference in either branch reaches the
    guided eps times |1 - g| + g (14 at g = 7.5)."""
    return abs(1.0 - scale) + scale


def clipped_step_growth(schedule, timesteps) -> float:
    """A clip_sample sampler's result is bounded, but not the error in it: x0 = (x - sigma eps) / alpha_t
    enters the next step times alpha_next, so a network difference grows by up to the largest
    alpha_next / alpha_t over the grid (the last step, to alpha_bar = 1 before t=0, included)."""
    ab = [schedule.alpha_bar(int(t)) for t in timesteps] + [schedule.final_alpha_cumprod]
    return max((ab[i + 1] / ab[i]) ** 0.5 for i in range(len(timesteps)))


def sampler_ops_rel(steps: int, eps: float = EPS32) -> float:
    """Two implementations of a sampler's arithmetic (ours vs diffusers', torch vs numpy) on the same network
    outputs: ~10 elementwise ops per step, each correctly rounded on both sides (<= eps apart), adding up."""
    return steps * 10 * eps


def schedule_rel(theirs, ours, timesteps) -> float:
    """How far another alphas_cumprod (diffusers' float32 one) is from ours at ``timesteps``, relative to
    alpha_bar or 1 - alpha_bar, whichever is smaller: the most that any sqrt(alpha_bar) or
    sqrt(1 - alpha_bar) a step multiplies by can move, doubled (the sqrt halves it)."""
    ours = as_float64(ours)
    t = np.asarray(as_float64(timesteps), dtype=np.int64)
    error = np.abs(as_float64(theirs) - ours)[t]
    return float((error / np.minimum(ours[t], 1.0 - ours[t])).max(initial=0.0))


def fid_rounding_bound(mu1, sigma1, mu2, sigma2) -> float:
    """How far a float64 FID ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) can be off by rounding. A backward
    stable sqrtm computes the root of a product perturbed by d = dim EPS64 ||S1 S2||, which moves the square
    root of each eigenvalue lambda by up to min(sqrt(d), d / (2 sqrt(lambda))): sqrt(d) for the zero ones of a
    singular product (fewer samples than dimensions); the traces and the sum add ~dim roundings of their size."""
    mu1, mu2, sigma1, sigma2 = (as_float64(v) for v in (mu1, mu2, sigma1, sigma2))
    product, dim = sigma1 @ sigma2, len(sigma1)
    d = dim * EPS64 * np.linalg.norm(product, 2)
    root = np.sqrt(np.clip(np.linalg.eigvals(product).real, 0.0, None))
    moved = np.where(root > 0, d / (2 * np.maximum(root, np.finfo(np.float64).tiny)), np.sqrt(d))
    sums = dim * EPS64 * (np.trace(sigma1) + np.trace(sigma2) + float((mu1 - mu2) @ (mu1 - mu2)))
    return 2 * float(np.minimum(np.sqrt(d), moved).sum()) + sums


# ---- images: the runtime's promise for batching (runtime/noise.py BATCHED_PIXEL_TOLERANCE) ----------------------

def assert_same_seed_images(got, alone, what: str = "") -> None:
    """uint8 images [N, H, W, 3] made in a batch (or served, or by another front end) vs the same seeds made
    alone: at most BATCHED_PIXEL_TOLERANCE levels apart per channel. And the references of different seeds are
    further apart than that, so the comparison could fail (a blank or seed-blind generator would pass it)."""
    from atdiff.runtime.noise import BATCHED_PIXEL_TOLERANCE as levels
    got, alone = np.asarray(got), np.asarray(alone)
    assert got.dtype == alone.dtype == np.uint8 and got.shape == alone.shape, (got.dtype, got.shape, alone.shape)
    label = f"{what}: " if what else ""
    off = np.abs(got.astype(np.int16) - alone.astype(np.int16)).reshape(len(got), -1).max(axis=1)
    assert (off <= levels).all(), f"{label}images off by {off.tolist()} levels, over the {levels} promised"
    apart = [int(np.abs(alone[i].astype(np.int16) - alone[j]).max()) for i in range(len(alone))
             for j in range(i + 1, len(alone))]
    assert min(apart, default=levels + 1) > levels, f"{label}different seeds' images are only {apart} levels apart"
