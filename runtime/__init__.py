"""The toolkit's runtime: what other services embed. ``from atdiff.runtime import Pipeline``.

Importing this package pulls in neither torch nor onnxruntime; a backend's package is imported when the
backend is asked for, so a service running an ONNX export needs only numpy, onnxruntime and tokenizers.
"""
from __future__ import annotations

from atdiff.runtime.errors import ToolkitError

__all__ = ["Pipeline", "GenerationOutput", "ToolkitError"]


def __getattr__(name: str):
    # Lazy so that `import atdiff.runtime.errors` (used by every CLI module) stays cheap.
    if name in ("Pipeline", "GenerationOutput"):
        from atdiff.runtime import generation, pipeline
        return pipeline.Pipeline if name == "Pipeline" else generation.GenerationOutput
    raise AttributeError(f"module 'atdiff.runtime' has no attribute {name!r}")
