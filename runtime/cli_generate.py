"""``toolkit generate``: load, generate with a progress bar, write PNGs with their generation record."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from runtime.default_model import BUNDLED, default_model
from runtime.errors import ToolkitError
from runtime.fingerprint import model_sha256
from runtime.generation import GenerationOptions
from runtime.images import reserve_new_path, save_png
from runtime.pipeline import Pipeline, PromptTruncatedWarning
from runtime.progress import console, progress_bars
from runtime.provenance import versions
from runtime.staging import check_writable


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def run_generate(options: GenerationOptions, *, model, backend, backend_option, device, dtype, out) -> None:
    model = model or default_model()
    bundled = Path(model) == BUNDLED
    backend_options = parse_options(backend_option or [])
    if Path(out).exists() and not Path(out).is_dir():  # fail before the slow part, not when writing
        raise ToolkitError(f"--out {out} is a file; pass a directory for the PNGs")
    check_writable(out)
    options.precheck()
    with Pipeline.load(model, backend=backend, device=device, dtype=dtype, **backend_options) as pipe:
        console.print(f"model {pipe.spec.name} ({pipe.spec.kind}, {pipe.source.path}) on {pipe.backend.describe()}")
        with progress_bars() as tracker, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            output = pipe.generate(options, progress=tracker("generate", None))
        for warning in caught:
            console.print(f"warning: {warning.message}", markup=False, highlight=False)
        source = {"model": str(model), "model_sha256": model_sha256(pipe.source.path)}
    paths = write_images(output, Path(out), source)
    for path in paths:
        print(path)
    t = output.timings
    console.print(f"{len(paths)} image(s) in {t['total_s']:.2f} s (text {t['encode_s']:.2f} s, "
                  f"sampling {t['sample_s']:.2f} s, decode {t['decode_s']:.2f} s) on {output.backend}")
    if bundled:
        console.print(BUNDLED_HINT, highlight=False)


BUNDLED_HINT = ("this is the bundled demo model: it draws 32x32 Fashion-MNIST clothes, not astronauts; for 512 px "
                "photographs use --model SimianLuo/LCM_Dreamshaper_v7 (needs network access or a populated HF cache)")


def parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> a dict; values read as JSON where they parse (true, 4, 0.5), else as text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ToolkitError(f"backend option '{pair}' is not KEY=VALUE, e.g. --backend-option cuda_graph=true")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def write_images(output, out_dir: Path, source: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = output.prompts or [None] * len(output.seeds)
    paths = []
    for array, seed, text in zip(output.arrays, output.seeds, prompts):
        name = f"{slug(text)}-seed{seed}.png" if text is not None else f"sample-seed{seed}.png"
        record = {"prompt": text, "seed": seed, **source, "backend": output.backend,
                  **output.request, "versions": versions()}
        paths.append(save_png(array, reserve_new_path(out_dir / name), record))
    return paths
