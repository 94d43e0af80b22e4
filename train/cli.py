"""``toolkit train``: the training command group (mounted by toolkit.py). Each family of objectives adds
its commands from its own module, so ADM and LCM work never edit the same file."""
from __future__ import annotations

import typer

from train import adm_cli, classifier_cli, clip_cli, fashion_captions, lcm_cli, teacher_cli, vae_cli

app = typer.Typer(help="Train ADM-style UNets (plain / AT / IP) and distill LCMs (plain / AT).",
                  no_args_is_help=True)
adm_cli.register(app)
lcm_cli.register(app)
classifier_cli.register(app)
fashion_captions.register(app)
vae_cli.register(app)
teacher_cli.register(app)
clip_cli.register(app)
