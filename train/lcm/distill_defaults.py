"""Defaults of ``toolkit train lcm`` / ``lcm-at`` that depend on the teacher.

Typed with no options at all, ``toolkit train lcm-at`` distils the bundled demo teacher (models/default-teacher)
on the captioned subset bundled beside it, into ``runs/lcm-at``, within minutes on a CPU. Those settings are the
wrong ones for Stable Diffusion (a from-scratch 2M-parameter teacher wants lr 1e-4 and w in [1, 3]; diffusers'
SD recipe is lr 1e-6 and w in [5, 15]), so they are not global defaults: a teacher carries its own recipe in
``toolkit.json`` under "distillation" (paths in it are relative to the teacher), and a teacher without one
gets diffusers' SD recipe. An option given on the command line always wins.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from atdiff.runtime.default_model import BUNDLED_TEACHER
from atdiff.runtime.errors import ToolkitError

# diffusers' train_lcm_distill_sd_wds.py recipe (README: full LCD of SD 1.5) for a teacher without its own.
SD_RECIPE = dict(max_steps=1000, batch_size=8, lr=1e-6, w_min=5.0, w_max=15.0)
RECIPE_KEYS = (*SD_RECIPE, "data")


def teacher_recipe(teacher: str) -> dict:
    """The teacher's "distillation" section of toolkit.json (data resolved against the teacher), or {}."""
    path = Path(teacher).expanduser() / "toolkit.json"
    if not path.is_file():
        return {}
    try:
        recipe = json.loads(path.read_text()).get("distillation", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ToolkitError(f"{path} is not a valid toolkit.json ({exc}); fix or delete it") from None
    unknown = set(recipe) - set(RECIPE_KEYS)
    if unknown:
        raise ToolkitError(f"{path}: unknown distillation settings {sorted(unknown)}; known: {list(RECIPE_KEYS)}")
    if "data" in recipe:
        recipe["data"] = str((path.parent / recipe["data"]).resolve())
    return recipe


def resolve(opts, command: str):
    """``opts`` (a DistillOptions) with every option left at None filled in: teacher, data, out, and the recipe."""
    teacher = opts.teacher or _bundled_teacher()
    recipe = {**SD_RECIPE, **teacher_recipe(teacher)}
    filled = {key: recipe[key] for key in SD_RECIPE if getattr(opts, key) is None}
    data = opts.data or recipe.get("data")
    if data is None:
        raise ToolkitError(f"no --data given and the teacher {teacher} names no training data; pass --data "
                           "(image-caption shards or a folder with metadata.jsonl; 'toolkit train captions' "
                           "makes captioned Fashion-MNIST offline)")
    return dataclasses.replace(opts, teacher=str(teacher), data=str(data), out=opts.out or Path("runs") / command,
                               **filled)


def _bundled_teacher() -> Path:
    if not (BUNDLED_TEACHER / "model_index.json").is_file():
        raise ToolkitError(f"no --teacher given and the bundled teacher {BUNDLED_TEACHER} is missing; pass --teacher "
                           "(a Stable-Diffusion-style diffusers directory or hub id)")
    return BUNDLED_TEACHER
