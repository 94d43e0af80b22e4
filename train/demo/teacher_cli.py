"""``toolkit train teacher``: a small Stable-Diffusion-style text-to-image teacher, trained from scratch.

Parts (all diffusers / transformers classes, so diffusers' own pipelines load the result): the VAE from
``toolkit train vae`` (frozen), the real CLIP BPE tokenizer (train/core/clip_tokenizer.py), a small
``CLIPTextModel`` trained *jointly* with the UNet from random init (no pretrained text encoder can be had
offline; the denoising loss teaches it to separate the captions), and a ``UNet2DConditionModel`` on 8x8x4
latents. Epsilon prediction on SD's scaled-linear schedule; captions are dropped (replaced by "") with
probability ``--caption-dropout`` so classifier-free guidance works. The export is a StableDiffusionPipeline
directory with a DDIM scheduler: ``toolkit train lcm --teacher`` takes it.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from atdiff.runtime.errors import ToolkitError, handles_errors
from atdiff.train.demo.cli_options import DEVICE, RESUME, SAVE_EVERY, SEED, report

TEXT_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                   projection_dim=64)
UNET_CONFIG = dict(in_channels=4, out_channels=4, block_out_channels=(64, 64), layers_per_block=1,
                   norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def teacher_scheduler_config() -> dict:
    from atdiff.train.core.tiny_models import LCM_SCHEDULER
    return {k: v for k, v in LCM_SCHEDULER.items() if k != "original_inference_steps"}


class TeacherObjective:
    """eps-MSE on VAE latents; the model is ModuleDict(unet, text_encoder), trained together."""
    optimizer_steps_per_batch = 1

    def __init__(self, vae, alphas_cumprod, empty_ids, caption_dropout: float):
        self.vae, self.alphas_cumprod, self.empty_ids, self.p = vae, alphas_cumprod, empty_ids, caption_dropout

    def __call__(self, ctx, micro_batches: list) -> dict[str, float]:
        import torch

        def loss_fn(i, mb):
            gen, pixels = ctx.generator, mb["pixel_values"]
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.sample(generator=gen) * self.vae.config.scaling_factor
            n = len(latents)
            drop = torch.rand(n, generator=gen, device=gen.device) < self.p
            ids = torch.where(drop[:, None].to(pixels.device), self.empty_ids.to(pixels.device), mb["input_ids"])
            t = torch.randint(0, len(self.alphas_cumprod), (n,), generator=gen, device=gen.device)
            noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(latents.device)
            ab = self.alphas_cumprod[t.cpu()].to(latents.device, torch.float32).view(-1, 1, 1, 1)
            noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
            text = ctx.model["text_encoder"](ids)[0]
            return (ctx.model["unet"](noisy, t.to(latents.device), text).sample - noise).pow(2).mean()

        return {"loss": ctx.update(micro_batches, loss_fn)}


def _parts(vae_dir: Path, run_dir: Path, resolution: int, seed: int, resume: bool):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from atdiff.train.core.clip_tokenizer import write_clip_tokenizer
    from atdiff.train.core.trainer import claim_run_dir
    if not (Path(vae_dir) / "config.json").is_file():
        raise ToolkitError(f"--vae {vae_dir} is not an AutoencoderKL directory (no config.json); train one with "
                           "'toolkit train vae' and pass its model/ directory")
    vae = AutoencoderKL.from_pretrained(vae_dir).requires_grad_(False).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    claim_run_dir(run_dir, resume)   # the tokenizer goes into the run directory: refuse a foreign --out first
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(run_dir) / "tokenizer"))
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"unet": UNet2DConditionModel(sample_size=resolution // factor, **UNET_CONFIG),
                                 "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))})
    return vae, tokenizer, model


def train_teacher(*, data: str, vae: Path, out: Path, resolution: int = 32, max_steps: int = 20000,
                  batch_size: int = 64, lr: float = 3e-4, caption_dropout: float = 0.1, ema_decay: float = 0.999,
                  guidance_scale: float = 3.0, seed: int = 0, save_every: int = 500, resume: bool = False, device: str = "auto",
                  progress: bool = True):
    import torch

    from atdiff.runtime.schedule import NoiseSchedule
    from atdiff.train.core.caption_data import CaptionDataset, find_records
    from atdiff.runtime.provenance import versions
    from atdiff.train.core.trainer import Trainer, TrainerConfig
    if not 0 <= caption_dropout < 1:
        raise ToolkitError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
    records = find_records(data)
    vae_model, tokenizer, model = _parts(vae, out, resolution, seed, resume)
    dataset = CaptionDataset(records, tokenizer, resolution)
    alphas = torch.from_numpy(NoiseSchedule.from_config(teacher_scheduler_config()).alphas_cumprod.copy())
    empty = dataset.tokenize([""])[0]
    record = {"command": "toolkit train teacher", "options": dict(data=data, vae=str(vae), resolution=resolution,
              max_steps=max_steps, batch_size=batch_size, lr=lr, caption_dropout=caption_dropout,
              ema_decay=ema_decay, seed=seed, guidance_scale=guidance_scale), "num_samples": len(dataset), "versions": versions("train")}
    config = TrainerConfig(run_dir=Path(out), max_steps=max_steps, batch_size=batch_size, lr=lr, max_grad_norm=1.0,
                           ema_decay=ema_decay, device=device, seed=seed, save_every=save_every, resume=resume,
                           log_every=50, progress=progress, command_config=record)
    objective = TeacherObjective(vae_model, alphas, empty, caption_dropout)
    return Trainer(config).fit(model, dataset, objective,
                               export=lambda m, tmp: export_teacher(m, vae_model, tokenizer, tmp, record))


def export_teacher(model, vae, tokenizer, out: Path, record: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from atdiff.runtime.provenance import files_sha256
    from atdiff.train.core.run_log import write_generation_defaults
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=model["text_encoder"], tokenizer=tokenizer,
                                   unet=model["unet"], scheduler=DDIMScheduler(**teacher_scheduler_config()),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    write_generation_defaults(out, guidance_scale=record["options"]["guidance_scale"])
    (out / "training.json").write_text(json.dumps({**record, "files_sha256": files_sha256(out, "*.safetensors")},
                                                  indent=2))


def register(app: typer.Typer) -> None:
    @app.command("teacher")
    @handles_errors
    def teacher(data: str = typer.Option(..., help="Image-caption shards or folder (toolkit train captions)."),
                vae: Path = typer.Option(..., help="The AutoencoderKL directory from 'toolkit train vae' (model/)."),
                out: Path = typer.Option(Path("runs/teacher"), help="Run directory; model/ is the pipeline."),
                resolution: int = typer.Option(32, help="Image size."),
                max_steps: int = typer.Option(20000, help="Training steps (batches)."),
                batch_size: int = typer.Option(64, help="Images per step."),
                lr: float = typer.Option(3e-4, help="AdamW learning rate."),
                caption_dropout: float = typer.Option(0.1, help="Probability of training on the empty caption (CFG)."),
                ema_decay: float = typer.Option(0.999, help="EMA decay of the exported weights."),
                guidance_scale: float = typer.Option(3.0, help="CFG scale the exported pipeline samples with by "
                                                     "default (toolkit.json; --guidance-scale overrides it)."),
                seed: int = SEED,
                save_every: int = SAVE_EVERY,
                resume: bool = RESUME,
                device: str = DEVICE) -> None:
        """Train a small text-to-image teacher (UNet + CLIP text encoder, jointly) on VAE latents."""
        result = train_teacher(data=data, vae=vae, out=out, resolution=resolution, max_steps=max_steps,
                               batch_size=batch_size, lr=lr, caption_dropout=caption_dropout, ema_decay=ema_decay,
                               guidance_scale=guidance_scale, seed=seed, save_every=save_every, resume=resume, device=device)
        report(result, "teacher pipeline")
