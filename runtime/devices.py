"""The one ``--device`` of every command (generate, export, serve, eval, bench) and of ``Pipeline.load``.

A device is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; every command defaults to ``auto``. ``auto`` is CUDA when
what will run (a backend: torch, onnxruntime; or both, for export) can use a GPU, else the CPU, and the command
says which it used. An explicit ``cuda`` that cannot be reached is an error naming the fix, never a silent CPU
run. This module only parses and decides: each backend reports what it can reach as a ``DeviceSupport``
(probed only when the answer matters), so it imports neither torch nor onnxruntime.

    resolve_device("auto", TorchBackend.device_support)   # -> "cuda" or "cpu"
    parse_device("cuda:1")                                # -> ("cuda", 1)
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from atdiff.runtime.errors import ToolkitError

FORMS = "auto, cpu, cuda or cuda:N (N: a GPU index, e.g. cuda:0)"
DEVICE_HELP = "auto (CUDA when it can run there, else CPU; the device used is printed) | cpu | cuda | cuda:N"
_FORM = re.compile(r"auto|cpu|cuda(?::(\d+))?")


class DeviceError(ToolkitError, ValueError):
    """A ``--device`` that is not one of the accepted forms, or a GPU that what runs cannot reach."""


@dataclasses.dataclass(frozen=True)
class DeviceSupport:
    """What one backend can run on: whether CUDA is usable and, when it is not, why and how to fix it."""
    backend: str                   # who was asked, e.g. "torch", "onnxruntime"
    cuda: bool
    gpu_count: int | None = None   # GPUs it sees, when it can tell
    missing: str = ""              # why CUDA is not usable, e.g. "torch 2.5.1+cpu sees no CUDA GPU"
    fix: str = ""                  # what to do about it, e.g. "install a CUDA build of torch"

    def both(self, other: "DeviceSupport") -> "DeviceSupport":
        """The support of work that runs on both (export traces with torch and validates with onnxruntime)."""
        lacking = [s for s in (self, other) if not s.cuda]
        counts = [c for c in (self.gpu_count, other.gpu_count) if c is not None]
        return DeviceSupport(f"{self.backend} and {other.backend}", not lacking, min(counts) if counts else None,
                             " and ".join(s.missing for s in lacking), " and ".join(s.fix for s in lacking))


def parse_device(device: str) -> tuple[str, int | None]:
    """``'auto'``, ``'cpu'``, ``'cuda'`` -> (that, None); ``'cuda:N'`` -> ('cuda', N). Anything else is a
    DeviceError naming the value and the accepted forms."""
    match = _FORM.fullmatch(device) if isinstance(device, str) else None
    if match is None:
        raise DeviceError(f"unknown device '{device}'; use {FORMS}")
    if match.group(1) is not None:
        return "cuda", int(match.group(1))
    return device, None


def resolve_device(device: str, support: Callable[[], DeviceSupport]) -> str:
    """The device to run on, ``'cpu'``, ``'cuda'`` or ``'cuda:N'``: ``'auto'`` is ``'cuda'`` when
    ``support()`` says CUDA is usable, else ``'cpu'``. A CUDA device it cannot reach is a DeviceError with the
    fix. ``support`` is called only when the answer depends on it (never for ``cpu`` or a malformed value)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return "cpu"
    found = support()
    if kind == "auto":
        return "cuda" if found.cuda else "cpu"
    if not found.cuda:
        raise DeviceError(f"device '{device}' asked for, but {found.missing}; {found.fix}, "
                          "or pass --device cpu (or auto: CUDA when there is one, else CPU)")
    if index is not None and found.gpu_count is not None and index >= found.gpu_count:
        raise DeviceError(f"device '{device}' asked for, but {found.backend} sees {found.gpu_count} GPU(s); "
                          f"use cuda:0 to cuda:{found.gpu_count - 1}")
    return device


def gpu_index(device: str) -> int | None:
    """A device's GPU index: None for the CPU, N for ``cuda:N``, 0 for ``cuda`` (the first GPU)."""
    kind, index = parse_device(device)
    if kind == "auto":
        raise DeviceError("device 'auto' has no GPU index until it is resolved (resolve_device)")
    return None if kind == "cpu" else (index or 0)


__all__ = ["DEVICE_HELP", "FORMS", "DeviceError", "DeviceSupport", "gpu_index", "parse_device", "resolve_device"]
