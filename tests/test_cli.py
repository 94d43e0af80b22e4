"""The `toolkit` CLI through typer's CliRunner: generate, doctor, and one-line errors for bad input."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from toolkit import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_writes_pngs_with_their_record(tiny_lcm_dir, tmp_path):
    result = _run("generate", "astronaut in a jungle", "--steps", "4", "--model", tiny_lcm_dir,
                  "--num-images", "2", "--seed", "3", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    paths = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in paths] == ["astronaut-in-a-jungle-seed3.png", "astronaut-in-a-jungle-seed4.png"]
    image = Image.open(paths[0])
    assert image.size == (64, 64)
    record = json.loads(image.text["at-diffusion-toolkit"])
    assert record["seed"] == 3 and record["steps"] == 4 and record["sampler"] == "lcm"
    assert record["prompt"] == "astronaut in a jungle" and "torch" in record["versions"]
    from atdiff.runtime.provenance import tree_fingerprint
    assert record["model_sha256"] == tree_fingerprint(tiny_lcm_dir)["sha256"]


def test_generate_out_png_names_the_one_image_and_never_overwrites(tiny_lcm_dir, tmp_path):
    target = tmp_path / "sub" / "astro.png"
    args = ("generate", "astronaut", "--steps", "2", "--model", tiny_lcm_dir, "--device", "cpu", "--out", target)
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert target.is_file() and [p.name for p in tmp_path.rglob("*.png")] == ["astro.png"]
    assert json.loads(Image.open(target).text["at-diffusion-toolkit"])["prompt"] == "astronaut"
    before = target.read_bytes()
    again = _run(*args[:-2], "--seed", "5", "--out", target)
    assert again.exit_code != 0 and "never overwritten" in again.output and target.read_bytes() == before
    many = _run(*args[:-2], "--num-images", "2", "--out", tmp_path / "two.png")
    assert many.exit_code != 0 and "more than one image" in many.output and not (tmp_path / "two.png").exists()


def test_generate_unconditional_with_sampler_and_nfe(tiny_uncond_dir, tmp_path):
    result = _run("generate", "--model", tiny_uncond_dir, "--sampler", "dpmpp_2m", "--nfe", "3",
                  "--num-images", "2", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["sample-seed0.png", "sample-seed1.png"]


def test_doctor_reports_components():
    result = _run("doctor")
    assert result.exit_code == 0, result.output
    for name in ("torch", "onnxruntime", "tensorrt"):
        assert name in result.output


def test_doctor_install_hints_keep_their_extras(monkeypatch):
    # rich used to read "[gpu]" / "[tensorrt]" in the hints as markup tags and print them without the extra
    from atdiff.runtime import doctor
    monkeypatch.setattr(doctor, "_plain_rows", lambda: [("tensorrt", "missing", "pip install 'x[tensorrt]'")])
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pip install 'x[tensorrt]'" in result.output


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "/no/such/model"], "does not exist"),
    (["generate", "x", "--steps", "0"], "steps must be at least 1"),
    (["generate", "x", "--height", "100"], "multiple of 8"),
    (["generate"], "no prompt given"),
    (["generate", "x", "--backend", "nope"], "unknown backend"),
    (["generate", "x", "--num-images", "0"], "num_images must be at least 1"),   # 0 used to mean 1
    (["generate", "x", "--batch-size", "0"], "batch_size must be at least 1"),
    (["generate", "x", "--seed", "-1"], "seeds must be non-negative"),
])
def test_bad_input_is_one_line_and_nonzero(tiny_lcm_dir, tmp_path, args, message):
    if "--model" not in args:
        args = args + ["--model", str(tiny_lcm_dir)]
    result = _run(*args, "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == \
        [result.stderr.strip().splitlines()[-1]]
    assert not list(tmp_path.glob("*.png"))


def test_missing_model_says_how_to_get_one(tmp_path, monkeypatch):
    import atdiff.runtime.default_model as default_model
    monkeypatch.delenv("TOOLKIT_MODEL", raising=False)
    monkeypatch.setattr(default_model, "BUNDLED", tmp_path / "no-bundled-model")
    result = _run("generate", "x", "--out", tmp_path)
    assert result.exit_code == 2
    assert "python -m tools.make_tiny_model" in result.stderr


def test_backend_options_reach_the_backend(tiny_lcm_dir, tmp_path):
    ok = _run("generate", "x", "--model", tiny_lcm_dir, "--steps", "1", "--device", "cpu",
              "--backend-option", "channels_last=true", "--out", tmp_path)
    assert ok.exit_code == 0, ok.output
    bad = _run("generate", "x", "--model", tiny_lcm_dir, "--device", "cpu", "--backend-option", "warp=9",
               "--out", tmp_path)
    assert bad.exit_code == 2 and "warp" in bad.stderr
    malformed = _run("generate", "x", "--model", tiny_lcm_dir, "--backend-option", "cuda_graph", "--out", tmp_path)
    assert malformed.exit_code == 2 and "KEY=VALUE" in malformed.stderr


def test_sampler_options_reach_the_sampler_and_the_png_record(tiny_uncond_dir, tmp_path):
    ok = _run("generate", "--model", tiny_uncond_dir, "--sampler", "ddim", "--nfe", "2", "--device", "cpu",
              "--sampler-option", "use_clipped_model_output=true", "--eta", "0.5", "--out", tmp_path)
    assert ok.exit_code == 0, ok.output
    record = json.loads(Image.open(tmp_path / "sample-seed0.png").text["at-diffusion-toolkit"])
    assert record["sampler_options"] == {"use_clipped_model_output": True, "eta": 0.5}
    unknown = _run("generate", "--model", tiny_uncond_dir, "--sampler", "dpmpp_2m", "--device", "cpu",
                   "--sampler-option", "use_clipped_model_output=true", "--out", tmp_path)
    assert unknown.exit_code == 2 and "has no option(s) ['use_clipped_model_output']" in unknown.stderr
    malformed = _run("generate", "--model", tiny_uncond_dir, "--sampler-option", "eta", "--out", tmp_path)
    assert malformed.exit_code == 2 and "--sampler-option 'eta' is not KEY=VALUE" in malformed.stderr


@pytest.mark.parametrize("args, text", [(["generate", "--help"], "default: bundled model"),
                                        (["export", "run", "--help"], "default: exports/<model-name>[-fp16]"),
                                        (["eval", "sample-fid", "--help"], "default: one chunk")])
def test_help_shows_the_documented_defaults(args, text):
    # rich markup used to swallow "[default: ...]" written in help strings
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert text in result.output


def test_out_that_is_a_file_fails_before_generating(tiny_lcm_dir, tmp_path):
    # used to generate everything, then fail writing with a FileExistsError traceback
    for name, message in (("taken.bin", "is a file"), ("taken.png", "never overwritten")):
        taken = tmp_path / name
        taken.write_bytes(b"not a directory")
        result = _run("generate", "x", "--model", str(tiny_lcm_dir), "--device", "cpu", "--out", taken)
        assert result.exit_code == 2 and message in result.stderr, name
        assert "model " not in result.stderr and taken.read_bytes() == b"not a directory"   # nothing was loaded


def test_generate_never_overwrites_an_existing_image(tiny_lcm_dir, tmp_path):
    args = ("generate", "a red cube", "--model", tiny_lcm_dir, "--steps", "1", "--device", "cpu", "--out", tmp_path)
    first, second = _run(*args), _run(*args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["a-red-cube-seed0-1.png", "a-red-cube-seed0.png"]
    assert "a-red-cube-seed0-1.png" in second.stdout   # says where the image went
    assert all(p.stat().st_size > 0 for p in tmp_path.glob("*.png"))


def test_make_tiny_model_refuses_a_non_empty_directory_without_force(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent   # tools/ runs from the checkout's root
    tool = [sys.executable, "-m", "tools.make_tiny_model"]
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    refused = subprocess.run([*tool, str(target), "--kind", "unconditional"], cwd=root, capture_output=True, text=True)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (target / "notes.txt").read_text() == "keep me"
    forced = subprocess.run([*tool, str(target), "--kind", "unconditional", "--force"], cwd=root, capture_output=True,
                            text=True)
    assert forced.returncode == 0 and (target / "model_index.json").is_file()


def test_a_prompt_longer_than_77_tokens_is_warned_about_and_recorded(tiny_lcm_dir, tmp_path):
    long_prompt = " ".join(["a red cube on a table"] * 20)   # ~120 tokens
    result = _run("generate", long_prompt, "short", "--model", tiny_lcm_dir, "--steps", "1", "--device", "cpu",
                  "--out", tmp_path)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "prompt 1 has" in warnings[0] and "first 77" in warnings[0]
    from PIL import Image
    record = json.loads(Image.open(next(tmp_path.glob("a-red-cube*.png"))).text["at-diffusion-toolkit"])
    assert list(record["truncated_prompts"]) == ["0"] and record["truncated_prompts"]["0"] > 77


@pytest.mark.parametrize("command", [
    ["generate", "x", "--steps", "1", "--device", "cpu", "--out", "{bad}"],
    ["export", "{model}", "--out", "{bad}/export"],
    ["eval", "sample-fid", "{model}", "--ref", "{bad}/ref.npz", "--nfe", "1", "--num", "2", "--out", "{bad}/r.json"],
])
def test_an_unwritable_out_fails_before_any_model_loads(tiny_lcm_dir, tmp_path, command):
    bad = "/proc/at-diffusion-toolkit-test"
    args = [a.format(bad=bad, model=tiny_lcm_dir) for a in command]
    if args[0] == "generate":
        args += ["--model", str(tiny_lcm_dir)]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and "Traceback" not in result.output + result.stderr
    assert "cannot write" in result.stderr or "does not exist" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "at least 1"), (["--sampler", "euler"], "unknown sampler"),
    (["--num-images", "0"], "num_images must be at least 1"), (["--seed", "-2"], "non-negative"),
    (["--batch-size", "0"], "batch_size must be at least 1"), (["--eps-scale", "-1"], "positive"),
    (["--guidance-scale", "-3"], "guidance_scale must be >= 0"), (["--height", "0"], "height must be at least 1"),
    (["--nfe", "0"], "steps must be at least 1"),   # --nfe: another name for --steps
    (["--steps", "2", "--nfe", "3"], "--steps 2 and --nfe 3 disagree"),
])
def test_cheap_arguments_fail_before_the_model_loads(tmp_path, args, message, monkeypatch):
    """The model path does not exist: each bad argument must be reported before anything tries to load it."""
    result = _run("generate", "x", "--model", tmp_path / "never-loaded", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "never-loaded" not in result.stderr
