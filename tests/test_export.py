"""`toolkit export`: ONNX export from contracts, manifest + hashes, validation, atomic replacement, CLI."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
from typer.testing import CliRunner

from atdiff.export.contracts import ExportShapes, contracts_for
from atdiff.export.exporter import ExportSettings, run_export
from atdiff.export.validate import Check, ExportValidationError, ValidationReport, validate_export
from atdiff.runtime import Pipeline
from atdiff.runtime.backends import BackendError
from atdiff.runtime.backends.ort_backend import OrtBackend
from atdiff.runtime.devices import DeviceError
from atdiff.runtime.export_manifest import read_manifest
from atdiff.runtime.provenance import sha256_file
from atdiff.runtime.model_spec import ModelFormatError, ModelSpec
from tolerance import (TINY_PIXEL_UNET_LAYERS, TINY_TEXT_ENCODER_LAYERS, TINY_TEXT_UNET_LAYERS, assert_close_scaled,
                       clipped_step_growth, network_rel)


def _export(model, out, **options):
    # on the CPU unless a test says otherwise (the default, auto, would pick a GPU where there is one)
    return run_export(ExportSettings(model=str(model), out=out, **{"device": "cpu", **options}),
                      log=lambda message: None)


@pytest.fixture(scope="module")
def lcm_export(tiny_lcm_dir, tmp_path_factory):
    return _export(tiny_lcm_dir, tmp_path_factory.mktemp("exports") / "lcm", batch_sizes=(1, 2))


@pytest.fixture(scope="module")
def lcm_fp16_export(tiny_lcm_dir, tmp_path_factory):
    return _export(tiny_lcm_dir, tmp_path_factory.mktemp("exports") / "lcm-fp16", fp16=True)


@pytest.fixture(scope="module")
def uncond_export(tiny_uncond_dir, tmp_path_factory):
    return _export(tiny_uncond_dir, tmp_path_factory.mktemp("exports") / "uncond", batch_sizes=(2,))


def test_every_component_passes_onnx_checker_and_is_listed_with_its_hash(lcm_export):
    manifest = read_manifest(lcm_export.out)
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder"}
    for name in manifest.components:
        onnx.checker.check_model(str(manifest.component_path(name)))
    for rel, entry in manifest.data["files"].items():
        assert sha256_file(lcm_export.out / rel) == entry["sha256"]
    assert "tokenizer/tokenizer.json" in manifest.data["files"]
    assert manifest.data["source"]["sha256"] and manifest.data["versions"]["onnx"] == onnx.__version__
    assert manifest.spec == ModelSpec.from_diffusers_dir(manifest.data["source"]["path"])


def test_unet_contract_carries_lcm_guidance_embedding_and_profiles(lcm_export):
    unet = read_manifest(lcm_export.out).components["unet"]["contract"]
    assert [t["name"] for t in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet["dims"]["batch"] == [1, 1, 2]
    graph_inputs = [i.name for i in onnx.load(str(lcm_export.out / "unet" / "model.onnx")).graph.input]
    assert graph_inputs == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]


def test_cfg_model_contract_doubles_batch_and_vae_output_follows_latent(tiny_sd_dir):
    spec = ModelSpec.from_diffusers_dir(tiny_sd_dir)
    contracts = contracts_for(spec, ExportShapes.for_spec(spec, (1, 4)))
    assert contracts["unet"].dims["batch"] == (1, 2, 8)          # CFG runs 2B; guidance off runs B
    assert "timestep_cond" not in contracts["unet"].input_names()
    assert contracts["vae_decoder"].dims["batch"] == (1, 1, 4)
    assert contracts["vae_decoder"].outputs[0].shape[2] == f"latent_height*{spec.vae_scale_factor}"
    fp16 = contracts["unet"].with_precision("float16").sample_inputs("max")
    assert fp16["sample"].dtype == np.float16 and fp16["timestep"].dtype == np.float32
    assert fp16["sample"].shape == (8, 4, 16, 16)


def test_validation_passes_per_component_and_end_to_end(lcm_export):
    report = lcm_export.report
    assert report.passed
    names = [c.name for c in report.checks]
    assert names.count("unet") == 2                       # profile min (batch 1) and max (batch 2)
    assert {"text_encoder", "vae_decoder", "tokenizer", "end-to-end"} <= set(names)
    assert read_manifest(lcm_export.out).data["validation"]["passed"] is True


def test_ort_pipeline_matches_torch_pipeline(tiny_lcm_dir, lcm_export):
    request = dict(prompts=["astronaut in a jungle", "a red cube"], steps=4, seed=3)
    with Pipeline.load(tiny_lcm_dir, backend="torch", device="cpu") as pipe:
        expected = pipe(**request)
    with Pipeline.load(lcm_export.out, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        got = pipe(**request)
    assert "onnxruntime" in got.backend
    # other kernels: the text encoder and 4 UNet steps round differently
    layers = TINY_TEXT_ENCODER_LAYERS + 4 * TINY_TEXT_UNET_LAYERS
    assert_close_scaled(got.latents, expected.latents, network_rel(layers))
    assert np.abs(got.arrays.astype(int) - expected.arrays.astype(int)).max() <= 1   # uint8: a value near .5 may flip


def test_unconditional_pixel_unet_exports_and_matches_torch(tiny_uncond_dir, uncond_export):
    assert uncond_export.report.passed
    request = dict(num_images=2, sampler="ddim", steps=3, seed=5)
    with Pipeline.load(tiny_uncond_dir, backend="torch", device="cpu") as pipe:
        expected = pipe(**request)
    with Pipeline.load(uncond_export.out, backend="onnxruntime", device="cpu", dtype="float32") as pipe:
        got = pipe(**request)
        growth = clipped_step_growth(pipe.schedule, got.request["timesteps"])   # DDIM clips x0 on this model
    assert pipe.schedule.clip_sample
    assert_close_scaled(got.samples, expected.samples, network_rel(3 * TINY_PIXEL_UNET_LAYERS, growth))


def test_fp16_export_validates_on_cpu_with_vae_and_text_encoder_in_fp32(lcm_fp16_export):
    manifest = read_manifest(lcm_fp16_export.out)
    assert lcm_fp16_export.report.passed
    assert manifest.precision == "float16"
    assert any("GPU fp16 kernels were not exercised" in n for n in lcm_fp16_export.report.notes)  # said, not hidden
    assert {n: c["precision"] for n, c in manifest.components.items()} == \
        {"text_encoder": "float32", "unet": "float16", "vae_decoder": "float32"}
    model = onnx.load(str(manifest.component_path("unet")))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert OrtBackend.auto_dtype(lcm_fp16_export.out, "cpu") == "float16"   # what dtype="auto" should mean
    with Pipeline.load(lcm_fp16_export.out, backend="onnxruntime", device="cpu", dtype="auto") as pipe:
        out = pipe(["astronaut in a jungle"], steps=2, seed=0)
    assert np.isfinite(out.samples).all() and out.arrays.std() > 1   # no NaN, not a flat image


def test_validator_fails_on_networks_that_differ(uncond_export, tmp_path):
    from atdiff.export.torch_modules import load_networks
    from atdiff.train.core.tiny_models import build_tiny_unconditional
    other = build_tiny_unconditional(tmp_path / "other", seed=1)
    report = validate_export(uncond_export.out, networks=load_networks(other, ModelSpec.from_diffusers_dir(other)))
    assert not report.passed
    assert {c.name for c in report.failures()} >= {"unet"}


def test_tampered_file_is_refused(uncond_export, tmp_path):
    copy = shutil.copytree(uncond_export.out, tmp_path / "copy")
    onnx_file = copy / "unet" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="sha256"):
        Pipeline.load(copy, backend="onnxruntime", device="cpu")


def test_failed_validation_leaves_previous_export_intact(tiny_uncond_dir, uncond_export, tmp_path, monkeypatch):
    out = shutil.copytree(uncond_export.out, tmp_path / "uncond")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    failing = ValidationReport([Check("unet", "forced", 1.0, "1.0", "0", False)])
    monkeypatch.setattr("atdiff.export.exporter.validate_export", lambda *a, **k: failing)
    with pytest.raises(ExportValidationError, match="previous export there is untouched"):
        _export(tiny_uncond_dir, out, batch_sizes=(1, 3))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["uncond"]     # no staging directory left behind


def test_out_that_is_not_an_export_is_refused(tiny_uncond_dir, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(Exception, match="not an export directory"):
        _export(tiny_uncond_dir, tmp_path, validate=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_atomic_file_keeps_the_previous_content_when_writing_fails(tmp_path):
    from atdiff.runtime.staging import atomic_file
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with atomic_file(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # as a plain open() would make it, not mkstemp's 0600


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="checks the error raised when onnxruntime has no CUDA provider")
def test_validation_device_is_checked_before_exporting(tiny_uncond_dir, tmp_path):
    # used to export everything, then fail in validation (or on torch's missing GPU first)
    with pytest.raises(DeviceError, match="gpu extra"):
        _export(tiny_uncond_dir, tmp_path / "out", device="cuda")
    assert not list(tmp_path.iterdir())


def test_dtype_other_than_the_exports_is_an_error(uncond_export):
    with pytest.raises(BackendError, match="float32"):
        Pipeline.load(uncond_export.out, backend="onnxruntime", device="cpu", dtype="float16")


def test_cli_exports_and_validates(tiny_uncond_dir, tmp_path):
    from toolkit import app
    runner = CliRunner()
    out = tmp_path / "cli-export"
    result = runner.invoke(app, ["export", str(tiny_uncond_dir), "--out", str(out), "--no-validate", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 1
    result = runner.invoke(app, ["export", "validate", str(out)])
    assert result.exit_code == 0, result.output
    assert "end-to-end" in result.output and "FAIL" not in result.output


def test_cli_validate_exits_nonzero_when_out_of_tolerance(uncond_export, monkeypatch):
    import atdiff.export.validate as validate
    from toolkit import app
    failing = validate.Check("end-to-end", "forced", 9.0, "PSNR 3 dB", "PSNR >= 40 dB", False)
    monkeypatch.setattr(validate, "check_end_to_end", lambda *args, **kwargs: [failing])
    result = CliRunner().invoke(app, ["export", "validate", str(uncond_export.out)])
    assert result.exit_code == 2
    assert "FAIL" in result.output and "end-to-end" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["export", "/no/such/model"], "does not exist"),
    (["export", "MODEL", "--batch-sizes", "1,x"], "--batch-sizes"),
    (["export", "MODEL", "--components", "unet,vae"], "--components"),
    (["export", "validate", "/no/such/export"], "no manifest.json"),
    (["export", "MODEL", "--seed", "-1"], "--seed"),   # was a ValueError from numpy's generator after loading
])
def test_cli_bad_input_is_one_line(tiny_uncond_dir, args, message):
    from toolkit import app
    args = [str(tiny_uncond_dir) if a == "MODEL" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_large_networks_use_one_external_data_file(tiny_uncond_dir, tmp_path):
    result = _export(tiny_uncond_dir, tmp_path / "external", external_data_bytes=0)   # tiny UNet as "over 2 GB"
    assert result.report.passed
    assert {"unet/model.onnx", "unet/model.onnx.data"} <= set(result.manifest["files"])
    assert (result.out / "unet" / "model.onnx").stat().st_size < (result.out / "unet" / "model.onnx.data").stat().st_size


def test_default_model_and_default_out(tiny_lcm_dir, tmp_path, monkeypatch):
    from toolkit import app
    monkeypatch.setenv("TOOLKIT_MODEL", str(tiny_lcm_dir))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "--fp16", "--no-validate"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "exports" / f"{tiny_lcm_dir.name}-fp16")
    assert manifest.precision == "float16"


def dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partials_of_killed_exports_are_cleaned_and_live_ones_kept(tiny_uncond_dir, tmp_path):
    out = tmp_path / "export"
    dead, alive = dead_pid(), os.getpid()
    stale = tmp_path / f".export.partial-{dead}-abcd1234"
    live = tmp_path / f".export.partial-{alive}-efgh5678"
    foreign = tmp_path / ".export.partial-notes"
    for path in (stale, live, foreign):
        path.mkdir()
        (path / "big.onnx").write_bytes(b"x" * 1000)
    run_export(ExportSettings(model=str(tiny_uncond_dir), out=out, validate=False), log=lambda m: None)
    assert not stale.exists() and live.is_dir() and foreign.is_dir()   # only a dead process's own leftovers
    assert (out / "manifest.json").is_file()


def test_a_kill_between_the_swap_renames_gets_the_previous_export_back(tmp_path):
    from atdiff.runtime.staging import clean_stale
    out = tmp_path / "export"
    previous = tmp_path / f".export.previous-{dead_pid()}-abcd1234"   # out was moved aside, the new one never came
    previous.mkdir()
    (previous / "manifest.json").write_text("{}")
    assert clean_stale(out) == [previous]
    assert (out / "manifest.json").read_text() == "{}" and not previous.exists()
