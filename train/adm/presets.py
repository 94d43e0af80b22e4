"""ADM-style pixel UNets as diffusers ``UNet2DModel`` configs, and how a run gets its model.

A preset fixes the architecture; the data fixes ``in_channels``/``out_channels`` and ``sample_size``,
and ``--class-cond`` sets ``num_class_embeds``. ``--init`` fine-tunes a saved UNet2DModel: its weights
must fit the preset's shapes (checked, with a clear error, before any training starts).

ADM (Dhariwal & Nichol 2021) mapped onto UNet2DModel: ``resnet_time_scale_shift="scale_shift"`` is
ADM's ``use_scale_shift_norm``; attention sits in the blocks whose input resolution ADM lists in
``attention_resolutions``; ``attention_head_dim`` is ADM's ``num_head_channels``. ADM's learned
variance (``learn_sigma``) is not modelled: the UNet predicts epsilon only, as runtime/ samplers expect.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from atdiff.runtime.errors import ToolkitError
from atdiff.train.core.tiny_models import TINY_UNCONDITIONAL_UNET

LINEAR_1000 = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                   prediction_type="epsilon", clip_sample=True)
# ADM's CIFAR-10 and ImageNet-64 models use the cosine schedule (improved-diffusion's "cosine").
COSINE_1000 = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                   prediction_type="epsilon", clip_sample=True)

_ADM_COMMON = dict(resnet_time_scale_shift="scale_shift", norm_num_groups=32, dropout=0.1)

PRESETS: dict[str, dict[str, Any]] = {
    # ADM CIFAR-10 (the paper's): 128 ch, mult 1,2,2,2, 3 res blocks, attention at 16x16, 4 heads.
    "cifar10": dict(unet=dict(block_out_channels=(128, 256, 256, 256), layers_per_block=3, attention_head_dim=64,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                              **_ADM_COMMON),
                    scheduler=COSINE_1000),
    # ADM ImageNet-64: 192 ch, mult 1,2,3,4, 3 res blocks, attention at 32,16,8, 64 channels per head.
    "imagenet64": dict(unet=dict(block_out_channels=(192, 384, 576, 768), layers_per_block=3, attention_head_dim=64,
                                 down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
                                 up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",), **_ADM_COMMON),
                       scheduler=COSINE_1000),
    # A small ADM for 28x28 MNIST / Fashion-MNIST (~6M parameters): 28 -> 14 (attention) -> 7.
    "mnist": dict(unet=dict(block_out_channels=(64, 128, 128), layers_per_block=2, attention_head_dim=32,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), **_ADM_COMMON),
                  scheduler=LINEAR_1000),
    # Sized for the Fashion-MNIST study on a 2-core CPU (docs/results.md): 0.72M parameters, native 28x28,
    # 28 -> 14 -> 7 with attention only at 7x7 (attention at 14x14 doubles the cost). One training step at
    # batch 64 takes ~0.43 s on one CPU thread; sampling runs at ~400 images per second per UNet call.
    "fmnist": dict(unet=dict(block_out_channels=(16, 32, 64), layers_per_block=1, attention_head_dim=32,
                             down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                             **dict(_ADM_COMMON, norm_num_groups=8)),
                   scheduler=LINEAR_1000),
    # The fmnist layout at half the width (0.18M parameters), for studies that must fit one session of a 2-core
    # CPU: a training step at batch 64 takes ~0.33 s on one thread (fmnist: ~0.74 s on the same machine) and
    # sampling runs at ~740 images per second per UNet call (fmnist: ~220).
    "fmnist-small": dict(unet=dict(block_out_channels=(8, 16, 32), layers_per_block=1, attention_head_dim=16,
                                   down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                                   **dict(_ADM_COMMON, norm_num_groups=4)),
                         scheduler=LINEAR_1000),
    # For tests: the tiny ADM-style UNet the other tests use (a few hundred K parameters).
    "tiny": dict(unet={k: v for k, v in TINY_UNCONDITIONAL_UNET.items()
                       if k not in ("sample_size", "in_channels", "out_channels")},
                 scheduler=LINEAR_1000),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ToolkitError(f"unknown --preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def unet_config(preset: str, channels: int, resolution: int, num_classes: int | None) -> dict[str, Any]:
    return dict(_preset(preset)["unet"], sample_size=resolution, in_channels=channels, out_channels=channels,
                num_class_embeds=num_classes)


def scheduler_config(preset: str) -> dict[str, Any]:
    return dict(_preset(preset)["scheduler"])


def unet_dir(path: Path) -> Path:
    """``path`` itself if it holds a UNet2DModel, or its ``unet/`` (a DDPMPipeline directory)."""
    for candidate in (path, path / "unet"):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "UNet2DModel":
            return candidate
    raise ToolkitError(f"--init {path} holds no diffusers UNet2DModel (config.json with _class_name "
                       "UNet2DModel, directly or under unet/); pass a DDPMPipeline or UNet2DModel directory")


def init_scheduler_config(path: Path) -> dict[str, Any] | None:
    """The scheduler config saved beside an --init UNet (a pipeline directory), if there is one."""
    config = path / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return None
    return {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}


def build_model(config: dict[str, Any], init: Path | None = None) -> torch.nn.Module:
    """A UNet2DModel from ``config``; with ``init``, its weights, after checking every shape."""
    from diffusers import UNet2DModel
    model = UNet2DModel(**config)
    if init is None:
        return model
    source = UNet2DModel.from_pretrained(unet_dir(Path(init)), low_cpu_mem_usage=False)
    check_shapes(model.state_dict(), source.state_dict(), init)
    model.load_state_dict(source.state_dict())
    return model


def check_shapes(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source) -> None:
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    wrong = [f"{k}: {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in given and given[k].shape != v.shape]
    if not (missing or extra or wrong):
        return
    details = "; ".join(filter(None, [
        f"{len(wrong)} shape mismatches (e.g. {', '.join(wrong[:3])})" if wrong else "",
        f"{len(missing)} missing weights (e.g. {', '.join(missing[:3])})" if missing else "",
        f"{len(extra)} unexpected weights (e.g. {', '.join(extra[:3])})" if extra else ""]))
    raise ToolkitError(f"--init {source} does not fit the chosen model (checkpoint vs preset + data: {details}); "
                       "pick the --preset it was trained with, or leave --preset out to use the checkpoint's own "
                       "config, and check --resolution and --class-cond")
