"""An SD-1.5-size LCM pipeline with random weights, built offline from the configs in ``configs/`` (issue 27).

    toolkit bench sd15-fixture /work/sd15/pipe                 # full size: 860M UNet, ViT-L/14 text, 84M VAE
    toolkit bench sd15-fixture /tmp/sd15-ci --width ci         # real depth, reduced width (the CI test's)

What users deploy (LCM-Dreamshaper-v7) is this architecture with trained weights; no hub is reachable here, so the
weights are seeded random values: sizes, graphs, file layout and every code path are the real ones, the images are
noise. The tokenizer is the real CLIP BPE tokenizer, written from open_clip's bpe_simple_vocab_16e6.txt.gz
(``atdiff.train.core.clip_tokenizer``). The result is a diffusers ``LatentConsistencyModelPipeline`` directory
(``save_pretrained``), ~4.3 GB at full size; it is written to a staging directory beside ``OUT`` and renamed into
place, and an existing non-empty ``OUT`` is refused. Never commit it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import typer

from atdiff.runtime.errors import ToolkitError

CONFIGS = Path(__file__).with_name("configs")
PARTS = ("unet", "text_encoder", "vae", "scheduler")
WIDTHS = ("full", "ci")
FIXTURE_FILE = "fixture.json"   # what was built: seed, width, parameter counts (diffusers ignores the file)


def load_configs(width: str = "full") -> dict[str, dict]:
    """The four configs; ``width='ci'`` overrides the widths listed in configs/ci_width.json (depth untouched)."""
    if width not in WIDTHS:
        raise ToolkitError(f"unknown --width '{width}'; choose one of {', '.join(WIDTHS)}")
    configs = {part: json.loads((CONFIGS / f"{part}.json").read_text()) for part in PARTS}
    if width == "ci":
        overrides = json.loads((CONFIGS / "ci_width.json").read_text())
        for part, values in overrides.items():
            if part.startswith("_"):
                continue
            configs[part].update(values)
    return configs


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ToolkitError(f"{out} exists and is not an empty directory; pass a new path (the fixture never "
                           "overwrites: delete it yourself if it is an old fixture)")


def build_parts(configs: dict[str, dict], tokenizer_dir: Path, seed: int) -> dict:
    """The pipeline's components from ``configs``, weights drawn from torch's default initialisers after
    ``torch.manual_seed(seed)`` (the same seed gives the same weights)."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from atdiff.train.core.clip_tokenizer import write_clip_tokenizer

    torch.manual_seed(seed)
    text = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    return dict(unet=UNet2DConditionModel.from_config(configs["unet"]),
                text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                vae=AutoencoderKL.from_config(configs["vae"]),
                scheduler=LCMScheduler.from_config(configs["scheduler"]),
                tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(tokenizer_dir)))


def hub_key_names(weights: Path, prefix: str = "text_model.") -> None:
    """Rename a CLIPTextModel's tensors to the hub's names (``text_model.embeddings...``, as SD-1.5's and
    LCM-Dreamshaper-v7's text_encoder/model.safetensors have them). transformers 5 saves them without the prefix,
    which transformers 4.x (Optimum's venv) cannot map: it would run the peers on a random text encoder. Both
    read the hub's names to the same weights."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(weights)
    save_file({k if k.startswith(prefix) else prefix + k: v for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})


def build_pipeline(out: str | Path, *, seed: int = 0, width: str = "full") -> Path:
    """Write the random-weight pipeline to ``out`` (refused when ``out`` is a non-empty directory)."""
    from diffusers import LatentConsistencyModelPipeline

    out = Path(out)
    configs = load_configs(width)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())   # mkdtemp's 0700 would make the model private to its builder
    try:
        parts = build_parts(configs, staging / "tokenizer", seed)
        pipe = LatentConsistencyModelPipeline(safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False, **parts)
        pipe.save_pretrained(staging)
        hub_key_names(staging / "text_encoder" / "model.safetensors")
        counts = {name: sum(p.numel() for p in parts[name].parameters()) for name in ("unet", "text_encoder", "vae")}
        record = {"seed": seed, "width": width, "parameters": counts, "configs": str(CONFIGS)}
        (staging / FIXTURE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()   # empty (checked above)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def command(out: Path = typer.Argument(..., help="New directory for the pipeline (outside the repository)."),
            seed: int = typer.Option(0, min=0, help="Seed of the random weights."),
            width: str = typer.Option("full", help="full (SD-1.5 size) | ci (real depth, reduced width).")) -> None:
    """Build the random-weight SD-1.5-size LCM pipeline as a diffusers directory."""
    path = build_pipeline(out, seed=seed, width=width)
    print(json.dumps(json.loads((path / FIXTURE_FILE).read_text()), indent=2))

