"""The bundled demo models (models/): their files match the model card's sha256 list, and the three headline
commands work exactly as typed from any directory, offline (train lcm-at with a small step budget).

The three headline commands run as a user types them, in a child process: they are the suite's subprocess smoke
tests of ``toolkit generate``, ``toolkit export`` and ``toolkit train`` (the real entry point, a fresh interpreter,
the working directory); every other check of the CLI runs in-process (typer's CliRunner)."""
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from atdiff.runtime.provenance import tree_fingerprint

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CARD = MODELS / "default" / "README.md"


def toolkit(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TOOLKIT_MODEL"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def generate_in_process(*args, cwd: Path):
    """``toolkit generate ARGS`` through typer's CliRunner, from ``cwd`` (relative --out) and without
    $TOOLKIT_MODEL, as toolkit() runs it; generate's subprocess smoke test is the one above."""
    from typer.testing import CliRunner

    from toolkit import app
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.delenv("TOOLKIT_MODEL", raising=False)
        return CliRunner().invoke(app, ["generate", *args])


def test_bundled_files_match_the_model_cards_sha256_list():
    listed = dict((path, digest) for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", CARD.read_text(), re.M))
    weights = [p for p in listed if p.endswith(".safetensors")]
    assert len(weights) == 4, "student: text encoder, UNet, VAE; teacher: its UNet (the rest is linked)"
    for path, digest in listed.items():
        assert hashlib.sha256((MODELS / path).read_bytes()).hexdigest() == digest, path
    on_disk = {p.relative_to(MODELS).as_posix() for p in MODELS.rglob("*") if p.is_file() and p.name != "README.md"
               and not any((MODELS / q).is_symlink() for q in p.relative_to(MODELS).parents)}
    assert on_disk == set(listed), "every bundled file is listed, and only those"
    size = sum((MODELS / p).stat().st_size for p in listed)
    assert size <= 25 * 2 ** 20, f"the bundle is {size / 2 ** 20:.1f} MiB; the limit is 25 MiB"


def test_generate_as_typed_uses_the_bundled_model(tmp_path):
    result = toolkit("generate", "astronaut in a jungle", "--steps", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "outputs" / "astronaut-in-a-jungle-seed0.png"
    assert result.stdout.strip() == str(Path("outputs") / png.name) or result.stdout.strip().endswith(png.name)
    assert Image.open(png).size == (32, 32)
    assert "models/default" in result.stderr and "SimianLuo/LCM_Dreamshaper_v7" in result.stderr
    record = json.loads(Image.open(png).text["at-diffusion-toolkit"])   # runtime/images.py's chunk
    assert (record["prompt"], record["seed"], record["steps"], len(record["timesteps"])) == \
        ("astronaut in a jungle", 0, 4, 4)
    assert record["model"] == str(MODELS / "default") and (record["height"], record["width"]) == (32, 32)
    assert record["model_sha256"] == tree_fingerprint(MODELS / "default")["sha256"]
    assert record["backend"].startswith("torch ") and record["versions"]["python"] == platform.python_version()


def test_export_fp16_as_typed_exports_and_validates_the_bundled_model(tmp_path):
    result = toolkit("export", "--fp16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifests = list((tmp_path / "exports").glob("*/manifest.json"))
    assert len(manifests) == 1, result.stdout + result.stderr
    manifest = json.loads(manifests[0].read_text())
    assert manifest["precision"] == "fp16" or "16" in str(manifest["precision"])
    assert manifest["spec"]["default_guidance_scale"] is not None  # the model's own default travels with it


def test_train_lcm_at_as_typed_distils_the_bundled_teacher(tmp_path):
    result = toolkit("train", "lcm-at", "--max-steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "default-teacher" in result.stdout and "demo-data" in result.stdout
    run = tmp_path / "runs" / "lcm-at"
    assert (run / "model" / "model_index.json").is_file()
    generated = generate_in_process("a photo of a sneaker", "--steps", "2", "--model", str(run), "--out", "imgs",
                                    cwd=tmp_path)  # a run directory is accepted as --model
    assert generated.exit_code == 0 and generated.exception is None, (generated.exception, generated.output)
    assert (tmp_path / "imgs" / "a-photo-of-a-sneaker-seed0.png").is_file()
