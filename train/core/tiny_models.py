"""Tiny random-weight models built from configs, for tests and the offline demo.

They have the real architectures and real CLIP tokenizer of the models users serve (Stable Diffusion /
LCM text-to-image pipelines, ADM-style pixel UNets) at a few hundred K to ~2M parameters, so every code
path runs on a CPU in seconds. Their images are noise: the weights are random.
"""
from __future__ import annotations

from pathlib import Path

import torch

from atdiff.train.core.clip_tokenizer import write_clip_tokenizer

# LCM-Dreamshaper-v7's scheduler settings (SD-1.5 schedule, LCM's skipping grid).
LCM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", original_inference_steps=50, timestep_spacing="leading",
                     steps_offset=1, set_alpha_to_one=True, clip_sample=False)
TINY_UNCONDITIONAL_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                               layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _tiny_text_encoder(hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))


def _tiny_vae():
    from diffusers import AutoencoderKL
    # three blocks -> 4x spatial compression, so a 16x16 latent decodes to 64x64 pixels
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                         layers_per_block=1, norm_num_groups=8, sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def tiny_text_unet(time_cond_proj_dim: int | None = 32, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=8, time_cond_proj_dim=time_cond_proj_dim,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def build_tiny_text_to_image(out_dir: str | Path, *, seed: int = 0, lcm: bool = True) -> Path:
    """Save a tiny text-to-image pipeline. ``lcm=True``: LatentConsistencyModelPipeline whose UNet has the
    guidance embedding (time_cond_proj_dim) and an LCMScheduler; ``lcm=False``: a StableDiffusionPipeline-style
    teacher (no guidance embedding, DDIM scheduler, classifier-free guidance)."""
    from diffusers import DDIMScheduler, LCMScheduler, LatentConsistencyModelPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    parts = dict(unet=tiny_text_unet(32 if lcm else None), vae=_tiny_vae(), text_encoder=_tiny_text_encoder(),
                 tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(out_dir / "tokenizer")))
    if lcm:
        pipe = LatentConsistencyModelPipeline(scheduler=LCMScheduler(**LCM_SCHEDULER), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False, **parts)
    else:
        sched = {k: v for k, v in LCM_SCHEDULER.items() if k != "original_inference_steps"}
        pipe = StableDiffusionPipeline(scheduler=DDIMScheduler(**sched), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_unconditional(out_dir: str | Path, *, seed: int = 0, num_class_embeds: int | None = None) -> Path:
    """Save a tiny ADM-style pixel UNet (16x16 RGB) as a DDPMPipeline directory with a linear DDPM schedule."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(num_class_embeds=num_class_embeds, **TINY_UNCONDITIONAL_UNET)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    out_dir = Path(out_dir)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir)
    return out_dir
