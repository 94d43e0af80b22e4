"""Where ``--model`` points when it is left out: ``$TOOLKIT_MODEL`` if set, else the bundled demo model
(``models/default`` next to the package: models/default/README.md is its card). Where it is missing (a copy
without models/), leaving out ``--model`` is an error that says how to get a model."""
from __future__ import annotations

import os
from pathlib import Path

from atdiff.runtime.errors import ToolkitError

ENV_VAR = "TOOLKIT_MODEL"
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "default"
BUNDLED_TEACHER = BUNDLED.parent / "default-teacher"   # what 'toolkit train lcm-at' distils by default


def default_model() -> str:
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    if BUNDLED.is_dir():
        return str(BUNDLED)
    raise ToolkitError(
        f"no model given and the bundled default model {BUNDLED} is missing; pass one (--model DIR; for 'toolkit export', "
        "the MODEL argument: a diffusers or export directory, or a hub id), set $TOOLKIT_MODEL, or make a "
        "tiny random one with "
        "'python -m tools.make_tiny_model models/tiny-lcm'")
