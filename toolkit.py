"""``toolkit``: the command line (typer). ``generate`` and ``doctor`` live here; the ``train``, ``export``
and ``eval`` groups come from each package's own ``cli.py`` and are mounted when present."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from atdiff.runtime.devices import DEVICE_HELP
from atdiff.runtime.errors import handles_errors

app = typer.Typer(help="Train, export, serve and evaluate few-step diffusion models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

_GROUPS = (("train", "atdiff.train.cli"), ("export", "atdiff.export.cli"), ("eval", "atdiff.eval.cli"))


def _mount_groups() -> None:
    for name, module_name in _GROUPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:   # the group has no commands yet: no empty group in --help
                continue
            raise
        app.add_typer(module.app, name=name)


@app.command()
@handles_errors
def generate(
    prompt: Optional[list[str]] = typer.Argument(None, help="Prompt(s); omit for unconditional models."),
    model: Optional[str] = typer.Option(None, help="Diffusers dir, export dir or hub id (default: bundled model)."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: 4 for LCM, else 20)."),
    nfe: Optional[int] = typer.Option(None, help="Another name for --steps (one network evaluation per step)."),
    sampler: Optional[str] = typer.Option(None, help="lcm | ddim | dpmpp_2m | iddpm (default: from the scheduler)."),
    seed: int = typer.Option(0, help="Image i gets seed+i."),
    num_images: int = typer.Option(1, help="Images per prompt (or in total, for unconditional models)."),
    guidance_scale: Optional[float] = typer.Option(None, help="w for LCM's embedding, or the CFG scale."),
    negative_prompt: Optional[str] = typer.Option(None, help="CFG negative prompt (non-LCM models)."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's)."),
    class_label: Optional[list[int]] = typer.Option(None, help="Class label(s) for class-conditional models."),
    eps_scale: Optional[float] = typer.Option(None, help="Epsilon scaling (ES), e.g. 1.017."),
    eta: Optional[float] = typer.Option(None, help="DDIM eta (0: deterministic)."),
    sampler_option: Optional[list[str]] = typer.Option(
        None, help="KEY=VALUE passed to the sampler, e.g. use_clipped_model_output=true (DDIM: eps re-derived from "
                   "the clipped x0, as guided-diffusion), spacing=linspace. Repeatable."),
    batch_size: Optional[int] = typer.Option(None, help="Images per network batch (default: up to 8)."),
    backend: str = typer.Option("torch", help="torch | onnxruntime (tensorrt: planned)"),
    backend_option: Optional[list[str]] = typer.Option(
        None, help="KEY=VALUE passed to the backend, e.g. channels_last=true, compile=true (torch), "
                   "cuda_graph=true, intra_op_threads=4 (onnxruntime). Repeatable."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | float32 | float16 | bfloat16"),
    out: Path = typer.Option(Path("outputs"), help="Directory for the PNGs (NAME-seedN.png; an existing file is "
                                                   "never overwritten: the new image gets NAME-seedN-1.png, -2, ...), "
                                                   "or a new FILE.png for one image."),
) -> None:
    """Generate images and write them as PNGs (with their generation record in the PNG metadata)."""
    from atdiff.runtime.cli_generate import one_step_count, run_generate, sampler_options
    from atdiff.runtime.generation import GenerationOptions
    labels = (class_label[0] if len(class_label) == 1 else class_label) if class_label else None
    options = GenerationOptions(
        prompts=prompt or None, num_images=num_images, steps=one_step_count(steps, nfe), seed=seed, sampler=sampler,
        guidance_scale=guidance_scale, negative_prompt=negative_prompt, height=height, width=width,
        class_labels=labels, eps_scale=eps_scale, batch_size=batch_size,
        sampler_options=sampler_options(sampler_option, eta))
    run_generate(options, model=model, backend=backend, backend_option=backend_option, device=device, dtype=dtype,
                 out=out)


def _mount_serve() -> None:
    from atdiff.runtime.serve.cli import serve
    app.command("serve")(handles_errors(serve))


_mount_serve()


@app.command()
def doctor() -> None:
    """What is installed and usable: torch + CUDA, ONNX Runtime providers, TensorRT, the GPU."""
    from atdiff.runtime.doctor import report
    report()


_mount_groups()

bench = typer.Typer(help="Benchmarks: results go to JSON files and docs, never to timed assertions in tests.",
                    no_args_is_help=True)
app.add_typer(bench, name="bench")


def _mount_benchmarks() -> None:
    # Each benchmark lives beside the code it measures; their modules import torch only when they run.
    from atdiff.export import bench_ort
    from atdiff.train.adm import bench_adm_at
    bench.command("ort")(handles_errors(bench_ort.command))
    bench.command("adm-at")(handles_errors(bench_adm_at.command))
    from atdiff.runtime.serve import bench as bench_serve
    bench.command("serve")(handles_errors(bench_serve.command))
    from atdiff.export.sd15 import fixture as sd15_fixture, measure as sd15_measure
    bench.command("sd15-fixture")(handles_errors(sd15_fixture.command))
    bench.command("sd15")(handles_errors(sd15_measure.command))


_mount_benchmarks()


def main() -> None:
    app(prog_name="toolkit")


if __name__ == "__main__":
    main()
