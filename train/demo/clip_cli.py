"""``toolkit train clip``: a small open_clip CLIP trained on image-caption shards, for the CLIP score where no
pretrained CLIP can be had offline (the demo study's captioned Fashion-MNIST).

The model is open_clip's own ``CLIP`` built from a config (a ViT on 32x32 images in 4x4 patches, a 2-layer text
transformer over the real CLIP BPE vocabulary) and trained with open_clip's contrastive ``ClipLoss`` through the
shared trainer (resumable checkpoints, EMA, run directory). ``model/`` holds ``toolkit-clip.json`` (the open_clip
config) and ``open_clip_model.safetensors``; ``toolkit eval clip --clip-model runs/clip/model`` reads both.
Images are preprocessed exactly as open_clip's eval transform does for this config (resize/crop to the image
size, OpenAI mean/std), so training and scoring see the same pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from atdiff.eval.clip_score import CONFIG_FILE, WEIGHTS_FILE  # what `toolkit eval clip --clip-model DIR` reads
from atdiff.runtime.errors import ToolkitError, handles_errors
from atdiff.train.demo.cli_options import DEVICE, RESUME, SAVE_EVERY, SEED, report

# Sized for a CPU: captions here are short (the longest Fashion-MNIST caption is 15 tokens), so 32 positions
CONTEXT = 32
CLIP_CONFIG = {"embed_dim": 64,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4,
                              "mlp_ratio": 2.0},
               "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                            "mlp_ratio": 2.0}}
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)   # open_clip's OpenAI stats


class ClipPairs:
    """``{"image": normalised [3, R, R], "text": int64 [77]}`` per caption record (open_clip's tokenizer)."""

    def __init__(self, records, resolution: int):
        import open_clip
        import torch

        from atdiff.train.core.caption_data import CaptionDataset
        self.records, self.images = records, CaptionDataset(records, tokenizer=None, resolution=resolution)
        # the CLIP BPE every open_clip text tower shares; longer captions are cut (as the scorer's tokenizer does)
        self.tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT)
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        pixels = (self.images.image(i) + 1) / 2   # [-1, 1] -> [0, 1], as ToTensor gives open_clip's transform
        return {"image": (pixels - self.mean) / self.std, "text": self.tokenize([self.records[i].caption])[0]}


class ClipObjective:
    optimizer_steps_per_batch = 1

    def __init__(self):
        from open_clip.loss import ClipLoss
        self.loss = ClipLoss()

    def __call__(self, ctx, micro_batches: list) -> dict[str, float]:
        def loss_fn(i, mb):
            model = ctx.model
            image = model.encode_image(mb["image"], normalize=True)
            text = model.encode_text(mb["text"], normalize=True)
            return self.loss(image, text, model.logit_scale.exp())
        return {"loss": ctx.update(micro_batches, loss_fn)}


def build_clip(seed: int):
    import open_clip
    import torch
    torch.manual_seed(seed)
    return open_clip.CLIP(**CLIP_CONFIG)


def export_clip(model, out: Path, record: dict) -> None:
    from safetensors.torch import save_file

    from atdiff.runtime.provenance import files_sha256
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(CLIP_CONFIG, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / "training.json").write_text(json.dumps({**record, "files_sha256": files_sha256(out, "*.safetensors")},
                                                  indent=2))


def train_clip(*, data: str, out: Path, max_steps: int = 2000, batch_size: int = 256, lr: float = 5e-4,
               ema_decay: float = 0.999, seed: int = 0, save_every: int = 250, resume: bool = False,
               device: str = "auto", progress: bool = True):
    from atdiff.runtime.provenance import versions
    from atdiff.train.core.caption_data import find_records
    from atdiff.train.core.trainer import Trainer, TrainerConfig
    if batch_size < 2:
        raise ToolkitError(f"--batch-size must be at least 2 (contrastive pairs need negatives), got {batch_size}")
    dataset = ClipPairs(find_records(data), CLIP_CONFIG["vision_cfg"]["image_size"])
    record = {"command": "toolkit train clip", "options": dict(data=data, max_steps=max_steps, batch_size=batch_size,
              lr=lr, ema_decay=ema_decay, seed=seed), "clip_config": CLIP_CONFIG, "num_samples": len(dataset),
              "versions": versions("train")}
    config = TrainerConfig(run_dir=Path(out), max_steps=max_steps, batch_size=batch_size, lr=lr, max_grad_norm=1.0,
                           ema_decay=ema_decay, device=device, seed=seed, save_every=save_every, resume=resume,
                           log_every=50, progress=progress, command_config=record)
    return Trainer(config).fit(build_clip(seed), dataset, ClipObjective(),
                               export=lambda m, tmp: export_clip(m, tmp, record))


def register(app: typer.Typer) -> None:
    @app.command("clip")
    @handles_errors
    def clip(data: str = typer.Option(..., help="Image-caption shards or folder (toolkit train captions)."),
             out: Path = typer.Option(Path("runs/clip"), help="Run directory; model/ is the open_clip model."),
             max_steps: int = typer.Option(2000, help="Training steps (batches)."),
             batch_size: int = typer.Option(256, help="Image-caption pairs per step (the contrastive batch)."),
             lr: float = typer.Option(5e-4, help="AdamW learning rate."),
             ema_decay: float = typer.Option(0.999, help="EMA decay of the exported weights."),
             seed: int = SEED,
             save_every: int = SAVE_EVERY,
             resume: bool = RESUME,
             device: str = DEVICE) -> None:
        """Train a small CLIP (open_clip) on image-caption pairs: the CLIP-score judge for offline text-to-image."""
        result = train_clip(data=data, out=out, max_steps=max_steps, batch_size=batch_size, lr=lr,
                            ema_decay=ema_decay, seed=seed, save_every=save_every, resume=resume, device=device)
        report(result, "CLIP model")
