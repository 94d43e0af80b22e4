"""Check an export against the PyTorch model it came from.

1. Per component: ONNX Runtime vs the float32 PyTorch network on the contract's sample inputs at every
   distinct profile point (min/opt/max), within the contract's tolerance; any NaN/inf fails.
2. Tokenizer: the export's tokenizer (read by the runtime without transformers) gives the source
   tokenizer's ids.
3. End to end: the same prompts and seeds through ``Pipeline`` with the torch backend over the source's
   networks (the float32 modules of check 1, on the CPU: not loaded again) and the onnxruntime backend on the
   export; the uint8 images must agree to a minimum PSNR.

The comparison is numpy.allclose's rule written out, because the report needs the numbers (max abs
diff, worst margin) and not only a verdict; polygraphy's comparator is built around its own runners.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from atdiff.runtime.contracts import ExportContract, Tolerance
from atdiff.runtime.backends.ort_backend import OrtBackend, OrtRunner, ort_device, session_options
from atdiff.runtime.backends.ort_binding import make_arrays
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.export_manifest import ExportManifest, read_manifest, verify_files
from atdiff.runtime.model_source import ModelSource
from atdiff.runtime.provenance import tree_fingerprint

# Images decoded from fp32 ORT and fp32 torch differ only by rounding (identical in practice); fp16
# networks move pixel values by a few levels. 30 dB is a mean error of ~8 levels of 255.
E2E_MIN_PSNR = {"float32": 40.0, "float16": 30.0}
E2E_PROMPTS = ("astronaut in a jungle, cold color palette, muted colors", "a red bicycle leaning on a wall")
_SHORT = {"float32": "fp32", "float16": "fp16"}
TOKENIZER_PROMPTS = ("", "astronaut in a jungle", "A photo of an astronaut riding a horse on Mars. " * 12)


@dataclasses.dataclass
class Check:
    name: str            # e.g. "unet", "end-to-end"
    case: str            # e.g. "opt sample[1,4,16,16]"
    max_abs: float
    score: str           # the number the limit applies to, formatted
    limit: str
    passed: bool

    def __post_init__(self):
        self.passed = bool(self.passed)  # numpy bools are not JSON-serialisable


@dataclasses.dataclass
class ValidationReport:
    checks: list[Check]
    notes: list[str] = dataclasses.field(default_factory=list)   # what the checks could not cover

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [dataclasses.asdict(c) for c in self.checks], "notes": self.notes}


class ExportValidationError(ToolkitError):
    def __init__(self, message: str, report: ValidationReport):
        super().__init__(message)
        self.report = report


def compare(reference: np.ndarray, actual: np.ndarray, tol: Tolerance) -> tuple[float, float, bool]:
    """(max |a - r|, worst allclose margin max(|a - r| - rtol |r|), passed). Non-finite output fails."""
    if reference.shape != actual.shape:
        return float("inf"), float("inf"), False
    diff = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    if not np.isfinite(actual).all():
        return float("nan"), float("inf"), False
    margin = float((diff - tol.rtol * np.abs(reference)).max())
    return float(diff.max()), margin, margin <= tol.atol


def psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - actual.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def check_components(manifest: ExportManifest, networks: dict, seed: int = 0, device: str = "cpu") -> list[Check]:
    """Per-component parity at every distinct profile point of each contract."""
    kind, device_id = ort_device(device)
    options = session_options()
    # torch and ORT alternate here: ORT's spinning idle threads would steal the cores torch needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # on CUDA, the IO-binding path the backend serves with (host numpy in and out: the reference is numpy)
    arrays = None if device_id is None else make_arrays("numpy", kind, device_id)
    checks = []
    for name in manifest.components:
        contract = manifest.contract(name)
        with OrtRunner.for_component(manifest, name, device, options=options, arrays=arrays) as runner:
            checks += [_component_check(name, contract, point, networks[name], runner, seed)
                       for point in contract.distinct_points()]
    return checks


def _component_check(name: str, contract: ExportContract, point: str, network, runner: OrtRunner, seed: int) -> Check:
    """ORT vs the float32 torch network on the contract's sample inputs at one profile point."""
    from atdiff.export.torch_modules import reference_outputs  # torch: imported only when validating
    inputs = contract.sample_inputs(point, seed)
    output = contract.output_names()[0]
    tol = contract.tolerance
    max_abs, margin, ok = compare(reference_outputs(network, contract, inputs), runner(inputs)[output], tol)
    shape = "x".join(map(str, inputs[contract.input_names()[0]].shape))
    return Check(name, f"{point} {shape} {_SHORT[contract.precision]}", max_abs, f"margin {margin:.1e}",
                 f"atol {tol.atol:.0e} rtol {tol.rtol:.0e}", ok)


def check_tokenizer(manifest: ExportManifest, source: Path) -> list[Check]:
    if not manifest.spec.is_latent:
        return []
    from transformers import AutoTokenizer
    from atdiff.runtime.tokenizer import PromptTokenizer
    length = manifest.spec.tokenizer_max_length
    ours = PromptTokenizer(manifest.root / "tokenizer", length)(list(TOKENIZER_PROMPTS))
    theirs = AutoTokenizer.from_pretrained(str(source / "tokenizer"))(
        list(TOKENIZER_PROMPTS), padding="max_length", max_length=length, truncation=True, return_tensors="np")
    mismatched = int((ours != theirs["input_ids"]).sum())
    return [Check("tokenizer", f"{len(TOKENIZER_PROMPTS)} prompts", float(mismatched),
                  f"{mismatched} ids differ", "0 differ", mismatched == 0)]


def end_to_end_request(manifest: ExportManifest, seed: int = 0, steps: int = 4) -> dict:
    """The end-to-end check's request: the export's first batch size, at its height and width."""
    spec, settings = manifest.spec, manifest.data["settings"]
    count = int(settings["batch_sizes"][0])
    request = dict(steps=steps, seed=seed, height=settings["height"], width=settings["width"])
    if spec.is_latent:
        request["prompts"] = [E2E_PROMPTS[i % len(E2E_PROMPTS)] for i in range(count)]
    else:
        request["num_images"] = count
        if spec.num_class_embeds:
            request["class_labels"] = [i % spec.num_class_embeds for i in range(count)]
    return request


def reference_images(manifest: ExportManifest, source: Path, networks: dict, request: dict) -> np.ndarray:
    """The float32 torch pipeline's uint8 images for ``request``, on the CPU, over the already-loaded source
    ``networks`` (nothing is read from disk again). ``source`` was checked against the manifest's fingerprint,
    so the manifest's spec is the source's."""
    from atdiff.export.torch_modules import reference_pipeline  # torch: imported only when validating
    with reference_pipeline(ModelSource(source, manifest.spec, is_export=False), networks) as pipe:
        return pipe(**request).arrays


def check_end_to_end(manifest: ExportManifest, source: Path, networks: dict, seed: int = 0, device: str = "cpu",
                     steps: int = 4) -> list[Check]:
    """The same request through the torch pipeline (source's float32 ``networks``, on the CPU) and the ORT
    pipeline (export, on ``device``)."""
    from atdiff.runtime.pipeline import Pipeline
    request = end_to_end_request(manifest, seed, steps)
    reference = reference_images(manifest, source, networks, request)
    with Pipeline.load(manifest.root, backend="onnxruntime", device=device, dtype=manifest.precision,
                       verify=False) as pipe:  # verify_files already ran in validate_export
        actual = pipe(**request).arrays
    score, limit = psnr(reference, actual), E2E_MIN_PSNR[manifest.precision]
    max_abs = float(np.abs(reference.astype(np.int16) - actual.astype(np.int16)).max())
    count, settings = len(reference), manifest.data["settings"]
    case = f"{count}x{settings['height']}x{settings['width']} {steps} steps"
    return [Check("end-to-end", case, max_abs, f"PSNR {score:.1f} dB", f"PSNR >= {limit:.0f} dB", score >= limit)]


def validate_export(export_dir: str | Path, *, source: str | Path | None = None, networks: dict | None = None,
                    seed: int = 0, device: str = "auto", source_verified: bool = False) -> ValidationReport:
    """All checks for an export directory, ONNX Runtime running on ``device`` (auto | cpu | cuda | cuda:N; auto:
    CUDA when ORT has its CUDA provider). ``source`` defaults to the path recorded in the manifest and
    must still hash to the recorded fingerprint (``source_verified``: the caller just computed that fingerprint
    from ``source`` itself, as ``run_export`` does, so it is not hashed again). ``networks`` (the source's float32
    torch modules) are the reference of every check, per component and end to end; without them the source's
    networks are loaded from disk, once."""
    device = OrtBackend.resolve_device(device)
    manifest = read_manifest(export_dir)
    verify_files(manifest)
    source_dir = Path(source) if source_verified and source is not None else resolve_source(manifest, source)
    if networks is None:
        from atdiff.export.torch_modules import load_networks
        networks = load_networks(source_dir, manifest.spec)
    checks = check_components(manifest, networks, seed, device) + check_tokenizer(manifest, source_dir)
    needed = {"unet", "text_encoder", "vae_decoder"} if manifest.spec.is_latent else {"unet"}
    if needed <= set(manifest.components):
        checks += check_end_to_end(manifest, source_dir, networks, seed, device)
    return ValidationReport(checks, notes=coverage_notes(manifest, device))


def coverage_notes(manifest: ExportManifest, device: str) -> list[str]:
    if manifest.precision == "float16" and device == "cpu":
        # ORT's CPU provider runs fp16 graphs through inserted casts: the numbers are checked, the GPU's
        # fp16 kernels (where overflow would show) are not.
        return ["fp16 validated on CPU: ONNX Runtime computes fp16 nodes there through casts, so GPU fp16 "
                "kernels were not exercised; re-check on the serving GPU: toolkit export validate DIR --device cuda"]
    return []


def resolve_source(manifest: ExportManifest, source: str | Path | None) -> Path:
    recorded = manifest.data["source"]
    path = Path(source) if source is not None else Path(recorded["path"])
    if not path.is_dir():
        raise ToolkitError(f"the source model {path} is not there to compare against; pass --source DIR "
                           "(the diffusers directory this export was made from)")
    if tree_fingerprint(path)["sha256"] != recorded["sha256"]:
        raise ToolkitError(f"{path} is not the model this export was made from (its files' sha256 differs from "
                           "the manifest's source.sha256); pass --source with the original, or re-export")
    return path
