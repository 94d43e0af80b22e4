"""Measure what free AT costs: one ADM-AT outer step (K inner steps) against K plain ADM steps, both
through the real Trainer (forward, backward, AdamW, EMA), on random data of the preset's shape.

    toolkit bench adm-at --preset mnist --batch-size 32 --device cpu --out bench/adm-at-mnist.json

Prints one JSON line (and writes it to ``--out``): median seconds per plain step and per AT outer step, by wall clock and by this
process's CPU time, and ``ratio = at_step / (K * plain_step)`` for each (about 1 means the K inner steps
cost K plain steps, not 2K). On a GPU read the wall-clock ratio; on a shared CPU the CPU-time one.
Plain and AT runs alternate ``--rounds`` times so a machine's background load hits both alike; on CPU
it runs one torch thread by default (multi-threaded kernels slow down erratically on a loaded machine).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from atdiff.runtime.staging import write_json
from atdiff.runtime.provenance import versions


class _Timed:
    """Wraps an objective and records each step's wall time and this process's CPU time (on a shared
    machine the CPU time is the stable measure; on a GPU the wall time is what counts)."""

    def __init__(self, objective):
        self.objective, self.times, self.cpu_times, self.device = objective, [], [], None
        self.optimizer_steps_per_batch = objective.optimizer_steps_per_batch

    def __call__(self, ctx, micro_batches):
        import torch
        self.device = str(ctx.device)   # what --device auto became
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = self.objective(ctx, micro_batches)  # ctx.update returns .item(): the step has finished
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu_start)
        return metrics


def _run(kind: str, steps: int, preset: str, batch_size: int, device: str, adv_steps: int,
         run_dir: Path, seed: int) -> tuple[list[tuple[float, float]], str]:
    import torch
    from accelerate.state import AcceleratorState, GradientState
    from atdiff.train.adm.adm_losses import ADMObjective, FreeATObjective, NoiseLevels
    from atdiff.train.adm.presets import build_model, scheduler_config, unet_config
    from atdiff.train.adm.timestep_sampler import UniformSampler
    from atdiff.train.core.trainer import Trainer, TrainerConfig

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run in this process
    GradientState._reset_state()
    channels, resolution = (1, 28) if preset == "mnist" else (3, {"tiny": 16, "cifar10": 32}.get(preset, 64))
    generator = torch.Generator().manual_seed(seed)
    data = [{"x": x} for x in torch.rand(max(batch_size, 64), channels, resolution, resolution,
                                         generator=generator) * 2 - 1]
    levels = NoiseLevels(scheduler_config(preset))
    objective = (FreeATObjective(levels, UniformSampler(levels.num_timesteps), adv_steps=adv_steps)
                 if kind == "at" else ADMObjective(levels, UniformSampler(levels.num_timesteps)))
    timed = _Timed(objective)
    torch.manual_seed(seed)
    model = build_model(unet_config(preset, channels, resolution, None))
    config = TrainerConfig(run_dir=run_dir, max_steps=steps, batch_size=batch_size, device=device, progress=False,
                           seed=seed,
                           save_every=0, max_grad_norm=None)
    Trainer(config).fit(model, data, timed)
    return list(zip(timed.times, timed.cpu_times))[1:], timed.device  # step 1 pays one-off allocation costs


def run(preset: str = "mnist", batch_size: int = 32, device: str = "auto", adv_steps: int = 3,
        outer_steps: int = 4, rounds: int = 2, threads: int = 1, seed: int = 0) -> dict:
    """Median seconds per plain step and per AT outer step (wall and CPU) and their ratios."""
    import torch  # here, not at module level: `toolkit --help` should not pay for importing torch
    if threads:
        torch.set_num_threads(threads)
    plain, at = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            times, used = _run("plain", adv_steps * outer_steps + 1, preset, batch_size, device, adv_steps,
                               Path(tmp) / f"plain{r}", seed)
            plain += times
            times, used = _run("at", outer_steps + 1, preset, batch_size, device, adv_steps, Path(tmp) / f"at{r}", seed)
            at += times
    result = {"preset": preset, "batch_size": batch_size, "device": used, "K": adv_steps, "seed": seed,
              "torch_threads": torch.get_num_threads(), "plain_steps": len(plain), "at_outer_steps": len(at)}
    for i, clock in enumerate(("wall", "cpu")):
        plain_s, at_s = statistics.median(p[i] for p in plain), statistics.median(a[i] for a in at)
        result.update({f"plain_step_{clock}_s": round(plain_s, 4), f"at_outer_step_{clock}_s": round(at_s, 4),
                       f"ratio_{clock}": round(at_s / (adv_steps * plain_s), 3)})
    return result


def command(preset: str = typer.Option("mnist", help="Model preset: tiny | fmnist | mnist | cifar10 | imagenet64."),
            batch_size: int = typer.Option(32, help="Images per step."),
            device: str = typer.Option("auto", help="auto (CUDA when torch sees a GPU, else CPU; the device used is "
                                       "in the result) | cpu | cuda (the trainer's --device)."),
            adv_steps: int = typer.Option(3, help="K."),
            outer_steps: int = typer.Option(4, help="AT outer steps per round (plain runs K times as many)."),
            rounds: int = typer.Option(2, help="Alternating plain / AT rounds."),
            threads: int = typer.Option(1, help="torch CPU threads (0: torch's default). One thread keeps "
                                        "CPU timings stable on a shared machine."),
            seed: int = typer.Option(0, min=0, help="Seed of the random weights and data."),
            out: Optional[Path] = typer.Option(None, help="Also write the result to this JSON file.")) -> None:
    """What free AT costs: one ADM-AT outer step (K inner steps) against K plain ADM steps."""
    result = {**run(preset, batch_size, device, adv_steps, outer_steps, rounds, threads, seed),
              "versions": versions("train")}
    print(json.dumps(result))
    if out is not None:
        write_json(out, result)


if __name__ == "__main__":
    typer.run(command)
