"""A truncated or corrupt weights file is one `error:` line naming the file, exit 2, wherever weights are read
(issue 12 item 4): generate, export, train --init and eval, for the UNet (diffusers) and the text encoder
(transformers)."""
from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from atdiff.runtime.errors import ToolkitError, unreadable_weights


def truncated_copy(source, target, part: str):
    shutil.copytree(source, target)
    weights = next((target / part).glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return target, weights


@pytest.fixture
def run():
    from toolkit import app
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def one_error_line(result, weights) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(weights.name) in errors[0] and "truncated or corrupt" in errors[0]
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_generate_and_export_name_the_unreadable_file(tiny_lcm_dir, tmp_path, run, part):
    model, weights = truncated_copy(tiny_lcm_dir, tmp_path / "model", part)
    one_error_line(run("generate", "x", "--model", model, "--steps", "1", "--device", "cpu", "--out", tmp_path / "o"),
                   weights)
    one_error_line(run("export", model, "--out", tmp_path / "export"), weights)
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))


def test_train_init_and_eval_name_the_unreadable_file(tiny_uncond_dir, tmp_path, run):
    import numpy as np
    model, weights = truncated_copy(tiny_uncond_dir, tmp_path / "model", "unet")
    data = tmp_path / "toy.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    one_error_line(run("train", "adm", "--data", data, "--init", model, "--out", tmp_path / "run", "--max-steps", "1",
                       "--batch-size", "4", "--device", "cpu"), weights)
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))
    one_error_line(run("eval", "sample-fid", model, "--ref", stats, "--nfe", "1", "--num", "2", "--device", "cpu"),
                   weights)


def test_other_errors_are_not_mistaken_for_unreadable_weights():
    assert unreadable_weights(OSError("disk full")) is None
    converted = unreadable_weights(ValueError("Unable to load weights from checkpoint file for 'a/b.safetensors'"))
    assert converted.args[0].startswith("cannot read weights file a/b.safetensors")
    assert isinstance(unreadable_weights(OSError("Error while deserializing header: HeaderTooLarge")), ToolkitError)


def test_a_checkpoint_missing_weights_is_refused_not_run_at_random(tiny_lcm_dir, tmp_path, run):
    # transformers and diffusers start a missing weight at random with only a log line (transformers 4.x reading a
    # CLIPTextModel saved by transformers 5 misses every weight): the torch backend refuses instead
    from safetensors.torch import load_file, save_file
    model = shutil.copytree(tiny_lcm_dir, tmp_path / "model")
    weights = model / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(k for k in tensors if "final_layer_norm.weight" in k)
    save_file({k: v for k, v in tensors.items() if k not in dropped}, weights, metadata={"format": "pt"})
    result = run("generate", "x", "--model", model, "--steps", "1", "--device", "cpu", "--out", tmp_path / "o")
    assert result.exit_code == 2 and len(dropped) == 1, result.output
    assert "lacks 1 of CLIPTextModel's weights" in result.stderr and "final_layer_norm.weight" in result.stderr
    assert not (tmp_path / "o").exists()
