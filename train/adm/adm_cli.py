"""``toolkit train adm | adm-at | adm-ip``: ADM-style pixel diffusion training, its free adversarial
fine-tuning (the seed paper's Algorithm 1) and the input-perturbation baseline.

The three commands share every option but the objective's own; their signatures are assembled from one
option table (typer reads ``__signature__``), so an option is declared once. ``train/cli.py`` calls
``register(app)``. Multi-GPU: ``accelerate launch -m toolkit train adm-at ...`` (docs/training.md).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from atdiff.runtime.errors import ToolkitError, handles_errors

_P = inspect.Parameter


def _option(name: str, annotation, default, help: str, *decls: str) -> inspect.Parameter:
    return _P(name, _P.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer.Option(*decls, help=help)])


COMMON = [
    _option("data", str, ..., "Training images: mnist, fashion-mnist, an image folder, .npy/.npz, an IDX file, "
            "or a CIFAR-10 python batches folder/archive."),
    _option("out", Path, ..., "Run directory (checkpoints/, metrics.jsonl, model/ = the trained DDPMPipeline)."),
    _option("preset", Optional[str], None,
            "Architecture: cifar10 | imagenet64 | mnist | fmnist | fmnist-small | tiny (default: the --init "
            "checkpoint's config)."),
    _option("init", Optional[Path], None, "Fine-tune from this diffusers UNet2DModel / DDPMPipeline directory."),
    _option("resolution", Optional[int], None, "Center-crop and resize images to NxN (default: the images' own size)."),
    _option("batch_size", int, 128, "Images per step, over all GPUs and --grad-accum micro-batches."),
    _option("lr", float, 1e-4, "AdamW learning rate."),
    _option("max_steps", int, 10000, "Training steps (batches); free AT makes --adv-steps optimizer steps each."),
    _option("ema_decay", float, 0.9999, "EMA decay of the exported weights."),
    _option("ema_warmup", Optional[bool], None, "EMA warm-up min(decay, (1+n)/(10+n)). Default: on when training "
            "from scratch, off with --init (the EMA continues the init weights at a constant --ema-decay).",
            "--ema-warmup/--no-ema-warmup"),
    _option("mixed_precision", str, "no", "no | fp16 | bf16 (fp16 needs a GPU)."),
    _option("device", str, "auto", "auto | cpu | cuda (cuda without a GPU is an error)."),
    _option("seed", int, 0, "Seeds the data order, timesteps, noise and init."),
    _option("save_every", int, 1000, "Steps between checkpoints (0: only at the end or on Ctrl-C)."),
    _option("resume", bool, False, "Continue the run in --out from its latest checkpoint.", "--resume"),
    _option("grad_accum", int, 1, "Micro-batches per step (gradient accumulation)."),
    _option("class_cond", bool, False, "Train a class-conditional model on the data's labels.", "--class-cond"),
    _option("timestep_sampler", str, "uniform", "uniform | loss-second-moment (ADM's importance sampler)."),
    _option("max_grad_norm", float, 0.0, "Clip the gradient norm (0: off, as in ADM)."),
    _option("lr_warmup_steps", int, 0, "Linear LR warm-up, in optimizer steps."),
    _option("export_weights", str, "ema", "Weights written to model/: ema | raw."),
    _option("num_workers", int, 0, "DataLoader worker processes."),
    _option("log_every", int, 10, "Steps between metrics.jsonl lines."),
]
AT_OPTIONS = [
    _option("adv_steps", int, 3, "K: optimizer steps (and delta updates) per batch."),
    _option("adv_lr", float, 0.1, "Step size of delta += adv_lr * g/||g|| (absolute per-sample L2, not scaled "
            "by sqrt(C*H*W); with the defaults it, not the radius, limits delta)."),
    _option("adv_max_norm", float, 0.1, "Radius of the delta ball, times sqrt(C*H*W) (0: unbounded)."),
    _option("adv_target_grad", str, "full", "full: delta ascends the whole loss gradient (Algorithm 1 as written); "
            "detach: no gradient through the target's delta/sqrt(1-abar) (the authors' training script)."),
]
IP_OPTIONS = [_option("ip_gamma", float, 0.15, "Input perturbation strength gamma (x_t sees eps + gamma*xi).")]


def _make_objective(kind: str, levels, sampler, opts: dict, class_cond: bool):
    from atdiff.train.adm.adm_losses import ADMObjective, FreeATObjective, InputPerturbationObjective
    if kind == "adm-at":
        return FreeATObjective(levels, sampler, opts["adv_steps"], opts["adv_lr"], opts["adv_max_norm"], class_cond,
                               opts["adv_target_grad"])
    if kind == "adm-ip":
        return InputPerturbationObjective(levels, sampler, opts["ip_gamma"], class_cond)
    return ADMObjective(levels, sampler, class_cond)


def _model_configs(opts: dict, info) -> tuple[dict, dict]:
    """(UNet2DModel config, scheduler config) from --preset / --init and the data."""
    from atdiff.train.adm import presets
    init = opts["init"]
    if opts["preset"] is None and init is None:
        raise ToolkitError(f"pass --preset ({', '.join(presets.preset_names())}) to train from scratch, "
                           "or --init DIR to fine-tune a saved UNet2DModel")
    if opts["preset"] is not None:
        unet = presets.unet_config(opts["preset"], info.channels, info.resolution, info.num_classes)
    else:
        from diffusers import UNet2DModel
        saved = UNet2DModel.load_config(presets.unet_dir(Path(init)))
        unet = {k: v for k, v in saved.items() if not k.startswith("_")}
        unet.update(sample_size=info.resolution, in_channels=info.channels, out_channels=info.channels,
                    num_class_embeds=info.num_classes)
    # Fine-tuning keeps the checkpoint's noise schedule; a fresh model takes the preset's; a bare
    # UNet2DModel directory (no scheduler/) without --preset gets DDPM's linear 1000-step schedule.
    scheduler = presets.init_scheduler_config(Path(init)) if init else None
    if scheduler is None:
        scheduler = presets.scheduler_config(opts["preset"]) if opts["preset"] else dict(presets.LINEAR_1000)
    return unet, scheduler


def _export_pipeline(scheduler_config: dict, record: dict):
    """The trainer's export hook: a DDPMPipeline directory plus training.json (config, versions, hashes)."""
    def export(model, out_dir: Path) -> None:
        from diffusers import DDPMPipeline, DDPMScheduler

        from atdiff.runtime.provenance import files_sha256
        DDPMPipeline(unet=model, scheduler=DDPMScheduler.from_config(scheduler_config)).save_pretrained(out_dir)
        (out_dir / "training.json").write_text(json.dumps({**record, "files_sha256": files_sha256(out_dir)}, indent=2))
    return export


def train_adm(kind: str, **opts: Any):
    """Run one ADM training command; returns the trainer's ``TrainResult``. ``kind``: adm | adm-at | adm-ip."""
    import torch

    from atdiff.train.adm.adm_losses import NoiseLevels
    from atdiff.train.core.image_data import load_image_dataset
    from atdiff.train.adm.presets import build_model
    from atdiff.runtime.provenance import versions
    from atdiff.train.adm.timestep_sampler import make_timestep_sampler
    from atdiff.train.core.trainer import Trainer, TrainerConfig

    if opts["export_weights"] not in ("ema", "raw"):
        raise ToolkitError(f"unknown --export-weights {opts['export_weights']!r}; use ema or raw")
    dataset = load_image_dataset(opts["data"], opts["resolution"], opts["class_cond"])
    unet_config, scheduler_config = _model_configs(opts, dataset.info)
    levels = NoiseLevels(scheduler_config)
    sampler = make_timestep_sampler(opts["timestep_sampler"], levels.num_timesteps)
    objective = _make_objective(kind, levels, sampler, opts, opts["class_cond"])
    ema_warmup = opts["init"] is None if opts.get("ema_warmup") is None else opts["ema_warmup"]
    torch.manual_seed(opts["seed"])  # the fresh weights' init is part of what --seed fixes
    model = build_model(unet_config, opts["init"])  # shape errors surface here, before training
    record = {"command": f"toolkit train {kind}",
              "options": {**{k: _jsonable(v) for k, v in opts.items()}, "ema_warmup": ema_warmup},
              "data": dataset.info.to_json(), "unet_config": unet_config, "scheduler_config": scheduler_config,
              "versions": versions("train")}
    config = TrainerConfig(
        run_dir=Path(opts["out"]), max_steps=opts["max_steps"], batch_size=opts["batch_size"], lr=opts["lr"],
        lr_warmup_steps=opts["lr_warmup_steps"], grad_accum=opts["grad_accum"],
        max_grad_norm=opts["max_grad_norm"] or None, ema_decay=opts["ema_decay"], ema_warmup=ema_warmup,
        mixed_precision=opts["mixed_precision"], device=opts["device"], seed=opts["seed"],
        save_every=opts["save_every"], resume=opts["resume"], num_workers=opts["num_workers"],
        log_every=opts["log_every"],
        export_weights=opts["export_weights"], progress=opts.get("progress", True), command_config=record)
    return Trainer(config).fit(model, dataset, objective, export=_export_pipeline(scheduler_config, record))


def _jsonable(value):
    return str(value) if isinstance(value, Path) else value


def _command(kind: str, extra: list[inspect.Parameter], doc: str):
    def command(**opts: Any) -> None:
        from accelerate import PartialState
        result = train_adm(kind, **opts)
        if not PartialState().is_main_process:  # under accelerate launch / torchrun: report once
            return
        if result.interrupted:
            typer.echo(f"interrupted at step {result.step}: checkpoint saved in {result.run_dir / 'checkpoints'}; "
                       "continue with the same command and --resume")
        else:
            typer.echo(f"trained {result.step} steps ({result.optimizer_steps} optimizer steps); "
                       f"model: {result.model_dir}")
    command.__signature__ = inspect.Signature(COMMON + extra)
    command.__doc__ = doc
    command.__name__ = kind.replace("-", "_")
    return handles_errors(command)


def register(app: typer.Typer) -> None:
    """Add ``adm``, ``adm-at`` and ``adm-ip`` to the ``toolkit train`` group."""
    app.command("adm")(_command("adm", [], "Train or fine-tune an ADM-style pixel UNet (plain DDPM loss)."))
    app.command("adm-at")(_command("adm-at", AT_OPTIONS,
                                   "Adversarially fine-tune an ADM UNet with free AT (the paper's Algorithm 1)."))
    app.command("adm-ip")(_command("adm-ip", IP_OPTIONS,
                                   "Train an ADM UNet with input perturbation (ADM-IP baseline)."))
