"""Backend registry. Backends are imported by name only when asked for, so `import atdiff.runtime` needs
neither torch nor onnxruntime: a service serving an exported model installs just its backend."""
from __future__ import annotations

import importlib

from atdiff.runtime.backends.base import Backend, BackendError

# name -> "module:Class"; adding a backend is one line here plus its module.
_REGISTRY: dict[str, str] = {
    "torch": "atdiff.runtime.backends.torch_backend:TorchBackend",
    "onnxruntime": "atdiff.runtime.backends.ort_backend:OrtBackend",
}

# What to install when a backend's package is missing.
_INSTALL_HINT = {
    "torch": "pip install 'at-diffusion-toolkit[torch]' (in the toolkit's checkout: pip install -e '.[torch]')",
    "onnxruntime": "pip install 'at-diffusion-toolkit[onnxruntime]' (CPU) or, for CUDA, pip uninstall -y onnxruntime && "
                   "pip install -e '.[gpu]' (in the toolkit's checkout)",
    "tensorrt": "pip install -e '.[tensorrt]' (in the toolkit's checkout) on a machine with an NVIDIA GPU",
}


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


# Named in the design but not built yet: say so rather than "unknown".
_PLANNED = {"tensorrt": "the TensorRT backend is planned (engines built from the export contracts) but not "
                        "implemented yet; use --backend onnxruntime (CUDA EP with CUDA graphs) or torch"}


def get_backend_class(name: str) -> type[Backend]:
    if name in _PLANNED:
        raise BackendError(_PLANNED[name])
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend '{name}'; choose one of: {', '.join(available_backends())}")
    module_name, cls_name = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = _INSTALL_HINT.get(name, "install its package")
        raise BackendError(f"backend '{name}' needs the package '{exc.name}': {hint}") from None
    return getattr(module, cls_name)


__all__ = ["Backend", "BackendError", "available_backends", "get_backend_class"]
