"""Bind a chunk's conditioning (text embeddings, CFG, LCM's w-embedding, class labels) into the sampler's
``model(x, t)`` contract, so samplers never learn what the model is conditioned on."""
from __future__ import annotations

import dataclasses
from typing import Any

from atdiff.runtime.generation import GenerationRequest
from atdiff.runtime.guidance import classifier_free_guidance, guidance_scale_embedding
from atdiff.runtime.model_spec import ModelSpec


@dataclasses.dataclass
class Conditioning:
    context: Any = None           # text embeddings [B, L, D] (2B with CFG: uncond first)
    timestep_cond: Any = None     # LCM w-embedding [B or 2B, time_cond_proj_dim]
    class_labels: Any = None      # int64 [B]
    cfg_scale: float | None = None

    def model_fn(self, backend, schedule):
        """``model(x, t)`` returning the (guided) raw model output for this chunk."""
        if self.cfg_scale is None:
            return lambda x, t: backend.denoise(x, int(t), encoder_hidden_states=self.context,
                                                timestep_cond=self.timestep_cond, class_labels=self.class_labels)
        half = self.context.shape[0] // 2
        uncond, cond = self.context[:half], self.context[half:]

        def unet(x, t, context):
            return backend.denoise(x, int(t), encoder_hidden_states=context, timestep_cond=self.timestep_cond)
        return classifier_free_guidance(unet, cond, uncond, self.cfg_scale)


def build_conditioning(backend, spec: ModelSpec, tokenizer, request: GenerationRequest, lo: int,
                       hi: int) -> Conditioning:
    """Images ``lo:hi`` of ``request``: ``tokenizer`` (latent models) turns prompts into token ids."""
    if not spec.is_latent:
        labels = None if request.class_labels is None else backend.from_numpy(request.class_labels[lo:hi])
        return Conditioning(class_labels=labels)
    prompts = request.prompts[lo:hi]
    cfg = request.guidance == "cfg"
    if cfg:
        # one text-encoder call for both branches; uncond first, as CFG's batch of 2B expects
        context = backend.encode_text(tokenizer(list(request.negative_prompts[lo:hi]) + prompts))
    else:
        context = backend.encode_text(tokenizer(prompts))
    timestep_cond = None
    if spec.time_cond_proj_dim:
        rows = context.shape[0]
        timestep_cond = backend.from_numpy(
            guidance_scale_embedding(request.guidance_scale, spec.time_cond_proj_dim, rows))
    return Conditioning(context=context, timestep_cond=timestep_cond,
                        cfg_scale=request.guidance_scale if cfg else None)
