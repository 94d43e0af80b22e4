"""Read and verify an export directory's ``manifest.json`` with the standard library alone.

The exporter (export/) writes the manifest; the runtime only reads it, so serving an export needs no
torch. The manifest lists every file with its sha256; ``verify_files`` refuses a directory whose files
were changed, truncated or removed since export, instead of running a tampered or half-copied model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from runtime.contracts import ExportContract
from runtime.model_source import MANIFEST
from runtime.model_spec import ModelFormatError, ModelSpec
from runtime.provenance import sha256_file

FORMAT = "at-diffusion-toolkit/onnx-export"
FORMAT_VERSION = 1
@dataclasses.dataclass(frozen=True)
class ExportManifest:
    root: Path
    data: dict

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.data["spec"])

    @property
    def precision(self) -> str:
        """The export's compute precision ('float32' or 'float16'; an fp16 export may keep parts in fp32)."""
        return self.data["precision"]

    @property
    def components(self) -> dict[str, dict]:
        """component name -> {'file', 'precision', 'contract': {inputs, outputs, dims, ...}}."""
        return self.data["components"]

    def contract(self, name: str) -> ExportContract:
        """The typed contract of one component (what the backend feeds it and reads from it)."""
        self.component_path(name)   # names --components when it was not exported
        return ExportContract.from_dict(self.components[name]["contract"])

    def component_path(self, name: str) -> Path:
        if name not in self.components:
            raise ModelFormatError(f"export {self.root} has no '{name}' component (it has "
                                   f"{', '.join(self.components) or 'none'}); re-run 'toolkit export' "
                                   f"with --components including {name}")
        return self.root / self.components[name]["file"]


def read_manifest(export_dir: str | Path) -> ExportManifest:
    root = Path(export_dir)
    path = root / MANIFEST
    if not path.exists():
        raise ModelFormatError(f"{root} has no {MANIFEST}, so it is not an export directory; "
                               "run 'toolkit export MODEL --out DIR' first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}); re-run 'toolkit export'") from None
    if data.get("format") != FORMAT:
        raise ModelFormatError(f"{path} is not an ONNX export manifest (format {data.get('format')!r}); "
                               "re-run 'toolkit export'")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFormatError(f"{path} has format version {data['format_version']}, newer than this toolkit "
                               f"reads ({FORMAT_VERSION}); upgrade at-diffusion-toolkit")
    for key in ("spec", "precision", "components", "files"):
        if key not in data:
            raise ModelFormatError(f"{path} lacks '{key}'; it is damaged, re-run 'toolkit export'")
    return ExportManifest(root, data)


def verify_files(manifest: ExportManifest) -> None:
    """Check every listed file's size and sha256; raise ModelFormatError naming the first bad file."""
    for rel, entry in sorted(manifest.data["files"].items()):
        path = manifest.root / rel
        if not path.is_file():
            raise ModelFormatError(f"export file {path} is missing; the export is incomplete, "
                                   "re-run 'toolkit export'")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ModelFormatError(f"export file {path} does not match its sha256 in {MANIFEST} (modified or "
                                   "corrupted since export); re-run 'toolkit export' or restore the file")
