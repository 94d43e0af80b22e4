"""``toolkit export``'s work: source diffusers directory -> validated export directory, written atomically.

Steps, all inside a staging directory that replaces ``out`` only at the end: export each selected network
from its contract, copy the tokenizer (with a ``tokenizer.json`` so the runtime needs no transformers),
write manifest.json, validate (ORT vs PyTorch per component and end to end), record the validation in
the manifest. Any failure, including validation out of tolerance, leaves a previous export untouched.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from atdiff.export.contracts import ExportShapes, contracts_for, select_components
from atdiff.export.manifest import build_manifest, write_manifest
from atdiff.export.onnx_export import DEFAULT_OPSET, EXTERNAL_DATA_BYTES, MIN_OPSET, export_network
from atdiff.export.validate import ExportValidationError, ValidationReport, validate_export
from atdiff.runtime.backends import ort_backend
from atdiff.runtime.devices import resolve_device
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.export_manifest import FORMAT, read_manifest
from atdiff.runtime.provenance import tree_fingerprint
from atdiff.runtime.faults import fault_point
from atdiff.runtime.model_source import MANIFEST, ModelSource, open_model
from atdiff.runtime.staging import check_target, check_writable, staged_directory


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    model: str
    out: Path | None = None   # None: exports/<model name>[-fp16] (default_out), resolved by run_export
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    components: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (1,)
    height: int | None = None
    width: int | None = None
    validate: bool = True
    seed: int = 0
    device: str = "auto"   # auto | cpu | cuda | cuda:N (export_device)
    # a network whose weights exceed this is written as model.onnx + model.onnx.data (ONNX external data)
    external_data_bytes: int = EXTERNAL_DATA_BYTES


@dataclasses.dataclass
class ExportResult:
    out: Path
    manifest: dict
    report: ValidationReport | None


def run_export(settings: ExportSettings, log: Callable[[str], None] = print) -> ExportResult:
    """Export ``settings.model``. The model is opened once and its networks loaded once (float32, on --device):
    the same modules are traced, and are the validation's reference per component and end to end."""
    source = open_model(settings.model)
    settings, shapes, contracts = _plan(settings, source)
    log(f"tracing{' and validating' if settings.validate else ''} on {settings.device} (--device)")
    from atdiff.export.torch_modules import load_networks  # torch: only once the arguments are known good
    networks = load_networks(source.path, source.spec, settings.device)
    # --out is replaced only when it is a previous export (manifest.json of this toolkit's format) holding
    # nothing its manifest does not list: replacing deletes the directory's files
    with staged_directory(settings.out, MANIFEST, "export", FORMAT) as staging:
        files = {}
        for name, contract in contracts.items():
            log(f"exporting {name} ({contract.precision}, opset {settings.opset})")
            written = export_network(networks[name], contract, staging / name / "model.onnx", settings.opset,
                                     settings.seed, settings.external_data_bytes)
            files[name] = written[0].relative_to(staging).as_posix()
            fault_point("export:network-written")
        tokenizer_files = copy_tokenizer(source.path, staging) if source.spec.is_latent else []
        record = {**dataclasses.asdict(settings), "out": str(settings.out), "batch_sizes": list(shapes.batch_sizes),
                  "height": shapes.height, "width": shapes.width, "components": list(contracts)}
        manifest = build_manifest(staging, spec=source.spec, precision=_precision(settings), contracts=contracts,
                                  component_files=files, opset=settings.opset, source=tree_fingerprint(source.path),
                                  settings=record, tokenizer_files=tokenizer_files)
        write_manifest(staging, manifest)
        report = None
        if settings.validate:
            log("validating (ONNX Runtime vs PyTorch)")
            report = _validate_staged(staging, source.path, networks, settings)
            manifest["validation"] = report.to_dict()
            write_manifest(staging, manifest)
    return ExportResult(settings.out, read_manifest(settings.out).data, report)


def _plan(settings: ExportSettings, source: ModelSource) -> tuple[ExportSettings, ExportShapes, dict]:
    """``settings`` checked against the opened model before the slow part (a bad --out or --device fails at
    once), with --out's default and 'auto' --device resolved; the shapes and the contracts to export."""
    if source.is_export:
        raise ToolkitError(f"{source.path} is already an export; pass the diffusers directory it came from")
    if settings.opset < MIN_OPSET:
        raise ToolkitError(f"--opset {settings.opset} is too old for these networks; use {MIN_OPSET} or newer")
    spec = source.spec
    shapes = ExportShapes.for_spec(spec, settings.batch_sizes, settings.height, settings.width)
    contracts = select_components(spec, contracts_for(spec, shapes, _vocab_size(source.path)), settings.components)
    contracts = {name: c.with_precision(_precision(settings)) for name, c in contracts.items()}
    if settings.out is None:
        settings = dataclasses.replace(settings, out=default_out(spec.name, settings.fp16))
    check_target(settings.out, MANIFEST, "export", FORMAT)
    check_writable(settings.out, parent=True)
    # and a --device torch cannot trace on or ONNX Runtime cannot validate on; 'auto' is recorded resolved
    settings = dataclasses.replace(settings, device=export_device(settings.device, settings.validate))
    return settings, shapes, contracts


def _precision(settings: ExportSettings) -> str:
    return "float16" if settings.fp16 else "float32"


def export_device(device: str, validate: bool = True) -> str:
    """``--device`` of an export (runtime/devices.py): torch traces on it and ONNX Runtime validates on it, so
    'auto' is CUDA only when both can use a GPU (torch alone with --no-validate), and an explicit cuda that
    either cannot reach is an error naming the fix."""
    def support():
        from atdiff.runtime.backends import torch_backend  # torch: only when the answer depends on it
        found = torch_backend.device_support()
        return found.both(ort_backend.device_support()) if validate else found
    return resolve_device(device, support)


def _validate_staged(staging: Path, source: Path, networks: dict, settings: ExportSettings) -> ValidationReport:
    """Validate the staged export; out of tolerance raises, so the staging directory is dropped unswapped."""
    # the manifest's source fingerprint was computed from ``source`` moments ago: not hashed again
    report = validate_export(staging, source=source, networks=networks, seed=settings.seed, device=settings.device,
                             source_verified=True)
    if not report.passed:
        names = ", ".join(sorted({c.name for c in report.failures()}))
        raise ExportValidationError(
            f"export validation failed ({names} out of tolerance); nothing was written to {settings.out}"
            " (a previous export there is untouched). Try without --fp16, or --no-validate to keep it "
            "anyway", report)
    return report


def copy_tokenizer(source: Path, staging: Path) -> list[str]:
    """Copy tokenizer/ into the export; add tokenizer.json (the fast tokenizer's single file) when the
    source has only vocab.json + merges.txt, so the runtime reads it with the tokenizers library alone."""
    target = staging / "tokenizer"
    shutil.copytree(source / "tokenizer", target)
    if not (target / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(source / "tokenizer")).backend_tokenizer.save(str(target / "tokenizer.json"))
    return sorted(p.relative_to(staging).as_posix() for p in target.rglob("*") if p.is_file())


def _vocab_size(source: Path) -> int | None:
    config = source / "text_encoder" / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.exists() else None


def default_out(model_name: str, fp16: bool) -> Path:
    return Path("exports") / f"{model_name}{'-fp16' if fp16 else ''}"
