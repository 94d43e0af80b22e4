"""``toolkit export``: ONNX export with validation, ``toolkit export validate DIR`` and ``toolkit export triton DIR``.

``toolkit export MODEL --out DIR`` is the group's default command: the group inserts ``run`` when the first
argument is not a subcommand name, so ``toolkit export MODEL``, ``toolkit export --fp16`` and the explicit
``toolkit export run MODEL`` are the same command, and ``toolkit export validate DIR`` is the other one.
(typer cannot give a group both a positional argument and subcommands: the argument would swallow the
subcommand's name.) A model directory literally named ``validate`` or ``run`` needs ``./validate``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from atdiff.runtime.errors import ToolkitError, handles_errors

console = Console(stderr=True)
DEFAULT_COMMAND = "run"


class _DefaultCommandGroup(TyperGroup):
    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        elif not args and _has_default_model():
            args = [DEFAULT_COMMAND]
        return super().parse_args(ctx, args)


def _has_default_model() -> bool:
    from atdiff.runtime.default_model import default_model
    try:
        default_model()
    except ToolkitError:
        return False
    return True


app = typer.Typer(cls=_DefaultCommandGroup, no_args_is_help=True,
                  help="Export a model to ONNX (validated against PyTorch), or re-validate an export. "
                       "'toolkit export MODEL --out DIR' runs the 'run' command.")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ToolkitError(f"{option} takes comma-separated integers like 1,8; got '{text}'") from None


@app.command("run")
@handles_errors
def run(
    model: Optional[str] = typer.Argument(None, help="Diffusers directory (or hub id) (default: bundled model)."),
    out: Optional[Path] = typer.Option(None, help="Export directory (default: exports/<model-name>[-fp16])."),
    fp16: bool = typer.Option(False, "--fp16", help="UNet in float16 (text encoder and VAE decoder stay float32)."),
    opset: int = typer.Option(17, help="ONNX opset."),
    components: Optional[str] = typer.Option(None, help="Comma-separated subset of unet,text_encoder,vae_decoder."),
    batch_sizes: str = typer.Option("1", help="Batch sizes to support, e.g. 1,8 (first = the 'opt' profile)."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's)."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check ORT against PyTorch before writing."),
    seed: int = typer.Option(0, min=0, help="Seed of the sample inputs and the end-to-end images."),
    device: str = typer.Option("auto", help="Device for tracing and validation: auto (CUDA when torch and "
                               "ONNX Runtime can both use a GPU, else CPU; printed) | cpu | cuda | cuda:N."),
    external_data_mb: Optional[float] = typer.Option(
        None, min=0, help="Write a network's weights to model.onnx.data when they exceed this many MB (default and "
        "most: protobuf's 2 GiB limit with headroom, 1932.7)."),
) -> None:
    """Export MODEL's networks to ONNX, validate them, and write DIR atomically with a manifest."""
    from atdiff.export.exporter import ExportSettings, run_export
    from atdiff.export.validate import ExportValidationError
    from atdiff.runtime.default_model import default_model

    model = model or default_model()   # run_export opens it, once (out=None: it names the default --out)
    settings = ExportSettings(model=model, out=out, fp16=fp16, opset=opset, validate=validate, seed=seed,
                              components=tuple(c.strip() for c in components.split(",")) if components else None,
                              batch_sizes=_int_list(batch_sizes, "--batch-sizes"), height=height, width=width,
                              device=device, external_data_bytes=_external_data_bytes(external_data_mb))
    try:
        result = run_export(settings, log=lambda message: console.print(message))
    except ExportValidationError as exc:
        print_report(exc.report)
        raise
    if result.report is not None:
        print_report(result.report)
    files = result.manifest["files"]
    size = sum(f["bytes"] for f in files.values()) / 1e6
    console.print(f"export written to {result.out} ({len(files)} files, {size:.1f} MB, "
                  f"{result.manifest['precision']}{'' if validate else ', NOT validated'})")
    print(result.out)


def _external_data_bytes(megabytes: float | None) -> int:
    from atdiff.export.onnx_export import EXTERNAL_DATA_BYTES
    if megabytes is None:
        return EXTERNAL_DATA_BYTES
    if megabytes * 1e6 > EXTERNAL_DATA_BYTES:
        raise ToolkitError(f"--external-data-mb {megabytes:g} is above protobuf's 2 GiB limit (with headroom: "
                           f"{EXTERNAL_DATA_BYTES / 1e6:.1f}); a network that large must use external data")
    return int(megabytes * 1e6)


@app.command("validate")
@handles_errors
def validate_command(
    export_dir: Path = typer.Argument(..., help="An export directory (has manifest.json)."),
    source: Optional[Path] = typer.Option(None, help="The diffusers directory it came from (default: the manifest's)."),
    seed: int = typer.Option(0, min=0, help="Seed of the sample inputs and the end-to-end images."),
    device: str = typer.Option("auto", help="ONNX Runtime device: auto (CUDA when its CUDA provider is installed, "
                               "else CPU; printed) | cpu | cuda | cuda:N."),
) -> None:
    """Verify the files' hashes, then compare ONNX Runtime with PyTorch per network and end to end."""
    from atdiff.export.validate import validate_export
    from atdiff.runtime.backends.ort_backend import OrtBackend
    device = OrtBackend.resolve_device(device)
    console.print(f"validating on {device} (--device)")
    report = validate_export(export_dir, source=source, seed=seed, device=device)
    print_report(report)
    if not report.passed:
        names = ", ".join(sorted({c.name for c in report.failures()}))
        raise ToolkitError(f"{export_dir} failed validation ({names} out of tolerance); re-export it, "
                           "or without --fp16")
    console.print(f"{export_dir}: all {len(report.checks)} checks passed")


@app.command("triton")
@handles_errors
def triton_command(
    export_dir: Path = typer.Argument(..., help="An export directory (has manifest.json)."),
    out: Path = typer.Option(..., help="Where to write the Triton model repository."),
    kind: str = typer.Option("gpu", help="Where Triton runs the network models: gpu | cpu (instance_group kind)."),
    max_batch_size: int = typer.Option(8, help="max_batch_size of the networks Triton can batch (text encoder, VAE)."),
) -> None:
    """Write a Triton Inference Server model repository: one ONNX model per network and a Python-backend
    'pipeline' model running the toolkit's sampling loop over them (docs/serving.md)."""
    from atdiff.export.triton import write_repository
    repo = write_repository(export_dir, out, kind=kind, max_batch_size=max_batch_size)
    console.print(f"Triton repository written to {repo}: tritonserver --model-repository={repo.resolve()} "
                  f"(see {repo / 'README.md'})")


def print_report(report) -> None:
    table = Table(title="ONNX Runtime vs PyTorch")
    for column in ("check", "case", "max abs diff", "score", "limit", "result"):
        table.add_column(column)
    for check in report.checks:
        table.add_row(check.name, check.case, f"{check.max_abs:.3g}", check.score, check.limit,
                      "[green]pass[/green]" if check.passed else "[red]FAIL[/red]")
    console = Console()
    console.print(table)
    for note in report.notes:
        console.print(f"note: {escape(note)}")
