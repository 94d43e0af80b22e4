"""Make a tiny random-weight model directory (offline, seconds on a CPU) to try the toolkit with.

    python -m tools.make_tiny_model models/tiny-lcm                 # LCM text-to-image pipeline
    python -m tools.make_tiny_model models/tiny-sd --kind sd        # SD-style teacher (CFG, DDIM)
    python -m tools.make_tiny_model models/tiny-adm --kind unconditional

Its weights are random, so its images are noise: it exercises every code path, not image quality.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import typer

from atdiff.runtime.errors import handles_errors
from atdiff.train.core.tiny_models import build_tiny_text_to_image, build_tiny_unconditional

KINDS = {"lcm": lambda d, s: build_tiny_text_to_image(d, seed=s, lcm=True),
         "sd": lambda d, s: build_tiny_text_to_image(d, seed=s, lcm=False),
         "unconditional": lambda d, s: build_tiny_unconditional(d, seed=s)}


@handles_errors
def main(out: Path = typer.Argument(..., help="Directory to write (must be new or empty; see --force)."),
         kind: str = typer.Option("lcm", help="lcm | sd | unconditional"),
         seed: int = typer.Option(0, help="Seed of the random weights."),
         force: bool = typer.Option(False, "--force", help="Replace OUT even if it is a non-empty directory.")) -> None:
    from atdiff.runtime.errors import ToolkitError
    if kind not in KINDS:
        raise ToolkitError(f"unknown kind '{kind}'; choose one of {', '.join(KINDS)}")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ToolkitError(f"{out} exists and is not empty; choose another directory, or pass --force to replace it "
                           "(everything in it is deleted)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    KINDS[kind](tmp, seed)
    # Move into place only once complete, so a crash never leaves a half-written model at `out`.
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    typer.run(main)
