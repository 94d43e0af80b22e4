"""``toolkit train``: the training command group (mounted by toolkit.py). Each family of objectives adds
its commands from its own module, so ADM and LCM work never edit the same file."""
from __future__ import annotations

import typer

from atdiff.train.adm import adm_cli
from atdiff.train.demo import classifier_cli, clip_cli, fashion_captions, teacher_cli, vae_cli
from atdiff.train.lcm import lcm_cli

app = typer.Typer(help="Train ADM-style UNets (plain / AT / IP) and distill LCMs (plain / AT).",
                  no_args_is_help=True)
adm_cli.register(app)
lcm_cli.register(app)
classifier_cli.register(app)
fashion_captions.register(app)
vae_cli.register(app)
teacher_cli.register(app)
clip_cli.register(app)
