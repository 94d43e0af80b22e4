"""Read and verify an export directory's ``manifest.json`` with the standard library alone.

The exporter (export/) writes the manifest; the runtime only reads it, so serving an export needs no
torch. The manifest lists every file with its sha256; ``verify_files`` refuses a directory whose files
were changed, truncated or removed since export, instead of running a tampered or half-copied model.

Paths inside an export (docs/robustness.md): the runtime reads only files the manifest lists (so they are hashed),
each a relative path without ``..`` that resolves, symlinks followed, inside the export. Component and tensor names
must be plain identifiers: ``toolkit export triton`` makes folders and config.pbtxt entries of them.

Crafted configs (docs/robustness.md): the manifest is read as a bounded JSON object and every field the runtime uses
is typed and bounded (``_check_types``: spec sizes, scheduler config, profiles, tensor sizes) before anything is
built from it, so a crafted one is one ModelFormatError naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path, PurePosixPath

from atdiff.runtime.config_checks import Config, read_json_object, short_repr
from atdiff.runtime.contracts import MAX_PROFILE_DIM, PRECISIONS, ExportContract
from atdiff.runtime.model_source import MANIFEST
from atdiff.runtime.model_spec import EXPORT_FIX, ModelFormatError, ModelSpec
from atdiff.runtime.provenance import sha256_file

FORMAT = "at-diffusion-toolkit/onnx-export"
FORMAT_VERSION = 1
# letters, digits, '_', '.', '-'; starts with a letter, digit or '_' (never '.'), at most 64 characters
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_COMPONENTS = 16


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
        return self.file(self.components[name]["file"])

    def file(self, rel: str) -> Path:
        """The export's file ``rel`` (a manifest-listed path, checked by read_manifest), refused when it
        resolves, symlinks followed, outside the export."""
        path = self.root / rel
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ModelFormatError(f"export file {path} points outside the export (to {path.resolve()}); an export "
                                   "holds its files itself: re-run 'toolkit export'")
        return path


def read_manifest(export_dir: str | Path) -> ExportManifest:
    root = Path(export_dir)
    path = root / MANIFEST
    if not path.exists():
        raise ModelFormatError(f"{root} has no {MANIFEST}, so it is not an export directory; "
                               "run 'toolkit export MODEL --out DIR' first")
    data = read_json_object(path, EXPORT_FIX)
    if data.get("format") != FORMAT:
        raise ModelFormatError(f"{path} is not an ONNX export manifest (format {short_repr(data.get('format'))}); "
                               "re-run 'toolkit export'")
    if Config(data, str(path), EXPORT_FIX).integer("format_version", 0, 2 ** 31, 0) > FORMAT_VERSION:
        raise ModelFormatError(f"{path} has format version {data['format_version']}, newer than this toolkit "
                               f"reads ({FORMAT_VERSION}); upgrade at-diffusion-toolkit")
    for key in ("spec", "precision", "components", "files"):
        if key not in data:
            raise ModelFormatError(f"{path} lacks '{key}'; it is damaged, re-run 'toolkit export'")
    _check_types(Config(data, str(path), EXPORT_FIX))
    try:
        _check_paths_and_names(data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelFormatError(f"{path} is damaged ({type(exc).__name__}: {exc}); re-run 'toolkit export'") from None
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}; this is not a manifest 'toolkit export' writes, re-run it") from None
    return ExportManifest(root, data)


def _check_types(manifest: Config) -> None:
    """Every field the runtime reads, typed and bounded (runtime/config_checks.py) before anything is built from it:
    the precision, the spec (sizes, scheduler config), the files' entries, each component and its contract, and
    the settings export validation re-runs."""
    manifest.text("precision", choices=PRECISIONS)
    ModelSpec.from_dict(manifest.data["spec"], manifest.source, manifest.fix)
    files = manifest.section("files")
    for rel in files.data:
        entry = files.section(rel)
        entry.integer("bytes", 0, 2 ** 50)
        if not SHA256.match(entry.text("sha256")):
            raise entry.error("sha256", entry.data["sha256"], "64 lowercase hex digits")
    components = manifest.section("components")
    if len(components.data) > MAX_COMPONENTS:
        raise manifest.error("components", list(components.data), f"at most {MAX_COMPONENTS} components")
    for name in components.data:
        component = components.section(name)
        component.text("file", max_length=1024)
        component.text("precision", choices=PRECISIONS)
        component.text("note", "", max_length=2000)
        ExportContract.from_dict(component.section("contract"))
    settings = manifest.section("settings", {})
    settings.integers("batch_sizes", 1, MAX_PROFILE_DIM, 64, None)
    for side in ("height", "width"):
        settings.integer(side, 1, MAX_PROFILE_DIM, None)


def _check_paths_and_names(data: dict) -> None:
    """Every listed file a plain relative path, every component's file listed (so it is hashed), every component
    and tensor name a SAFE_NAME."""
    files = data["files"]
    for rel, entry in files.items():
        _check_relative(rel)
        if not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise ModelFormatError(f"file entry '{rel}' lacks its bytes and sha256")
    for name, component in data["components"].items():
        _check_name(name, "component name")
        if component["file"] not in files:
            raise ModelFormatError(f"component '{name}' file '{component['file']}' is not listed in 'files' "
                                   "(so it would never be hashed)")
        contract = component["contract"]
        for tensor in (*contract["inputs"], *contract["outputs"]):
            _check_name(tensor["name"], f"component '{name}' tensor name")


def _check_name(name, what: str) -> None:
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise ModelFormatError(f"{what} {name!r} is not a plain name (letters, digits, '_', '.', '-'; "
                               "at most 64; no '..')")


def _check_relative(rel) -> None:
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if (not parts or PurePosixPath(rel).is_absolute() or "\\" in rel or PurePosixPath(*parts).as_posix() != rel
            or any(part in (".", "..") for part in parts)):
        raise ModelFormatError(f"listed file {rel!r} is not a relative path inside the export (absolute, '..', "
                               "or not normalised)")


def verify_files(manifest: ExportManifest) -> None:
    """Check every listed file's size and sha256; raise ModelFormatError naming the first bad file."""
    for rel in sorted(manifest.data["files"]):
        _verify_file(manifest, rel)


def _verify_file(manifest: ExportManifest, rel: str) -> Path:
    entry, path = manifest.data["files"][rel], manifest.file(rel)
    if not path.is_file():
        raise ModelFormatError(f"export file {path} is missing; the export is incomplete, "
                               "re-run 'toolkit export'")
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ModelFormatError(f"export file {path} does not match its sha256 in {MANIFEST} (modified or "
                               "corrupted since export); re-run 'toolkit export' or restore the file")
    return path


def folder_files(manifest: ExportManifest, folder: str) -> list[str]:
    """The manifest-listed files under ``folder`` (e.g. 'tokenizer'); a ModelFormatError naming the first file
    there that the manifest does not list (it would be read unhashed)."""
    listed = sorted(rel for rel in manifest.data["files"] if PurePosixPath(rel).parts[0] == folder)
    for base, _, names in os.walk(manifest.root / folder):
        for name in names:
            rel = (Path(base) / name).relative_to(manifest.root).as_posix()
            if rel not in manifest.data["files"]:
                raise ModelFormatError(f"export file {manifest.root / rel} is not listed in {MANIFEST}, so it "
                                       "is not hashed; remove it or re-run 'toolkit export'")
    return listed


def verified_folder(manifest: ExportManifest, folder: str) -> Path:
    """``root/folder`` once every file in it is listed and matches its sha256 (``folder_files``)."""
    for rel in folder_files(manifest, folder):
        _verify_file(manifest, rel)
    return manifest.root / folder
