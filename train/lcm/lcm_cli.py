"""``toolkit train lcm`` (latent consistency distillation) and ``toolkit train lcm-at`` (its adversarial
variant). ``register(app)`` adds both commands to the ``toolkit train`` group (train/cli.py).

The run directory (``--out``) gets the trainer's checkpoints, metrics.jsonl and config.json, and ``model/``:
a complete diffusers LatentConsistencyModelPipeline (LCMScheduler, tokenizer, text encoder, VAE, and the
student UNet with the EMA target network's weights, which is what LCM ships) plus ``training.json``.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from atdiff.runtime.errors import ToolkitError, handles_errors


def _option(kind, text: str):
    return Annotated[kind, typer.Option(help=text)]


Teacher = _option(Optional[str], "Text-to-image teacher: a Stable-Diffusion-style diffusers directory or hub id "
                  "(default: the bundled demo teacher, models/default-teacher).")
Data = _option(Optional[str], "Image-caption pairs: a folder with metadata.jsonl (file_name, text) or "
               "webdataset .tar shards (file, folder or glob); default: the data the teacher's toolkit.json names.")
Out = _option(Optional[Path], "Run directory: checkpoints/, metrics.jsonl, model/ (the distilled pipeline); "
              "default: runs/lcm or runs/lcm-at.")
MaxSteps = _option(Optional[int], "Training steps (batches); default: the teacher's recipe (toolkit.json), "
                   "else 1000.")
BatchSize = _option(Optional[int], "Global batch size (over processes and --grad-accum); default: the "
                    "teacher's recipe, else 8.")
Resolution = _option(Optional[int], "Training image size; default: the teacher's native size.")
Lr = _option(Optional[float], "AdamW learning rate; default: the teacher's recipe, else 1e-6 (diffusers' "
             "README recipe for full LCD of SD).")
Device = _option(str, "auto | cpu | cuda (cuda without a GPU is an error).")
Seed = _option(int, "Seed for data order, timesteps, noise, w and delta.")
Resume = _option(bool, "Continue from the latest checkpoint in --out.")
SaveEvery = _option(int, "Steps between checkpoints (0: at the end and on Ctrl-C only).")
MixedPrecision = _option(str, "no | fp16 | bf16 (through accelerate).")
GradAccum = _option(int, "Micro-batches per step.")
Workers = _option(int, "DataLoader worker processes.")
MaxGradNorm = _option(float, "Clip the gradient norm (0: off; diffusers: 1.0).")
Warmup = _option(int, "Linear LR warm-up, in optimizer steps.")
LogEvery = _option(int, "Steps between metrics.jsonl lines.")
WMin = _option(Optional[float], "Smallest CFG weight w (Imagen form, eps_c + w (eps_c - eps_u)); sampled per "
               "sample; default: the teacher's recipe, else 5.")
WMax = _option(Optional[float], "Largest CFG weight w; default: the teacher's recipe, else 15.")
Loss = _option(str, "Consistency distance: l2 | huber (pseudo-Huber).")
HuberC = _option(float, "Pseudo-Huber c.")
EmaDecay = _option(float, "EMA decay of the target network (LCM: 0.95).")
DdimSteps = _option(int, "Teacher DDIM solver grid; skipping interval = T / this.")
TimestepScaling = _option(float, "Boundary scaling factor in c_skip/c_out (LCMScheduler's timestep_scaling).")
WEmbedding = _option(bool, "Give the student LCM's guidance embedding (time_cond_proj_dim).")
ProjDim = _option(int, "time_cond_proj_dim when the teacher has none.")
Student = _option(Optional[str], "Initialise the student from this UNet/pipeline instead of the teacher.")
CacheLatents = _option(Optional[Path], "Pre-compute VAE latents + text embeddings into this dir (reused when it "
                       "matches).")
AdvSteps = _option(int, "K: free-AT inner steps (optimizer steps + delta ascents) per batch.")
AdvLr = _option(float, "Ascent step for delta, per-element RMS in latent units.")
AdvMaxNorm = _option(float, "eta: bound on ||delta||, per-element RMS in latent units.")


def register(app: typer.Typer) -> None:
    app.command("lcm", help="Latent consistency distillation of a text-to-image teacher (LCD).")(lcm)
    app.command("lcm-at", help="Adversarial latent consistency distillation (LCM-AT, free AT).")(lcm_at)


@dataclasses.dataclass
class DistillOptions:
    """Everything ``lcm`` / ``lcm-at`` take; its defaults are the commands' defaults (see ``_signature``)."""
    teacher: str | None = None        # None: resolved by train/lcm/distill_defaults.py
    data: str | None = None
    out: Path | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    resolution: int | None = None
    lr: float | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    save_every: int = 500
    mixed_precision: str = "no"
    grad_accum: int = 1
    num_workers: int = 0
    max_grad_norm: float = 1.0
    lr_warmup_steps: int = 0
    log_every: int = 10
    w_min: float | None = None
    w_max: float | None = None
    loss: str = "l2"
    huber_c: float = 0.001
    ema_decay: float = 0.95
    num_ddim_timesteps: int = 50
    timestep_scaling: float = 10.0
    w_embedding: bool = True
    time_cond_proj_dim: int = 256
    student: str | None = None
    cache_latents: Path | None = None
    progress: bool = True


def _lcm(**options) -> None:
    distill(DistillOptions(**options), adv=None)


def _lcm_at(**options) -> None:
    from atdiff.train.lcm.lcm_losses import AdvSettings
    adv = AdvSettings(steps=options.pop("adv_steps"), lr=options.pop("adv_lr"), max_norm=options.pop("adv_max_norm"))
    distill(DistillOptions(**options), adv=adv)


def _signature(extra: tuple = ()) -> inspect.Signature:
    """The command's typer signature: DistillOptions' fields (their defaults) with the option declarations
    above, plus ``extra`` (name, declaration, default) triples. Typer reads ``__signature__``, so each
    option is declared once for both commands."""
    fields = [(f.name, _OPTIONS[f.name], ... if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(DistillOptions) if f.name in _OPTIONS]
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=annotation)
                              for name, annotation, default in [*fields, *extra]], return_annotation=None)


_OPTIONS = dict(teacher=Teacher, data=Data, out=Out, max_steps=MaxSteps, batch_size=BatchSize, resolution=Resolution,
                lr=Lr, device=Device, seed=Seed, resume=Resume, save_every=SaveEvery, mixed_precision=MixedPrecision,
                grad_accum=GradAccum, num_workers=Workers, max_grad_norm=MaxGradNorm, lr_warmup_steps=Warmup,
                log_every=LogEvery, w_min=WMin, w_max=WMax, loss=Loss, huber_c=HuberC, ema_decay=EmaDecay,
                num_ddim_timesteps=DdimSteps, timestep_scaling=TimestepScaling, w_embedding=WEmbedding,
                time_cond_proj_dim=ProjDim, student=Student, cache_latents=CacheLatents)
_lcm.__signature__ = _signature()
_lcm_at.__signature__ = _signature((("adv_steps", AdvSteps, 2), ("adv_lr", AdvLr, 0.05),
                                    ("adv_max_norm", AdvMaxNorm, 0.05)))
lcm, lcm_at = handles_errors(_lcm), handles_errors(_lcm_at)


def distill(opts: DistillOptions, adv=None):
    """Check everything, load teacher/student/data, train, export. Returns the trainer's TrainResult."""
    import torch

    from atdiff.train.lcm.distill_defaults import resolve
    opts = resolve(opts, "lcm-at" if adv else "lcm")
    _announce(opts, adv)

    from atdiff.train.core.caption_data import find_records
    from atdiff.train.lcm.lcm_losses import ConsistencyDistillation, LCDSettings
    from atdiff.train.lcm.lcm_teacher import DDIMSolver, alphas_cumprod, lcm_scheduler, load_teacher, make_student
    from atdiff.train.core.trainer import Trainer

    settings = LCDSettings(w_min=opts.w_min, w_max=opts.w_max, loss=opts.loss, huber_c=opts.huber_c,
                           ema_decay=opts.ema_decay, timestep_scaling=opts.timestep_scaling)
    settings.check()
    if adv is not None:
        adv.check()
    records = find_records(opts.data)  # cheap checks (captions) before the teacher loads
    teacher = load_teacher(opts.teacher)
    resolution = _resolution(opts.resolution, teacher.spec)
    solver = DDIMSolver(alphas_cumprod(teacher.scheduler_config), opts.num_ddim_timesteps)
    with torch.random.fork_rng():  # the new guidance projection's init depends on --seed only
        torch.manual_seed(opts.seed)
        student = make_student(teacher.unet, w_embedding=opts.w_embedding,
                               time_cond_proj_dim=opts.time_cond_proj_dim, init_from=opts.student)
    scheduler = lcm_scheduler(teacher.scheduler_config, opts.num_ddim_timesteps, opts.timestep_scaling)
    dataset = _dataset(opts, records, teacher, resolution)
    objective = ConsistencyDistillation(teacher, student, solver, scheduler, settings, adv)
    record = {"command": "lcm-at" if adv else "lcm", "options": _jsonable(dataclasses.asdict(opts)),
              "adv": dataclasses.asdict(adv) if adv else None, "resolution": resolution,
              "teacher": str(teacher.path), "num_samples": len(dataset)}

    def export(model, tmp: Path) -> None:
        export_pipeline(model, objective.target, teacher, scheduler, tmp, record)

    result = Trainer(_trainer_config(opts, record)).fit(student, dataset, objective, export=export)
    _report(result)
    return result


def _trainer_config(opts: DistillOptions, record: dict):
    from atdiff.train.core.trainer import TrainerConfig
    return TrainerConfig(run_dir=opts.out, max_steps=opts.max_steps, batch_size=opts.batch_size, lr=opts.lr,
                         grad_accum=opts.grad_accum, ema_decay=None,  # the objective keeps the target EMA itself
                         mixed_precision=opts.mixed_precision, device=opts.device, seed=opts.seed,
                         save_every=opts.save_every, resume=opts.resume, num_workers=opts.num_workers,
                         max_grad_norm=opts.max_grad_norm or None, lr_warmup_steps=opts.lr_warmup_steps,
                         log_every=opts.log_every, export_weights="raw", progress=opts.progress, command_config=record)


def _announce(opts: DistillOptions, adv) -> None:
    from accelerate import PartialState
    if PartialState().is_main_process:
        typer.echo(f"{'lcm-at' if adv else 'lcm'}: teacher {opts.teacher}, data {opts.data}, run {opts.out}; "
                   f"{opts.max_steps} steps x batch {opts.batch_size}, lr {opts.lr}, w in [{opts.w_min}, {opts.w_max}]"
                   + (f", K={adv.steps}" if adv else ""))


def _report(result) -> None:
    from accelerate import PartialState
    if not PartialState().is_main_process:  # under accelerate launch: report once
        return
    if result.model_dir is not None:
        typer.echo(f"distilled pipeline: {result.model_dir} (step {result.step})")
    else:
        typer.echo(f"stopped at step {result.step}; continue with --resume")


def _resolution(resolution: int | None, spec) -> int:
    size = resolution or spec.default_resolution
    if size <= 0 or size % spec.pixel_multiple:
        raise ToolkitError(f"--resolution {size} must be a positive multiple of {spec.pixel_multiple} for this teacher")
    return size


def _dataset(opts: DistillOptions, records: list, teacher, resolution: int):
    from atdiff.train.core.caption_data import CaptionDataset, cache_key, open_or_build_cache
    dataset = CaptionDataset(records, teacher.tokenizer, resolution)
    if opts.cache_latents is None:
        return dataset
    import torch
    from accelerate import PartialState
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or a GPU machine")
    state = PartialState(cpu=opts.device == "cpu")
    vae, text_encoder = teacher.vae.to(state.device), teacher.text_encoder.to(state.device)

    def encode(pixels, ids):
        moments = vae.encode(pixels.to(state.device)).latent_dist.parameters
        return moments, text_encoder(ids.to(state.device))[0]

    key = cache_key(dataset.records, resolution, teacher.path)
    with state.main_process_first():  # the main process builds; the others then open what it wrote
        cached = open_or_build_cache(opts.cache_latents, dataset, key, encode)
    if state.is_main_process:
        typer.echo(f"latent cache: {opts.cache_latents} ({len(cached)} samples, encoded on {state.device})")
    return cached


def export_pipeline(model, target, teacher, scheduler, out: Path, record: dict) -> None:
    """Save the LatentConsistencyModelPipeline with the target network's weights in ``model`` (a CPU
    float32 copy of the student the trainer hands over) and a training record with hashes."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    from atdiff.runtime.provenance import files_sha256, versions
    from atdiff.train.core.run_log import write_generation_defaults

    model.load_state_dict({k: v.detach().cpu().float() for k, v in target.state_dict().items()})
    # diffusers' LCM pipeline always embeds w, so a student without the embedding (--no-w-embedding) is
    # saved as a StableDiffusionPipeline with the LCMScheduler (as LCM-LoRA models are); sample it without CFG.
    cls = LatentConsistencyModelPipeline if model.config.time_cond_proj_dim else StableDiffusionPipeline
    pipe = cls(vae=teacher.vae.cpu(), text_encoder=teacher.text_encoder.cpu(), tokenizer=teacher.tokenizer,
               unet=model, scheduler=scheduler, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.save_pretrained(out)
    if model.config.time_cond_proj_dim:  # sample at the middle of the trained w range (guidance scale = 1 + w)
        options = record["options"]
        write_generation_defaults(out, guidance_scale=1.0 + (options["w_min"] + options["w_max"]) / 2)
    (out / "training.json").write_text(json.dumps({**record, "weights": "ema-target",
                                                   "files_sha256": files_sha256(out, "*.safetensors"),
                                                   "versions": versions("train")}, indent=2))


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
