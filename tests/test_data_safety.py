"""Data safety (issue 31): a command never deletes, overwrites or adds to a folder it did not make.

Each command that writes a folder gets an ``--out`` already holding someone's files (a web app's config.json and
manifest.json, model/weights.bin, metrics.jsonl): every byte of the whole tree around it stays as it was, and the
command exits 2 with one ``error:`` line. A genuine previous run / export / report / bundle is still resumable or
replaceable. ``toolkit generate`` writes into a folder of images by design (``outputs/`` collects every run), so
it is checked for the other half: an existing file of the same name keeps its bytes and the image gets a new name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
UNRELATED = {"config.json": b'{"theme": "dark", "port": 8080}\n',
             "manifest.json": b'{"name": "My web app", "start_url": "/", "icons": []}\n',
             "model/weights.bin": bytes(range(256)) * 64,
             "metrics.jsonl": b'{"visits": 3}\n{"visits": 5}\n',
             "record.json": b'{"patient": 17}\n'}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each training run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


def prefill(folder: Path) -> Path:
    for rel, data in UNRELATED.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by sha256, links by target, folders as such (so an added, removed or
    changed entry anywhere shows, staging leftovers beside --out included)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            entries[rel] = (f"link:{os.readlink(path)}" if path.is_symlink() else "folder" if path.is_dir()
                            else hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


def invoke(*args):
    from toolkit import app
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error_line(output: str, exit_code: int, *expected: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert exit_code == 2 and len(errors) == 1 and "Traceback" not in output, output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def inputs(tiny_sd_dir, tmp_path_factory):
    """Tiny data for every training command: 16x16 RGB images (.npz), a captioned image folder, and 28x28
    grayscale images with 10 classes (stands in for Fashion-MNIST, which CI machines do not have)."""
    from PIL import Image
    root, rng = tmp_path_factory.mktemp("safety-data"), np.random.default_rng(0)
    np.savez(root / "toy.npz", x=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 3, 8))
    np.savez(root / "fashion.npz", x=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), y=np.arange(10))
    captions = root / "captions"
    captions.mkdir()
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(captions / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing {i}"}))
    (captions / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {"npz": root / "toy.npz", "fashion": root / "fashion.npz", "captions": captions, "sd": tiny_sd_dir}


TRAIN_COMMANDS = {
    "adm": "adm --data {npz} --preset tiny",
    "adm-at": "adm-at --data {npz} --preset tiny",
    "adm-ip": "adm-ip --data {npz} --preset tiny",
    "lcm": "lcm --teacher {sd} --data {captions} --resolution 32",
    "lcm-at": "lcm-at --teacher {sd} --data {captions} --resolution 32",
    "captions": "captions --num 2",
    "vae": "vae --data {captions}",
    "teacher": "teacher --data {captions} --vae {sd}/vae",
    "clip": "clip --data {captions}",
    "classifier": "classifier",
}


def fashion_stand_in(monkeypatch, inputs) -> None:
    """``train classifier`` always reads Fashion-MNIST: serve it the 28x28 stand-in."""
    import atdiff.train.core.image_data
    load = atdiff.train.core.image_data.load_image_dataset
    monkeypatch.setattr(atdiff.train.core.image_data, "load_image_dataset",
                        lambda data, resolution=None, class_cond=False: load(str(inputs["fashion"]), resolution,
                                                                             class_cond))


@pytest.mark.parametrize("command", list(TRAIN_COMMANDS))
def test_train_into_an_unrelated_folder_is_refused_and_keeps_every_byte(command, inputs, tmp_path, monkeypatch):
    fashion_stand_in(monkeypatch, inputs)
    out = prefill(tmp_path / "app")
    before = snapshot(tmp_path)
    args = TRAIN_COMMANDS[command].format(**inputs).split()
    result = invoke("train", *args, "--out", out)
    assert_one_error_line(result.output, result.exit_code, str(out))
    assert snapshot(tmp_path) == before
    if command != "captions":   # every trainer names what marks its own runs
        assert "toolkit-run.json" in result.output


def test_a_genuine_run_resumes_and_one_made_before_run_markers_too(inputs, tmp_path):
    run = tmp_path / "run"

    def train(*extra):
        return invoke("train", "adm", "--data", inputs["npz"], "--preset", "tiny", "--out", run, "--batch-size", "4",
                      "--device", "cpu", "--log-every", "1", *extra)

    assert train("--max-steps", "1").exit_code == 0
    assert json.loads((run / "toolkit-run.json").read_text())["format"] == "at-diffusion-toolkit/train-run"
    before = snapshot(tmp_path)
    again = train("--max-steps", "1")   # a new run over it would mix with its checkpoints and metrics
    assert_one_error_line(again.output, again.exit_code, "already holds a training run", "--resume")
    assert snapshot(tmp_path) == before
    resumed = train("--max-steps", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output

    (run / "toolkit-run.json").unlink()   # as a run of an earlier version left it: config.json + checkpoints/
    before = snapshot(tmp_path)
    refused = train("--max-steps", "3")
    assert_one_error_line(refused.output, refused.exit_code, "--resume")
    assert snapshot(tmp_path) == before
    legacy = train("--max-steps", "3", "--resume")
    assert legacy.exit_code == 0, legacy.output
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "toolkit-run.json").is_file()   # marked now


def test_resume_of_an_unrelated_folder_is_refused(inputs, tmp_path):
    out = prefill(tmp_path / "app")
    before = snapshot(tmp_path)
    result = invoke("train", "adm", "--data", inputs["npz"], "--preset", "tiny", "--out", out, "--resume")
    assert_one_error_line(result.output, result.exit_code, "toolkit-run.json")
    assert snapshot(tmp_path) == before


def test_latent_cache_in_an_unrelated_folder_is_refused(inputs, tmp_path):
    cache = prefill(tmp_path / "app")   # its manifest.json is a web app's, not a latent cache's
    before = snapshot(tmp_path)
    result = invoke("train", "lcm", "--teacher", inputs["sd"], "--data", inputs["captions"], "--resolution", "32",
                    "--out", tmp_path / "run", "--cache-latents", cache, "--device", "cpu")
    assert_one_error_line(result.output, result.exit_code, "--cache-latents", "not a latent cache")
    assert snapshot(tmp_path) == before


def test_caption_shards_go_only_into_a_folder_of_shards(tmp_path):
    from atdiff.runtime.errors import ToolkitError
    from atdiff.train.demo.fashion_captions import check_shard_folder
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "fmnist-train-000.tar").write_bytes(b"")
    (shards / "fmnist-test-000.tar").write_bytes(b"")
    check_shard_folder(shards)   # a previous run's shards (any split): rewritten by name
    (shards / "config.json").write_text("{}")
    with pytest.raises(ToolkitError, match="holds config.json"):
        check_shard_folder(shards)


# ---- export ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def previous_export(tiny_uncond_dir, tmp_path_factory):
    from atdiff.export.exporter import ExportSettings, run_export
    out = tmp_path_factory.mktemp("safety-export") / "exp"
    return run_export(ExportSettings(model=str(tiny_uncond_dir), out=out, validate=False), log=lambda m: None).out


def test_export_into_an_unrelated_folder_is_refused_and_keeps_every_byte(tiny_uncond_dir, tmp_path):
    out = prefill(tmp_path / "app")   # holds a manifest.json: the name alone used to mark it as an export
    before = snapshot(tmp_path)
    result = invoke("export", tiny_uncond_dir, "--out", out, "--no-validate")
    assert_one_error_line(result.output, result.exit_code, "not an export directory", "format")
    assert snapshot(tmp_path) == before


def test_export_over_a_previous_export_holding_another_file_is_refused_naming_it(tiny_uncond_dir, previous_export,
                                                                                  tmp_path):
    out = shutil.copytree(previous_export, tmp_path / "exp")
    (out / "unet" / "notes.txt").write_text("my notes on this export")
    before = snapshot(tmp_path)
    result = invoke("export", tiny_uncond_dir, "--out", out, "--no-validate")
    assert_one_error_line(result.output, result.exit_code, "unet/notes.txt", "does not list")
    assert snapshot(tmp_path) == before


def test_a_previous_export_is_replaced(tiny_uncond_dir, previous_export, tmp_path):
    from atdiff.runtime.export_manifest import read_manifest, verify_files
    out = shutil.copytree(previous_export, tmp_path / "exp")
    before = json.loads((out / "manifest.json").read_text())["created"]
    result = invoke("export", tiny_uncond_dir, "--out", out, "--no-validate", "--seed", "1")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    verify_files(manifest)
    assert manifest.data["settings"]["seed"] == 1 and manifest.data["created"] >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]   # no staging or moved-aside copy left


# ---- eval compare reports (the same staging, marker record.json) ----------------------------------------------

def write_tiny_report(out: Path) -> Path:
    from atdiff.eval.compare_report import write_report
    rows = [{"model": "base", "backend": "torch", "steps": 1, "fid": 10.0, "fid_std": 1.0, "clip": None,
             "clip_std": None, "num": 4, "seconds": 0.1, "runs_on": "cpu", "model_sha256": "0" * 64}]
    grids = {("base", "torch", 1): np.zeros((2, 8, 8, 3), np.uint8)}
    return write_report(out, rows, grids, baseline="base", record={"config": {"num": 4, "seed": 0}})


def test_compare_report_replaces_only_its_own_reports(tmp_path):
    from atdiff.runtime.errors import ToolkitError
    out = prefill(tmp_path / "app")   # holds a record.json that is not a report's
    before = snapshot(tmp_path)
    with pytest.raises(ToolkitError, match="not an eval compare report directory"):
        write_tiny_report(out)
    assert snapshot(tmp_path) == before

    report = write_tiny_report(tmp_path / "report")
    first = (report / "record.json").read_bytes()
    write_tiny_report(report)   # a previous report is replaced
    assert json.loads((report / "record.json").read_bytes())["files"] == json.loads(first)["files"]
    (report / "mine.txt").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(ToolkitError, match="mine.txt"):
        write_tiny_report(report)
    assert snapshot(tmp_path) == before


# ---- generate -------------------------------------------------------------------------------------------------

def test_generate_never_overwrites_a_file_and_says_so_in_help(tiny_lcm_dir, tmp_path):
    out = prefill(tmp_path / "app")
    (out / "a-photo-seed0.png").write_bytes(b"someone's picture, not ours")
    before = snapshot(tmp_path)
    result = invoke("generate", "a photo", "--model", tiny_lcm_dir, "--steps", "1", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before   # every existing byte kept
    assert set(after) - set(before) == {"app/a-photo-seed0-1.png"}     # the image took a new name
    assert (out / "a-photo-seed0-1.png").read_bytes().startswith(b"\x89PNG")
    assert "never overwritten" in " ".join(invoke("generate", "--help").output.split())


# ---- the bundle script ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("replace", [False, True])
def test_bundle_into_an_unrelated_folder_is_refused_and_keeps_every_byte(tmp_path, capsys, replace):
    from tools.bundle_default_model import main
    out = prefill(tmp_path / "app")
    before = snapshot(tmp_path)
    code = main(["--study", str(tmp_path / "study"), "--out", str(out), *(["--replace"] if replace else [])])
    assert_one_error_line(capsys.readouterr().err, code, "not a bundle this script wrote")
    assert snapshot(tmp_path) == before


def test_bundle_rebuilds_its_own_bundle_only_with_replace_and_nothing_beside_it(tmp_path, capsys):
    from atdiff.runtime.errors import ToolkitError
    from tools.bundle_default_model import check_out, main
    models = shutil.copytree(ROOT / "models", tmp_path / "models", symlinks=True)   # the shipped bundle
    check_out(models, replace=True)
    with pytest.raises(ToolkitError, match="pass --replace"):
        check_out(models, replace=False)
    (models / "tiny-lcm").mkdir()   # a model made beside the bundle (the default model's error suggests it)
    (models / "tiny-lcm" / "model_index.json").write_text("{}")
    before = snapshot(tmp_path)
    code = main(["--study", str(tmp_path / "study"), "--out", str(models), "--replace"])
    assert_one_error_line(capsys.readouterr().err, code, "tiny-lcm")
    assert snapshot(tmp_path) == before
