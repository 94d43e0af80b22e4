"""Image conversion at the pipeline's edge: model range [-1, 1] -> uint8 HWC -> PIL / PNG with metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from atdiff.runtime.staging import atomic_file


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] float in about [-1, 1] -> [N, H, W, 3] uint8, rounded as diffusers' image processor does."""
    images = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    images = (images * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def to_pil(arrays: np.ndarray) -> list:
    from PIL import Image
    return [Image.fromarray(a) for a in arrays]


def reserve_new_path(path: Path) -> Path:
    """``path``, or ``stem-1.png``, ``stem-2.png``, ... : the first name nobody has, created empty (O_EXCL, so two
    processes writing into one folder never pick the same name). Existing images are never overwritten."""
    import os
    stem, suffix = path.stem, path.suffix
    for k in range(100000):
        candidate = path if k == 0 else path.with_name(f"{stem}-{k}{suffix}")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free file name for {path} after 100000 tries")


def png_bytes(array: np.ndarray, metadata: dict) -> bytes:
    """One image as PNG bytes with its generation record (prompt, seed, model, versions) in a text chunk."""
    import io

    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("at-diffusion-toolkit", json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(array: np.ndarray, path: Path, metadata: dict) -> Path:
    """Write ``png_bytes`` via a temporary file, so an interrupted run never leaves a truncated PNG."""
    with atomic_file(path, suffix=".png.tmp") as handle:
        handle.write(png_bytes(array, metadata))
    return path
