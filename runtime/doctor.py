"""``toolkit doctor``: what this machine can run, as a table (never raises: it reports what is missing)."""
from __future__ import annotations

import importlib
from importlib import metadata

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _version(module: str) -> str | None:
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _torch_rows() -> list[tuple[str, str, str]]:
    try:
        import torch
    except ImportError:
        return [("torch", "missing", "pip install torch")]
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return [("torch", torch.__version__, f"CUDA {torch.version.cuda}: {gpus}")]
    return [("torch", torch.__version__, "no CUDA GPU visible: CPU only")]


def _ort_rows() -> list[tuple[str, str, str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [("onnxruntime", "missing", "pip install onnxruntime (or the [gpu] extra)")]
    from atdiff.runtime.backends.ort_backend import GPU_EXTRA_HINT
    providers = ort.get_available_providers()
    note = "" if "CUDAExecutionProvider" in providers else f" (CUDA: {GPU_EXTRA_HINT})"
    if _version("onnxruntime") and _version("onnxruntime-gpu"):
        note += " -- BROKEN: onnxruntime and onnxruntime-gpu are both installed and overwrite each other; " \
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    return [("onnxruntime", ort.__version__, ", ".join(providers) + note)]


def _plain_rows() -> list[tuple[str, str, str]]:
    rows = []
    tensorrt_hint = "pip install -e '.[tensorrt]' (in the toolkit's checkout; NVIDIA GPU)"
    for module, dist, hint in (("tensorrt", "tensorrt", tensorrt_hint),
                               ("diffusers", "diffusers", ""), ("transformers", "transformers", ""),
                               ("onnx", "onnx", ""), ("polygraphy", "polygraphy", ""),
                               ("open_clip", "open_clip_torch", ""), ("accelerate", "accelerate", "")):
        try:
            importlib.import_module(module)
            rows.append((module, _version(dist) or "?", "ok"))
        except Exception as exc:  # a broken install (e.g. a mismatched torchvision) is also worth showing
            rows.append((module, "missing" if isinstance(exc, ImportError) else "broken",
                         hint or f"{type(exc).__name__}: {exc}"[:100]))
    return rows


def report() -> None:
    table = Table(title="toolkit doctor")
    for column in ("component", "version", "status"):
        table.add_column(column)
    for row in _torch_rows() + _ort_rows() + _plain_rows():
        # escape: rich would read "[gpu]" in the install hints (and brackets in errors) as markup and drop it
        table.add_row(*(escape(cell) for cell in row))
    Console().print(table)
