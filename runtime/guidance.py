"""Conditioning helpers that wrap a UNet call into the sampler's ``model(x, t)`` contract."""
from __future__ import annotations

import math

import numpy as np
from array_api_compat import array_namespace


def guidance_scale_embedding(guidance_scale: float, dim: int, batch: int) -> np.ndarray:
    """LCM's w-embedding (Luo et al. 2023, eq. 7; diffusers' ``get_guidance_scale_embedding``): a sinusoidal
    embedding of ``(w - 1) * 1000`` fed to the UNet's ``timestep_cond`` instead of running CFG."""
    w = (guidance_scale - 1.0) * 1000.0
    half = dim // 2
    # float32 throughout, in diffusers' order of operations, so both give the same embedding
    step = np.float32(math.log(10000.0)) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    emb = np.float32(w) * freqs
    emb = np.concatenate([np.sin(emb), np.cos(emb)])
    if dim % 2 == 1:
        emb = np.pad(emb, (0, 1))
    return np.broadcast_to(emb.astype(np.float32), (batch, dim)).copy()


def classifier_free_guidance(unet, cond, uncond, scale: float):
    """CFG (Ho & Salimans 2022): eps = eps_u + s * (eps_c - eps_u), the two branches run as ONE batch of 2B.
    ``unet(x, t, context)`` returns the raw model output; ``cond``/``uncond`` are text embeddings [B, L, D]."""
    xp = array_namespace(cond)
    context = xp.concat([uncond, cond], axis=0)

    def model(x, t):
        out = unet(xp.concat([x, x], axis=0), t, context)
        out_uncond, out_cond = out[: x.shape[0]], out[x.shape[0]:]
        return out_uncond + scale * (out_cond - out_uncond)
    return model
