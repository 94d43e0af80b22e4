"""``toolkit train vae``: a small diffusers ``AutoencoderKL`` for the offline text-to-image demo pipeline.

32x32 RGB -> 8x8x4 latents (three blocks, two downsamplings), trained on image-caption shards (captions are
ignored) with the shared trainer: reconstruction MSE of a sampled latent plus a small KL term (SD's VAE adds
perceptual and GAN losses; at 32x32 on a CPU plain MSE is what fits). The export sets ``scaling_factor``
to 1 / std of the latents' means on 1024 training images, as Stable Diffusion's 0.18215 was chosen, so the
diffusion model sees unit-variance latents.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from atdiff.runtime.errors import ToolkitError, handles_errors
from atdiff.train.demo.cli_options import DEVICE, RESUME, SAVE_EVERY, SEED, report

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                  layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3)


class PixelsOnly:
    """A caption dataset's images alone (``{"x": [3, R, R]}``): the VAE needs no tokenizer."""

    def __init__(self, records, resolution: int):
        from atdiff.train.core.caption_data import CaptionDataset
        self.images = CaptionDataset(records, tokenizer=None, resolution=resolution)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.images.image(i)}


class VAEObjective:
    optimizer_steps_per_batch = 1

    def __init__(self, kl_weight: float):
        self.kl_weight = kl_weight

    def __call__(self, ctx, micro_batches: list) -> dict[str, float]:
        parts = {}

        def loss_fn(i, mb):
            posterior = ctx.model.encode(mb["x"]).latent_dist
            recon = ctx.model.decode(posterior.sample(generator=ctx.generator)).sample
            mse, kl = (recon - mb["x"]).pow(2).mean(), posterior.kl().mean() / mb["x"][0].numel()
            parts.update(mse=mse.item(), kl=kl.item())
            return mse + self.kl_weight * kl

        return {"loss": ctx.update(micro_batches, loss_fn), **parts}


def latent_scaling_factor(vae, dataset, count: int = 1024) -> float:
    import torch
    with torch.no_grad():
        x = torch.stack([dataset[i]["x"] for i in range(min(count, len(dataset)))])
        means = torch.cat([vae.encode(x[k:k + 256]).latent_dist.mean for k in range(0, len(x), 256)])
    return float(1.0 / means.std())


def train_vae(*, data: str, out: Path, resolution: int = 32, max_steps: int = 4000, batch_size: int = 64,
              lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0, save_every: int = 500, resume: bool = False,
              device: str = "auto", progress: bool = True):
    import torch
    from diffusers import AutoencoderKL

    from atdiff.train.core.caption_data import find_records
    from atdiff.runtime.provenance import files_sha256, versions
    from atdiff.train.core.trainer import Trainer, TrainerConfig
    if resolution % 4:
        raise ToolkitError(f"--resolution must be a multiple of 4 (the VAE downsamples twice), got {resolution}")
    dataset = PixelsOnly(find_records(data), resolution)
    torch.manual_seed(seed)
    vae = AutoencoderKL(sample_size=resolution, **VAE_CONFIG)
    record = {"command": "toolkit train vae", "options": dict(data=data, resolution=resolution, max_steps=max_steps,
              batch_size=batch_size, lr=lr, kl_weight=kl_weight, seed=seed), "num_samples": len(dataset),
              "versions": versions("train")}

    def export(model, tmp: Path) -> None:
        model.register_to_config(scaling_factor=latent_scaling_factor(model, dataset))
        model.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps({**record, "scaling_factor": model.config.scaling_factor,
                                                       "files_sha256": files_sha256(tmp)}, indent=2))

    config = TrainerConfig(run_dir=Path(out), max_steps=max_steps, batch_size=batch_size, lr=lr, max_grad_norm=1.0,
                           ema_decay=None, device=device, seed=seed, save_every=save_every, resume=resume,
                           log_every=50, export_weights="raw", progress=progress, command_config=record)
    return Trainer(config).fit(vae, dataset, VAEObjective(kl_weight), export=export)


def register(app: typer.Typer) -> None:
    @app.command("vae")
    @handles_errors
    def vae(data: str = typer.Option(..., help="Image-caption shards or folder (captions are not used)."),
            out: Path = typer.Option(Path("runs/vae"), help="Run directory; model/ is the AutoencoderKL."),
            resolution: int = typer.Option(32, help="Image size (latents are a quarter of it)."),
            max_steps: int = typer.Option(4000, help="Training steps (batches)."),
            batch_size: int = typer.Option(64, help="Images per step."),
            lr: float = typer.Option(1e-3, help="AdamW learning rate."),
            kl_weight: float = typer.Option(1e-6, help="Weight of the KL term (per element)."),
            seed: int = SEED,
            save_every: int = SAVE_EVERY,
            resume: bool = RESUME,
            device: str = DEVICE) -> None:
        """Train the small AutoencoderKL of the offline text-to-image demo pipeline."""
        result = train_vae(data=data, out=out, resolution=resolution, max_steps=max_steps, batch_size=batch_size,
                           lr=lr, kl_weight=kl_weight, seed=seed, save_every=save_every, resume=resume, device=device)
        report(result, "VAE")
