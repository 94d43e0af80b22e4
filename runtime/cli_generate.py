"""``toolkit generate``: load, generate with a progress bar, write PNGs with their generation record."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from atdiff.runtime.default_model import BUNDLED, default_model
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.fingerprint import model_sha256
from atdiff.runtime.generation import GenerationOptions
from atdiff.runtime.images import reserve_new_path, save_png
from atdiff.runtime.pipeline import Pipeline, PromptTruncatedWarning
from atdiff.runtime.progress import console, progress_bars
from atdiff.runtime.provenance import versions
from atdiff.runtime.staging import check_writable


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def run_generate(options: GenerationOptions, *, model, backend, backend_option, device, dtype, out) -> None:
    model = model or default_model()
    bundled = Path(model) == BUNDLED
    backend_options = parse_options(backend_option or [])
    target = single_png_target(Path(out), options)   # fail before the slow part, not when writing
    if target is None and Path(out).exists() and not Path(out).is_dir():
        raise ToolkitError(f"--out {out} is a file; pass a directory for the PNGs, or a new NAME.png for one image")
    check_writable(target.parent if target else out)
    options.precheck()
    with Pipeline.load(model, backend=backend, device=device, dtype=dtype, **backend_options) as pipe:
        console.print(f"model {pipe.spec.name} ({pipe.spec.kind}, {pipe.source.path}) on {pipe.backend.describe()}")
        with progress_bars() as tracker, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            output = pipe.generate(options, progress=tracker("generate", None))
        for warning in caught:
            console.print(f"warning: {warning.message}", markup=False, highlight=False)
        source = {"model": str(model), "model_sha256": model_sha256(pipe.source.path)}
    paths = write_images(output, Path(out), source, target)
    for path in paths:
        print(path)
    t = output.timings
    console.print(f"{len(paths)} image(s) in {t['total_s']:.2f} s (text {t['encode_s']:.2f} s, "
                  f"sampling {t['sample_s']:.2f} s, decode {t['decode_s']:.2f} s) on {output.backend}")
    if bundled:
        console.print(BUNDLED_HINT, highlight=False)


BUNDLED_HINT = ("this is the bundled demo model: it draws 32x32 Fashion-MNIST clothes, not astronauts; for 512 px "
                "photographs use --model SimianLuo/LCM_Dreamshaper_v7 (needs network access or a populated HF cache)")


def one_step_count(steps: int | None, nfe: int | None) -> int | None:
    """``--steps``, or ``--nfe``, its other name (every sampler here makes one network evaluation per step); given
    both, they must agree."""
    if steps is not None and nfe is not None and steps != nfe:
        raise ToolkitError(f"--steps {steps} and --nfe {nfe} disagree; --nfe is another name for --steps (one network "
                           "evaluation per step): pass one of them")
    return steps if steps is not None else nfe


def parse_options(pairs: list[str], flag: str = "--backend-option", example: str = "cuda_graph=true") -> dict:
    """``KEY=VALUE`` strings (given with ``flag``) -> a dict; values read as JSON where they parse (true, 4, 0.5),
    else as text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ToolkitError(f"{flag} '{pair}' is not KEY=VALUE, e.g. {flag} {example}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def sampler_options(pairs: list[str] | None, eta: float | None = None) -> dict | None:
    """``--sampler-option KEY=VALUE`` strings (and DDIM's ``--eta``) -> the sampler's keyword options, or None."""
    options = parse_options(pairs or [], "--sampler-option", "use_clipped_model_output=true")
    if eta is not None:
        options["eta"] = eta
    return options or None


def single_png_target(out: Path, options: GenerationOptions) -> Path | None:
    """``--out NAME.png`` (not an existing directory): the file of the one image asked for; None: --out is the
    directory of the PNGs. Never overwrites, and refuses a request for more than one image."""
    if out.suffix.lower() != ".png" or out.is_dir():
        return None
    if out.exists():
        raise ToolkitError(f"--out {out} exists and is never overwritten: pass a new NAME.png, or a directory")
    lists = [v for v in (options.prompts, options.seeds, options.class_labels) if v is not None and not
             isinstance(v, (str, int))]
    if (options.num_images or 1) > 1 or any(len(v) > 1 for v in lists):
        raise ToolkitError(f"--out {out} names one PNG but more than one image was asked for; pass a directory")
    return out


def write_images(output, out_dir: Path, source: dict, target: Path | None = None) -> list[Path]:
    """One PNG per image in ``out_dir`` (NAME-seedN.png, never overwriting), or the one image at ``target``."""
    (target.parent if target else out_dir).mkdir(parents=True, exist_ok=True)
    if target is not None and len(output.arrays) != 1:
        raise ToolkitError(f"--out {target} names one PNG but {len(output.arrays)} images were made")
    prompts = output.prompts or [None] * len(output.seeds)
    paths = []
    for array, seed, text in zip(output.arrays, output.seeds, prompts):
        name = f"{slug(text)}-seed{seed}.png" if text is not None else f"sample-seed{seed}.png"
        record = {"prompt": text, "seed": seed, **source, "backend": output.backend,
                  **output.request, "versions": versions()}
        paths.append(save_png(array, reserve_new_path(target or out_dir / name), record))
    return paths
