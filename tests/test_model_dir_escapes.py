"""Paths inside a model directory (docs/robustness.md): crafted exports and diffusers folders whose names, files or
symlinks point outside, whose files the manifest does not list, or whose tokenizer has no vocabulary. Each is one
``error:`` line and exit 2 from ``toolkit generate``, ``toolkit export`` and ``toolkit export triton``, with nothing
written outside --out (nor --out itself). The crafted exports are copies of the session's tiny export with
manifest.json edited; the crafted model folders are copies of the tiny diffusers model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import requires_tritonclient
from atdiff.runtime.provenance import sha256_file

# ---- crafted exports: each edit gets (export root, manifest dict, a folder outside the export) -----------------


def _entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _outside_copy(root: Path, outside: Path, rel: str) -> Path:
    """A byte-identical copy of the export's ``rel`` outside the export (so only where it lies is wrong)."""
    target = outside / Path(rel).name
    shutil.copy2(root / rel, target)
    return target


def rename_unet(name: str):
    def edit(root, manifest, outside):
        manifest["components"][name] = manifest["components"].pop("unet")
    return edit


def absolute_unet_file(root, manifest, outside):
    manifest["components"]["unet"]["file"] = str(_outside_copy(root, outside, "unet/model.onnx"))


def absolute_unet_file_listed(root, manifest, outside):
    path = _outside_copy(root, outside, "unet/model.onnx")
    manifest["components"]["unet"]["file"] = str(path)
    manifest["files"][str(path)] = _entry(path)


def dotdot_unet_file_listed(root, manifest, outside):
    path = _outside_copy(root, outside, "unet/model.onnx")
    rel = f"../{outside.name}/{path.name}"
    manifest["components"]["unet"]["file"] = rel
    manifest["files"][rel] = _entry(path)


def unlisted_unet_file(root, manifest, outside):
    shutil.copy2(root / "unet/model.onnx", root / "unet/other.onnx")
    manifest["components"]["unet"]["file"] = "unet/other.onnx"


def symlinked_unet_file(root, manifest, outside):
    target = _outside_copy(root, outside, "unet/model.onnx")
    (root / "unet/model.onnx").unlink()
    (root / "unet/model.onnx").symlink_to(target)


def symlinked_tokenizer_file(root, manifest, outside):
    target = _outside_copy(root, outside, "tokenizer/tokenizer.json")
    (root / "tokenizer/tokenizer.json").unlink()
    (root / "tokenizer/tokenizer.json").symlink_to(target)


def unlisted_tokenizer_file(root, manifest, outside):
    # read by the runtime (the pad token) although the manifest never hashed it
    (root / "tokenizer/special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))


def quote_in_tensor_name(root, manifest, outside):
    manifest["components"]["unet"]["contract"]["inputs"][0]["name"] = \
        'sample" data_type: TYPE_FP32 dims: [ 1 ] } ] instance_group [ { kind: KIND_MODEL'


def empty_tokenizer(root, manifest, outside):
    for path in (root / "tokenizer").iterdir():
        path.unlink()
        del manifest["files"][f"tokenizer/{path.name}"]


# (case, edit, what the error line says); '{outside}' in a component name stands for the folder outside. From
# export triton's staging folder (tmp/repo/.r.partial-*), '../../escaped' is tmp/escaped: the snapshot would see it.
EXPORT_CASES = [
    ("traversal-name", rename_unet("../../escaped"), "component name '../../escaped' is not a plain name"),
    ("absolute-name", rename_unet("{outside}/escaped"), "is not a plain name"),
    ("absolute-file", absolute_unet_file, "is not listed in 'files'"),
    ("absolute-file-listed", absolute_unet_file_listed, "is not a relative path inside the export"),
    ("dotdot-file-listed", dotdot_unet_file_listed, "is not a relative path inside the export"),
    ("unlisted-file", unlisted_unet_file, "'unet/other.onnx' is not listed in 'files'"),
    ("symlink-out", symlinked_unet_file, "points outside the export"),
    ("tokenizer-symlink-out", symlinked_tokenizer_file, "points outside the export"),
    ("tokenizer-unlisted-file", unlisted_tokenizer_file, "special_tokens_map.json is not listed in manifest.json"),
    ("quote-in-tensor-name", quote_in_tensor_name, "tensor name 'sample\" data_type"),
    ("empty-tokenizer", empty_tokenizer, "has no vocabulary: it lacks tokenizer.json and vocab.json and merges.txt"),
]


def craft_export(base: Path, tmp: Path, edit) -> tuple[Path, Path]:
    """A copy of ``base`` under ``tmp/export`` with ``edit`` applied, and the folder outside it (``tmp/outside``)."""
    root, outside = tmp / "export", tmp / "outside"
    shutil.copytree(base, root)
    outside.mkdir()
    manifest = json.loads((root / "manifest.json").read_text())
    edit(root, manifest, outside)
    for name in list(manifest["components"]):   # a name given with {outside} becomes that absolute path
        if "{outside}" in name:
            manifest["components"][name.format(outside=outside)] = manifest["components"].pop(name)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root, outside


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes: what 'nothing written' compares."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if not p.is_symlink() else b"->" + bytes(p.readlink()))
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def run_cli(*args: str):
    from toolkit import app
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error(result, message: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case, edit, message", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_generate_refuses_a_crafted_export(tiny_lcm_export, tmp_path, case, edit, message):
    export, _ = craft_export(tiny_lcm_export, tmp_path, edit)
    before = snapshot(tmp_path)
    result = run_cli("generate", "a red dress", "--model", export, "--backend", "onnxruntime", "--device", "cpu",
                     "--steps", "1", "--out", tmp_path / "images")
    assert_one_error(result, message)
    assert snapshot(tmp_path) == before          # no image, nothing else either


@requires_tritonclient
@pytest.mark.parametrize("case, edit, message", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_triton_refuses_a_crafted_export(tiny_lcm_export, tmp_path, case, edit, message):
    export, _ = craft_export(tiny_lcm_export, tmp_path, edit)
    before = snapshot(tmp_path)
    result = run_cli("export", "triton", export, "--out", tmp_path / "repo" / "r", "--kind", "cpu")
    assert_one_error(result, message)
    assert snapshot(tmp_path) == before and not (tmp_path / "repo").exists()


# ---- --out of export triton: a folder it did not write keeps every byte ---------------------------------------

@requires_tritonclient
def test_export_triton_keeps_every_byte_of_a_folder_it_did_not_write(tiny_lcm_export, tmp_path):
    ours = tmp_path / "ours"
    assert run_cli("export", "triton", tiny_lcm_export, "--out", ours, "--kind", "cpu").exit_code == 0
    (ours / "my-model").mkdir()                    # someone adds their own model to the repository
    (ours / "my-model" / "config.pbtxt").write_text('name: "my-model"\n')
    foreign = tmp_path / "foreign"                 # a folder that merely has a file of the marker's name
    foreign.mkdir()
    (foreign / "triton-repository.json").write_text('{"models": []}')
    (foreign / "notes.txt").write_text("keep me")
    for out, message in ((ours, "also holds my-model"), (foreign, "is not an existing Triton repository")):
        before = snapshot(out)
        assert_one_error(run_cli("export", "triton", tiny_lcm_export, "--out", out, "--kind", "cpu"), message)
        assert snapshot(out) == before


# ---- crafted diffusers folders (toolkit export MODEL, toolkit generate --model MODEL) ---------------------------

def link_out(rel: str):
    """Replace the model's ``rel`` (file or folder) by a symlink to a byte-identical copy outside the model."""
    def edit(model: Path, outside: Path):
        source, target = model / rel, outside / Path(rel).name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        shutil.rmtree(source) if source.is_dir() else source.unlink()
        source.symlink_to(target)
    return edit


def remove_tokenizer_files(*names: str):
    def edit(model: Path, outside: Path):
        for name in names or [p.name for p in (model / "tokenizer").iterdir()]:
            (model / "tokenizer" / name).unlink()
    return edit


MODEL_CASES = [
    ("tokenizer-file-symlink-out", link_out("tokenizer/vocab.json"), "points outside the model directory"),
    ("tokenizer-folder-symlink-out", link_out("tokenizer"), "points outside the model directory"),
    ("scheduler-config-symlink-out", link_out("scheduler/scheduler_config.json"), "points outside the model"),
    ("empty-tokenizer", remove_tokenizer_files(),
     "has no vocabulary: it lacks tokenizer.json and vocab.json and merges.txt"),
    ("tokenizer-without-merges", remove_tokenizer_files("tokenizer.json", "merges.txt"),
     "has no vocabulary: it lacks tokenizer.json and merges.txt"),
]


def craft_model(base: Path, tmp: Path, edit) -> Path:
    model, outside = tmp / "models" / "crafted", tmp / "outside"
    shutil.copytree(base, model)
    outside.mkdir()
    edit(model, outside)
    return model


@pytest.mark.parametrize("case, edit, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_export_refuses_a_crafted_model_folder(tiny_lcm_dir, tmp_path, case, edit, message):
    model = craft_model(tiny_lcm_dir, tmp_path, edit)
    before = snapshot(tmp_path)
    assert_one_error(run_cli("export", model, "--out", tmp_path / "exports" / "e", "--no-validate"), message)
    assert snapshot(tmp_path) == before and not (tmp_path / "exports").exists()


@pytest.mark.parametrize("case, edit, message", MODEL_CASES[:2] + MODEL_CASES[3:4], ids=["file", "folder", "empty"])
def test_generate_refuses_a_crafted_model_folder(tiny_lcm_dir, tmp_path, case, edit, message):
    model = craft_model(tiny_lcm_dir, tmp_path, edit)
    before = snapshot(tmp_path)
    result = run_cli("generate", "a red dress", "--model", model, "--device", "cpu", "--steps", "1",
                     "--out", tmp_path / "images")
    assert_one_error(result, message)
    assert snapshot(tmp_path) == before


# ---- what stays allowed: links to a sibling model directory, a Hugging Face cache snapshot ----------------------

def test_a_model_linking_parts_to_a_sibling_model_exports_with_real_files(tiny_lcm_dir, tmp_path):
    """As the bundled models/default-teacher shares models/default's text encoder, tokenizer and VAE."""
    base, teacher = tmp_path / "models" / "base", tmp_path / "models" / "teacher"
    shutil.copytree(tiny_lcm_dir, base)
    shutil.copytree(tiny_lcm_dir, teacher, ignore=shutil.ignore_patterns("text_encoder", "tokenizer", "vae"))
    for part in ("text_encoder", "tokenizer", "vae"):
        (teacher / part).symlink_to(Path("..") / "base" / part)
    out = tmp_path / "exports" / "teacher"
    result = run_cli("export", teacher, "--out", out, "--no-validate")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    copied = sorted(p for p in (out / "tokenizer").iterdir())
    assert copied and not any(p.is_symlink() for p in copied)
    assert {f"tokenizer/{p.name}" for p in copied} <= set(manifest["files"])


def test_the_bundled_teacher_opens():
    from atdiff.runtime.default_model import BUNDLED_TEACHER
    from atdiff.runtime.model_source import open_model
    if not BUNDLED_TEACHER.is_dir():
        pytest.skip(f"no bundled teacher at {BUNDLED_TEACHER}")
    assert any((BUNDLED_TEACHER / p).is_symlink() for p in ("text_encoder", "tokenizer", "vae"))
    assert open_model(BUNDLED_TEACHER).spec.is_latent


def test_a_hugging_face_cache_snapshot_opens(tiny_lcm_dir, tmp_path):
    """huggingface_hub's layout: snapshots/REV/FILE links to ../../blobs/HASH (outside the snapshot folder)."""
    from atdiff.runtime.model_source import open_model
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot_dir, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    shutil.copytree(tiny_lcm_dir, snapshot_dir)
    blobs.mkdir()
    for path in sorted(p for p in snapshot_dir.rglob("*") if p.is_file()):
        blob = blobs / sha256_file(path)
        path.rename(blob)
        path.symlink_to(Path(*[".."] * (len(path.relative_to(repo).parts) - 1), "blobs", blob.name))
    assert (snapshot_dir / "model_index.json").is_symlink()
    assert open_model(snapshot_dir).spec.is_latent
    (snapshot_dir / "tokenizer" / "vocab.json").unlink()           # a link out of the repository folder stays refused
    (snapshot_dir / "tokenizer" / "vocab.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(Exception, match="points outside the model directory"):
        open_model(snapshot_dir)
