"""The training loop shared by every ``toolkit train`` command (ADM, ADM-AT, ADM-IP, LCM, LCM-AT).

API (nothing in here knows about diffusion; objectives bring the maths)::

    from atdiff.train.core.trainer import Trainer, TrainerConfig, StepContext

    class MyObjective:
        optimizer_steps_per_batch = 1          # K for free AT (ctx.update calls per step)
        def __call__(self, ctx: StepContext, micro_batches: list) -> dict[str, float]:
            loss = ctx.update(micro_batches, lambda i, mb: my_loss(ctx.model, mb, ctx.generator))
            return {"loss": loss}
        # optional: state_dict() / load_state_dict() -> saved in checkpoints (e.g. a timestep sampler)

    cfg = TrainerConfig(run_dir=Path("runs/x"), max_steps=1000, batch_size=128, lr=1e-4, seed=0)
    result = Trainer(cfg).fit(model, dataset, MyObjective(), export=save_pipeline)
    # export(model_with_ema_weights, tmp_dir) writes the final artifact; the trainer moves
    # tmp_dir to run_dir/model atomically. result.model_dir, result.step, result.interrupted.

- One *step* is one global batch of ``batch_size`` samples (over all processes and ``grad_accum``
  micro-batches). The objective is called once per step with this process's micro-batches
  (collated by the DataLoader, tensors moved to the device) and decides how many optimizer steps
  to make: ``ctx.update`` is one optimizer step (backward over the micro-batches, unscale + clip,
  optimizer.step, LR scheduler, EMA update, zero_grad); free AT calls it K times on the same batch.
- ``ctx.generator``: a torch.Generator on the device seeded from (seed, step, rank): draw t and the
  noise from it, so a step's randomness does not depend on what ran before it (exact resume).
- Devices: ``device`` auto|cpu|cuda (cuda without a GPU is a ToolkitError), ``mixed_precision``
  no|fp16|bf16 through accelerate. Multi-GPU: ``accelerate launch -m toolkit train adm ...``.
- Run directory: ``toolkit-run.json`` (the marker: this trainer made it; train/core/run_dir.py),
  ``config.json``, ``metrics.jsonl`` (+ ``tensorboard/``), ``.lock`` while running,
  ``checkpoints/step-N/`` (accelerate ``save_state`` + ``trainer_object_N.pt`` (train/core/trainer_state.py) +
  ``trainer_state.json``, written into ``.step-N.tmp`` and renamed); ``model/``, the final export.
- ``run_dir`` must be new, empty, or a run this trainer made (``check_run_dir``): anything else is refused
  before a file is written, so a mistyped --out never loses someone's config.json, model/ or metrics.jsonl.
- ``resume=True`` continues from the latest checkpoint bitwise (same data order, RNG, optimizer); a
  different seed, batch_size or grad_accum than the checkpoint's is a ToolkitError (``max_steps`` may grow).
  SIGINT (Ctrl-C) finishes the current step, saves a checkpoint and returns ``interrupted=True``.
- The first line printed (``Trainer.describe()``) says what runs the training: device, processes, precision.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.faults import fault_point
from atdiff.runtime.staging import swap_in as _replace_dir  # move aside, rename, delete; restores on failure
from atdiff.train.core.batch_order import StepBatchSampler, derive_seed, to_device
from atdiff.train.core.run_dir import CHECKPOINTS, CONFIG_FILE, check_run_dir, claim_run_dir, latest_checkpoint
from atdiff.train.core.run_lock import run_lock
from atdiff.train.core.run_log import MetricsLog, StepProgress, truncate_metrics
from atdiff.train.core.trainer_state import (ConstantDecayEMA, Counters, EMAModel, load_states, migrate_legacy_states,
                                 save_states)

MODEL_DIR = "model"


@dataclass
class TrainerConfig:
    run_dir: Path
    max_steps: int
    batch_size: int                 # global: samples per step over all processes and micro-batches
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0        # counted in optimizer steps
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.9999   # None: no trainer EMA (an objective keeps its own, e.g. LCM's target)
    # True: diffusers' warm-up min(decay, (1+n)/(10+n)), for training from scratch; False: the EMA starts
    # as a copy of the initial weights and decays at ``ema_decay`` from the first update (fine-tuning
    # continues a pre-trained EMA, as the ADM-AT authors do; a warm-up would forget it in ~10 steps).
    ema_warmup: bool = True
    mixed_precision: str = "no"     # no | fp16 | bf16
    device: str = "auto"            # auto | cpu | cuda
    seed: int = 0
    save_every: int = 0             # steps between checkpoints; 0: only at the end / on Ctrl-C
    resume: bool = False
    log_every: int = 10
    num_workers: int = 0
    export_weights: str = "ema"     # ema | raw
    progress: bool = True
    command_config: dict[str, Any] = field(default_factory=dict)  # what the command recorded

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


class Objective(Protocol):
    optimizer_steps_per_batch: int

    def __call__(self, ctx: "StepContext", micro_batches: list) -> dict[str, float]: ...


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    optimizer_steps: int
    interrupted: bool
    model_dir: Path | None


class StepContext:
    """What an objective sees during one step; ``update`` is the one-optimizer-step helper."""

    def __init__(self, trainer: "Trainer", step: int):
        self._trainer = trainer
        self.step = step
        self.accelerator = trainer.accelerator
        self.model = trainer.model
        self.device = trainer.accelerator.device
        self.generator = torch.Generator(self.device).manual_seed(
            derive_seed(trainer.config.seed, step, trainer.accelerator.process_index))

    def update(self, micro_batches: list, loss_fn: Callable[[int, Any], torch.Tensor]) -> float:
        """One optimizer step: ``loss_fn(i, micro_batch)`` -> scalar loss for each micro-batch,
        backward on ``loss / len(micro_batches)`` (gradient sync only on the last one), then unscale
        + clip, optimizer.step, LR scheduler, EMA, zero_grad. Returns the mean loss."""
        acc, n, total = self.accelerator, len(micro_batches), 0.0
        for i, micro_batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == n - 1 else acc.no_sync(self.model)
            with sync:
                loss = loss_fn(i, micro_batch)
                acc.backward(loss / n)
            total += loss.detach().item()
        self._trainer.optimizer_step()
        return total / n


class Trainer:
    def __init__(self, config: TrainerConfig):
        from atdiff.runtime.staging import check_writable
        self.config = config
        self.run_dir = Path(config.run_dir)
        check_writable(self.run_dir, parent=True)  # before any step: a bad --out fails at once
        check_run_dir(self.run_dir, config.resume)  # ... and so does an --out that is not a run of this trainer
        self.optimizer_steps = 0
        self._stop_requested = False

    # ---- setup -------------------------------------------------------------------------------
    def _make_accelerator(self):
        from accelerate import Accelerator
        cfg = self.config
        if cfg.mixed_precision not in ("no", "fp16", "bf16"):
            raise ToolkitError(f"unknown --mixed-precision {cfg.mixed_precision!r}; use no, fp16 or bf16")
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ToolkitError(f"unknown --device {cfg.device!r}; use auto, cpu or cuda")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ToolkitError("--device cuda was asked for but no CUDA GPU is visible; "
                               "use --device cpu (slow) or run on a GPU machine")
        on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        if cfg.mixed_precision == "fp16" and on_cpu:
            raise ToolkitError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
        return Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)

    def _check_config(self, dataset) -> None:
        cfg = self.config
        if cfg.max_steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ToolkitError("--max-steps, --batch-size and --grad-accum must be >= 1")
        parts = cfg.grad_accum * self.accelerator.num_processes
        if cfg.batch_size % parts:
            raise ToolkitError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum x "
                               f"processes = {parts}; pick a multiple of {parts}")
        if len(dataset) == 0:
            raise ToolkitError("the dataset is empty; point --data at a folder/file with samples")

    def _setup(self, model: torch.nn.Module, objective: Objective) -> None:
        from diffusers.optimization import get_scheduler
        cfg = self.config
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The scheduler is NOT passed to prepare(): accelerate would step it once per process.
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # diffusers' EMAModel: a maintained implementation with warmup and state_dict (so
        # accelerate can checkpoint it); shadow params live beside the model on the device.
        self.ema = None
        if cfg.ema_decay is not None:
            ema_class = EMAModel if cfg.ema_warmup else ConstantDecayEMA
            self.ema = ema_class(self.accelerator.unwrap_model(self.model).parameters(), decay=cfg.ema_decay)
            self.ema.to(self.accelerator.device)
        # Checkpointed by train/core/trainer_state.py (safe loading), not accelerate's register_for_checkpointing.
        self._stateful = [self.lr_scheduler, *([self.ema] if self.ema is not None else []), Counters(self)]
        if hasattr(objective, "state_dict") and hasattr(objective, "load_state_dict"):
            self._stateful.append(objective)

    # ---- the optimizer step ------------------------------------------------------------------
    def optimizer_step(self) -> None:
        acc, cfg = self.accelerator, self.config
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: no step, so no schedule/EMA tick
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(acc.unwrap_model(self.model).parameters())
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1

    # ---- checkpoints -------------------------------------------------------------------------
    def latest_checkpoint(self) -> tuple[int, Path] | None:
        return latest_checkpoint(self.run_dir)

    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        final = self.run_dir / CHECKPOINTS / f"step-{step}"
        tmp = final.with_name(f".step-{step}.tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            save_states(self._stateful, tmp)
            state = {"step": step, "optimizer_steps": self.optimizer_steps, "config": self.config.to_json()}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            fault_point("train:checkpoint-staged")
            _replace_dir(tmp, final)
            fault_point("train:after-checkpoint")
        acc.wait_for_everyone()
        return final

    def _resume(self) -> int:
        found = self.latest_checkpoint()
        if found is None:
            return 0  # --resume on a fresh run dir starts from scratch (documented)
        step, path = found
        self._check_resumable(json.loads((path / "trainer_state.json").read_text())["config"])
        if self.accelerator.is_main_process:
            migrate_legacy_states(path)
        self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(path))
        load_states(self._stateful, path)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)  # accelerate loads custom states onto the CPU
        return step

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        """Exact resume replays the data order and noise of (seed, batch size, grad_accum); a change
        there would silently train on a different stream, so it is an error."""
        now = self.config.to_json()
        changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in ("seed", "batch_size", "grad_accum")
                   if saved.get(k) != now[k]]
        if changed:
            raise ToolkitError(f"--resume with different settings than the checkpoint ({', '.join(changed)}); "
                               "rerun with the original values, or use a new --out")

    def describe(self) -> str:
        """What runs the training (printed at the start: nothing falls back silently)."""
        acc = self.accelerator
        where = "cpu" if acc.device.type == "cpu" else f"{acc.device} ({torch.cuda.get_device_name(acc.device)})"
        return (f"training on {where} x {acc.num_processes} process(es), mixed precision "
                f"{self.config.mixed_precision}")

    # ---- loop --------------------------------------------------------------------------------
    def fit(self, model: torch.nn.Module, dataset, objective: Objective,
            export: Callable[[torch.nn.Module, Path], None] | None = None) -> TrainResult:
        """Train (resuming with ``resume``) while holding the run directory's lock; export at the end."""
        self.accelerator = self._make_accelerator()
        self._check_config(dataset)
        if self.accelerator.is_main_process:  # checked again: time passed since __init__ (the others only read)
            claim_run_dir(self.run_dir, self.config.resume)
        with run_lock(self.run_dir, enabled=self.accelerator.is_main_process):
            return self._fit(model, dataset, objective, export)

    def _fit(self, model, dataset, objective: Objective, export) -> TrainResult:
        from accelerate.utils import set_seed
        cfg = self.config
        set_seed(cfg.seed)
        self._setup(model, objective)
        start = self._resume() if cfg.resume else 0
        if self.accelerator.is_main_process:  # a resumed run repeats the steps after its checkpoint; a restarted
            truncate_metrics(self.run_dir, start)   # one (no checkpoint yet) drops the aborted attempt's lines
        if cfg.progress and self.accelerator.is_main_process:
            print(self.describe() + (f", resuming at step {start}" if start else ""), flush=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2))
        loader = self._loader(dataset, start)
        with self._sigint_guard():
            step, interrupted = self._loop(objective, loader, start)
        saved_in_loop = cfg.save_every and step % cfg.save_every == 0 and not interrupted
        if step > start and not saved_in_loop:
            self.save_checkpoint(step)
        model_dir = None if interrupted or export is None else self._export(export)
        return TrainResult(self.run_dir, step, self.optimizer_steps, interrupted, model_dir)

    def _loader(self, dataset, start: int) -> torch.utils.data.DataLoader:
        cfg, acc = self.config, self.accelerator
        sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.grad_accum, acc.num_processes,
                                   acc.process_index, cfg.seed, start, cfg.max_steps)
        # Its own generator: creating the iterator draws a base seed, which must not come from the
        # global RNG (a resumed run creates the iterator at a different point of that stream).
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, start, acc.process_index))
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                           pin_memory=acc.device.type == "cuda", generator=generator)

    def _loop(self, objective: Objective, loader, start: int) -> tuple[int, bool]:
        cfg, acc = self.config, self.accelerator
        batches = iter(loader)
        log = MetricsLog(self.run_dir, enabled=acc.is_main_process)
        step = start
        with StepProgress(start, cfg.max_steps, cfg.progress and acc.is_main_process) as progress:
            def flush() -> None:  # collective (metrics are averaged over processes): every process calls it
                log.flush(step, self._reduce_metrics, lr=self.lr_scheduler.get_last_lr()[0],
                          optimizer_steps=self.optimizer_steps, images_per_s=progress.images_per_s)

            while step < cfg.max_steps:
                micro = [to_device(next(batches), acc.device) for _ in range(cfg.grad_accum)]
                self.model.train()
                metrics = objective(StepContext(self, step), micro)
                step += 1
                log.add(metrics)
                progress.advance(metrics.get("loss"), cfg.batch_size)
                stop = self._should_stop()
                if stop or step % cfg.log_every == 0 or step == cfg.max_steps:
                    flush()
                if stop:
                    log.close()
                    return step, True
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save_checkpoint(step)
        log.close()
        return step, False

    def _reduce_metrics(self, means: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not means:
            return means
        keys = sorted(means)
        values = torch.tensor([means[k] for k in keys], device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    # ---- Ctrl-C ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _sigint_guard(self):
        """First Ctrl-C: finish the step, save, stop. A second one interrupts as usual."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _should_stop(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)  # all stop together

    # ---- export ------------------------------------------------------------------------------
    def _export(self, export: Callable[[torch.nn.Module, Path], None]) -> Path:
        acc = self.accelerator
        final = self.run_dir / MODEL_DIR
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = copy.deepcopy(acc.unwrap_model(self.model)).float().cpu().eval()
            if self.config.export_weights == "ema" and self.ema is not None:
                self.ema.copy_to([p for p in model.parameters()])
            tmp = final.with_name(f".{MODEL_DIR}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            export(model, tmp)
            fault_point("train:model-staged")
            _replace_dir(tmp, final)
        acc.wait_for_everyone()
        return final
