"""`toolkit export` opens the model once and loads its networks once (issue 30, "One of each"): the end-to-end
check's float32 torch reference runs over the networks already in memory, and its images are bit for bit the ones
``Pipeline.load(source, backend="torch", device="cpu", dtype="float32")`` made from disk before."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import atdiff.export.exporter as exporter
import atdiff.export.torch_modules as torch_modules
import atdiff.export.validate as validate
import atdiff.runtime.model_source as model_source
from atdiff.export.exporter import ExportSettings, run_export
from atdiff.runtime import Pipeline
from atdiff.runtime.backends.torch_backend import TorchBackend
from atdiff.runtime.export_manifest import read_manifest
from atdiff.runtime.model_spec import ModelSpec


def _wrap(monkeypatch, owner, name, calls: list, classmethod_=False):
    """Replace ``owner.name`` by a wrapper appending (args, kwargs, result) to ``calls``."""
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result
    monkeypatch.setattr(owner, name, classmethod(lambda cls, *a, **k: counted(*a, **k)) if classmethod_ else counted)


def _same(path, source: Path) -> bool:
    return Path(path).resolve() == Path(source).resolve()


def _disk_reference(source: Path, request: dict) -> np.ndarray:
    """How the end-to-end reference was made before issue 30: the torch pipeline loaded from disk again."""
    with Pipeline.load(source, backend="torch", device="cpu", dtype="float32") as pipe:
        return pipe(**request).arrays


@pytest.mark.parametrize("model, options", [
    ("tiny_lcm_dir", dict(batch_sizes=(1, 2))),   # fp32: the traced modules are the very reference modules
    ("tiny_lcm_dir", dict(fp16=True)),            # fp16: a traced copy, the fp32 networks stay the reference
    ("tiny_uncond_dir", dict(batch_sizes=(2,))),  # pixel UNet, no text encoder or VAE
])
def test_end_to_end_reference_is_the_disk_pipelines_bit_for_bit(model, options, request, tmp_path, monkeypatch):
    source = request.getfixturevalue(model)
    loaded = []
    _wrap(monkeypatch, torch_modules, "load_networks", loaded)
    result = run_export(ExportSettings(model=str(source), out=tmp_path / "e", device="cpu", **options),
                        log=lambda message: None)
    networks = loaded[0][2]   # as run_export left them: traced, then the reference of every check
    manifest = read_manifest(result.out)
    assert manifest.spec == ModelSpec.from_diffusers_dir(source)   # the reference's spec is the source's
    e2e = validate.end_to_end_request(manifest, seed=0)
    expected = _disk_reference(source, e2e)
    np.testing.assert_array_equal(validate.reference_images(manifest, source, networks, e2e), expected)
    # and the report's end-to-end numbers are those of the disk reference against ONNX Runtime
    with Pipeline.load(result.out, backend="onnxruntime", device="cpu", dtype=manifest.precision) as pipe:
        actual = pipe(**e2e).arrays
    check, = [c for c in result.report.checks if c.name == "end-to-end"]
    assert check.score == f"PSNR {validate.psnr(expected, actual):.1f} dB"
    assert check.max_abs == float(np.abs(expected.astype(np.int16) - actual.astype(np.int16)).max())
    assert check.case.startswith(f"{len(expected)}x")


def _count_loads(monkeypatch) -> dict[str, list]:
    calls = {"weights": [], "open": [], "pipeline": [], "hash": []}
    _wrap(monkeypatch, TorchBackend, "load", calls["weights"], classmethod_=True)
    _wrap(monkeypatch, model_source, "resolve_model_path", calls["open"])   # every open_model goes through it
    _wrap(monkeypatch, Pipeline, "load", calls["pipeline"], classmethod_=True)
    _wrap(monkeypatch, exporter, "tree_fingerprint", calls["hash"])
    _wrap(monkeypatch, validate, "tree_fingerprint", calls["hash"])
    return calls


def test_cli_export_opens_loads_and_hashes_the_model_once(tiny_lcm_dir, tmp_path, monkeypatch):
    from toolkit import app
    monkeypatch.chdir(tmp_path)
    calls = _count_loads(monkeypatch)
    result = CliRunner().invoke(app, ["export", str(tiny_lcm_dir), "--device", "cpu"])   # default --out, validated
    assert result.exit_code == 0, result.output
    out = tmp_path / "exports" / tiny_lcm_dir.name
    assert read_manifest(out).data["validation"]["passed"] is True
    assert [_same(args[0], tiny_lcm_dir) for args, _, _ in calls["weights"]] == [True]   # was 2
    assert sum(_same(args[0], tiny_lcm_dir) for args, _, _ in calls["open"]) == 1          # was 3 (CLI, export, e2e)
    assert calls["pipeline"] and not any(_same(args[0], tiny_lcm_dir) for args, _, _ in calls["pipeline"])
    assert all(kwargs.get("backend") == "onnxruntime" for _, kwargs, _ in calls["pipeline"])   # no torch reload
    assert len(calls["hash"]) == 1                                                            # was 2


def test_validate_command_loads_the_source_once(tiny_lcm_dir, tiny_lcm_export, monkeypatch):
    from toolkit import app
    calls = _count_loads(monkeypatch)
    result = CliRunner().invoke(app, ["export", "validate", str(tiny_lcm_export), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "end-to-end" in result.output and "FAIL" not in result.output
    assert [_same(args[0], tiny_lcm_dir) for args, _, _ in calls["weights"]] == [True]   # was 2
    assert all(kwargs.get("backend") == "onnxruntime" for _, kwargs, _ in calls["pipeline"])
    assert len(calls["hash"]) == 1   # the source checked against the manifest


def test_backend_from_loaded_modules_uses_them_as_they_are(tiny_uncond_dir):
    spec = ModelSpec.from_diffusers_dir(tiny_uncond_dir)
    loaded = TorchBackend.load(tiny_uncond_dir, spec, device="cpu", dtype="float32")
    backend = TorchBackend.from_modules(spec, loaded.unet)
    assert backend.unet is loaded.unet and (backend.device, backend.dtype) == ("cpu", "float32")
    assert backend.describe() == loaded.describe()
    backend.close()
    assert loaded.unet is not None   # closing it drops its own references only


def test_backend_from_modules_needs_every_network_of_a_latent_model(tiny_lcm_dir):
    from atdiff.runtime.backends import BackendError
    spec = ModelSpec.from_diffusers_dir(tiny_lcm_dir)
    loaded = TorchBackend.load(tiny_lcm_dir, spec, device="cpu", dtype="float32")
    with pytest.raises(BackendError, match="text_encoder"):
        TorchBackend.from_modules(spec, loaded.unet, loaded.text_encoder)
