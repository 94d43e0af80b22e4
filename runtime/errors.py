"""User-facing errors: anything raised as a ``ToolkitError`` is bad input or a missing
requirement, and the CLI prints its message as one line on stderr (no traceback) and exits 2.
Messages say what was wrong and what to do, e.g. "export dir has no manifest.json; run 'toolkit export'"."""
from __future__ import annotations

import functools
import re
import sys


class ToolkitError(Exception):
    """Bad input or a missing requirement; the message names the problem and the fix."""


# How diffusers / transformers / safetensors report a weights file they cannot read (truncated, corrupt, not
# safetensors): wherever weights are read (generate, export, train --init, eval), the CLI turns these into one
# line naming the file. Matched on the libraries' messages because they raise plain OSError / their own types.
_WEIGHTS_MESSAGES = ("Unable to load weights from", "Error while deserializing header", "incomplete metadata",
                     "MetadataIncompleteBuffer", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeader")
_WEIGHTS_FILE = re.compile(r"['\"]?([^'\"\s]+\.(?:safetensors|bin|pt|pth|ckpt|onnx))['\"]?")


def unreadable_weights(exc: BaseException) -> ToolkitError | None:
    """A ToolkitError naming the file when ``exc`` is a library's 'cannot read these weights', else None."""
    text = str(exc)
    if not any(m in text for m in _WEIGHTS_MESSAGES) and type(exc).__name__ != "SafetensorError":
        return None
    found = _WEIGHTS_FILE.search(text)
    path = found.group(1) if found else _file_in_traceback(exc)
    where = f"weights file {path}" if path else "a weights file"
    first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
    return ToolkitError(f"cannot read {where}: it is truncated or corrupt ({first}); re-create it (re-run the "
                        "training or export that wrote it) or point at another model")


def _file_in_traceback(exc: BaseException) -> str | None:
    """The weights file the failing library call was reading, from its frames' locals (transformers and
    safetensors do not put the path in their message; the innermost frame naming one is the file)."""
    import os
    found, tb = None, exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and _WEIGHTS_FILE.fullmatch(os.fspath(value)):
                found = os.fspath(value)
        tb = tb.tb_next
    return found


# The extra that brings a third-party package, for commands outside train/export/eval (whose own extra is named).
_PACKAGE_EXTRA = {"torch": "torch", "torchvision": "torch", "diffusers": "torch", "transformers": "torch",
                  "accelerate": "train", "onnx": "export", "onnxscript": "export", "onnxruntime": "onnxruntime",
                  "open_clip": "eval", "scipy": "eval", "matplotlib": "eval", "fastapi": "serve",
                  "uvicorn": "serve", "prometheus_client": "serve", "httpx": "serve"}
_COMMAND_GROUPS = ("train", "export", "eval")


def missing_package(exc: BaseException, command) -> ToolkitError | None:
    """A ToolkitError naming the missing package and the extra that installs it, when ``exc`` is a third-party
    import failing because the install was a slim one (e.g. `pip install '.[onnxruntime,serve]'`), else None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    package = exc.name.split(".")[0]
    if package not in _PACKAGE_EXTRA:
        return None
    parts = getattr(command, "__module__", "").split(".")   # atdiff.train.adm.adm_cli -> train
    group = parts[1] if parts[0] == "atdiff" and len(parts) > 1 else ""
    extra = group if group in _COMMAND_GROUPS else _PACKAGE_EXTRA[package]
    return ToolkitError(f"this command needs the package '{package}', which this install does not have: "
                        f"pip install 'at-diffusion-toolkit[{extra}]' (in a checkout: pip install -e '.[{extra}]'; "
                        "'.[dev]' installs everything)")


def handles_errors(command):
    """Decorate a typer command so a ToolkitError (or an unreadable weights file) becomes one stderr line and
    exit code 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer  # imported lazily: runtime/ is embeddable without the CLI
        try:
            return command(*args, **kwargs)
        except ToolkitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None
        except Exception as exc:
            converted = unreadable_weights(exc) or missing_package(exc, command)
            if converted is None:
                raise
            print(f"error: {converted}", file=sys.stderr)
            raise typer.Exit(code=2) from None
    return wrapper
