"""train/lcm/distill_defaults.py: what `toolkit train lcm / lcm-at` use for the options left out."""
import json
from pathlib import Path

import pytest

from atdiff.runtime.errors import ToolkitError
from atdiff.train.lcm.distill_defaults import SD_RECIPE, resolve
from atdiff.train.lcm.lcm_cli import DistillOptions


def _teacher(tmp_path: Path, recipe: dict | None) -> Path:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model_index.json").write_text("{}")
    if recipe is not None:
        (teacher / "toolkit.json").write_text(json.dumps({"distillation": recipe}))
    return teacher


def test_a_teacher_without_a_recipe_gets_the_sd_recipe_and_needs_data(tmp_path):
    teacher = _teacher(tmp_path, None)
    with pytest.raises(ToolkitError, match="--data"):
        resolve(DistillOptions(teacher=str(teacher)), "lcm")
    opts = resolve(DistillOptions(teacher=str(teacher), data="shards/"), "lcm-at")
    assert {k: getattr(opts, k) for k in SD_RECIPE} == SD_RECIPE
    assert opts.out == Path("runs/lcm-at")


def test_the_teachers_recipe_fills_what_the_command_line_left_out(tmp_path):
    teacher = _teacher(tmp_path, {"lr": 1e-4, "w_min": 1.0, "w_max": 3.0, "max_steps": 300, "data": "../data"})
    opts = resolve(DistillOptions(teacher=str(teacher), max_steps=7, out=tmp_path / "run"), "lcm")
    assert (opts.lr, opts.w_min, opts.w_max, opts.max_steps) == (1e-4, 1.0, 3.0, 7)   # --max-steps wins
    assert opts.batch_size == SD_RECIPE["batch_size"]                                  # not in the recipe
    assert Path(opts.data) == (tmp_path / "data").resolve() and opts.out == tmp_path / "run"


def test_an_unknown_recipe_setting_is_an_error_naming_it(tmp_path):
    teacher = _teacher(tmp_path, {"learning_rate": 1e-4})
    with pytest.raises(ToolkitError, match="learning_rate"):
        resolve(DistillOptions(teacher=str(teacher), data="x"), "lcm")
