"""A model's own generation defaults (toolkit.json, written by `toolkit train lcm / teacher`): the runtime samples it
at its own guidance scale unless one is given, the export carries it, and a bad file is a clear error."""
import json
import shutil

import numpy as np
import pytest

from atdiff.runtime import Pipeline
from atdiff.runtime.model_spec import ModelFormatError, ModelSpec


@pytest.fixture
def lcm_with_defaults(tiny_lcm_dir, tmp_path):
    model = tmp_path / "lcm"
    shutil.copytree(tiny_lcm_dir, model)
    (model / "toolkit.json").write_text(json.dumps({"generation": {"guidance_scale": 3.0}}))
    return model


def test_the_models_guidance_scale_is_the_default_and_an_explicit_one_wins(lcm_with_defaults, tiny_lcm_dir):
    assert ModelSpec.from_diffusers_dir(tiny_lcm_dir).default_guidance_scale is None
    with Pipeline.load(str(lcm_with_defaults), backend="torch", device="cpu") as pipe:
        default = pipe(["a red cube"], steps=2, seed=0)
        explicit = pipe(["a red cube"], steps=2, seed=0, guidance_scale=3.0)
        other = pipe(["a red cube"], steps=2, seed=0, guidance_scale=8.5)
    assert default.request["guidance_scale"] == 3.0 and other.request["guidance_scale"] == 8.5
    np.testing.assert_array_equal(default.arrays, explicit.arrays)
    assert not np.array_equal(default.arrays, other.arrays)


@pytest.mark.parametrize("value", ["high", -1])
def test_a_bad_default_guidance_is_an_error_naming_the_file(lcm_with_defaults, value):
    (lcm_with_defaults / "toolkit.json").write_text(json.dumps({"generation": {"guidance_scale": value}}))
    with pytest.raises(ModelFormatError, match="toolkit.json"):
        ModelSpec.from_diffusers_dir(lcm_with_defaults)
