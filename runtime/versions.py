"""Installed versions of the packages that change results, for the record every output carries (PNG
metadata, export manifests, eval results). Read from package metadata, so nothing heavy is imported."""
from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata

# What can change generated pixels: the toolkit itself and the backends' packages.
RUNTIME_PACKAGES = ("at-diffusion-toolkit", "numpy", "torch", "diffusers", "transformers", "tokenizers",
                    "onnxruntime", "onnxruntime-gpu", "tensorrt")


def package_versions(dists: Iterable[str] = RUNTIME_PACKAGES) -> dict[str, str]:
    """``{distribution: version}`` for those of ``dists`` that are installed (absent ones are left out);
    a source checkout that was never pip-installed is named as such rather than dropped."""
    found = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "at-diffusion-toolkit" in dists:
        found.setdefault("at-diffusion-toolkit", "not installed (source checkout)")
    return found
