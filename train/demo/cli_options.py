"""Options and the closing line shared by the small training commands (classifier, vae, teacher): declared once."""
from __future__ import annotations

import typer

SEED = typer.Option(0, help="Seeds the init, data order and every random draw of training.")
SAVE_EVERY = typer.Option(500, help="Steps between checkpoints.")
RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint.")
DEVICE = typer.Option("auto", help="auto | cpu | cuda (cuda without a GPU is an error).")


def report(result, what: str) -> None:
    """The command's last line: where the trained model went, or how to continue an interrupted run."""
    if result.model_dir is None:
        typer.echo(f"stopped at step {result.step}: checkpoint saved; continue with the same command and --resume")
    else:
        typer.echo(f"trained {result.step} steps; {what}: {result.model_dir}")
