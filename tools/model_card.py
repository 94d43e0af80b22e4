"""The model card of the bundled demo models (models/default/README.md), written by tools/bundle_default_model.py from
the demo study's records: what the models are, their data and licenses, the commands that made them, the
numbers measured (from the study's report when it exists), their limits, and the sha256 of every bundled file in
``sha256sum -c`` format (tests/test_bundled_model.py checks it)."""
from __future__ import annotations

import json
from pathlib import Path

from studies.demo_study import STUDENTS
from studies.demo_study_report import LABELS

HEADER = """# The bundled demo models

`default/` is the model `toolkit generate` and `toolkit export` use without `--model`; `default-teacher/` is the
teacher `toolkit train lcm-at` distils without `--teacher`, on `demo-data/`. They are made offline on a 2-core CPU
by `python -m studies.repro_demo --out DIR` and bundled by `python -m tools.bundle_default_model --study DIR`.

- **What they draw**: 32x32 pictures of clothes in the ten Fashion-MNIST classes (t-shirt, trousers, pullover,
  dress, coat, sandal, shirt, sneaker, bag, ankle boot), from prompts such as "a photo of a sneaker". Any other
  prompt (an astronaut, a jungle) still gives a garment: the text encoder has only ever seen these captions. For
  real 512 px images use a real model, e.g. `--model SimianLuo/LCM_Dreamshaper_v7` (network or HF cache).
- **Parts** (all diffusers / transformers classes): AutoencoderKL 32x32x3 -> 8x8x4 (`toolkit train vae`), a
  CLIPTextModel (hidden 64, 2 layers) trained jointly with the teacher's UNet2DConditionModel from random init
  (`toolkit train teacher`, 10% caption dropout for classifier-free guidance), the real CLIP BPE tokenizer; the
  student is the {label} distillation of that teacher (`toolkit train {student}`). `default-teacher/` links the
  student's text encoder, VAE and tokenizer (the same frozen weights).
- **Data and licenses**: Fashion-MNIST (Zalando Research, MIT license), captioned from class names and templates
  (`toolkit train captions`); the CLIP tokenizer vocabulary (OpenAI CLIP, MIT license). `demo-data/` holds the
  first training images with their captions. The weights are released with this toolkit.
- **Limits**: 32x32 only; ten classes; grayscale content in RGB; prompt words outside the captions' vocabulary are
  ignored or confuse it; no safety checker (nothing it can draw needs one).
"""


def _params(model: Path) -> dict[str, int]:
    import numpy as np
    from safetensors import safe_open
    counts = {}
    for path in sorted(model.glob("*/*.safetensors")):
        with safe_open(path, "np") as f:
            counts[path.parent.name] = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return counts


def _measured(study: Path) -> list[str]:
    table = study / "report" / "table.md"
    if not table.is_file():
        return ["(the study's evaluation had not finished when these weights were bundled; see docs/results.md)"]
    # the report's metric tables; its training table is left out: runs copied into a study (a bundled teacher, a
    # student measured earlier) have no training log there, and the card's header says how each part was trained
    sections = table.read_text().split("\n### ")
    kept = [x for x in sections if not x.startswith(("Training", "### Training")) and "(not measured yet)" not in x]
    return ["From the study's report (docs/results.md has the full tables, seeds and commands):", "",
            *"\n### ".join(kept).splitlines()]


def _winner(study: Path, student: str) -> list[str]:
    """Which student the study measured better, by how much: classifier FID per step count (the report's means)."""
    path = study / "report" / "results.json"
    agg = json.loads(path.read_text())["aggregate"] if path.is_file() else []
    fid = {(a["model"], a["steps"]): a for a in agg if a["metric"] == "fmnist-classifier" and a["model"] in STUDENTS}
    other = next(m for m in STUDENTS if m != student)
    steps = sorted(s for m, s in fid if m == student and (other, s) in fid)
    if not steps:
        return [f"This model is the {LABELS[student]} student; the study's report compares no other student with it."]
    gaps = ", ".join(f"{fid[(other, s)]['mean'] - fid[(student, s)]['mean']:+.2f} at {s} step{'s' * (s > 1)}"
                     for s in steps)
    return [f"This model is the {LABELS[student]} student. Classifier FID of {LABELS[other]} minus this model's "
            f"(positive: this model is better; means over the seeds in the table below): {gaps}."]


def _linked(root: Path, path: Path) -> bool:
    """Whether ``path`` is, or lies under, a symlink below ``root`` (linked files are hashed where they live)."""
    rel = path.relative_to(root)
    return any((root / q).is_symlink() for q in (rel, *rel.parents))


def _hashes(root: Path) -> list[str]:
    from atdiff.runtime.provenance import sha256_file
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md" and not _linked(root, p))
    return [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in files]


def write_card(root: Path, study: Path, checks: dict, student: str) -> Path:
    precision = [f"- `{name}`: {c['precision']} weights; the float16 copy against the float32 original, both run "
                 f"in float32: mean |pixel diff| {c['mean_abs_pixel_diff']:.4f}, max {c['max_abs_pixel_diff']}/255, "
                 f"classifier labels agree on {c['label_agreement']:.0%} of {c['images']} images at {c['steps']} steps"
                 for name, c in checks.items()]
    params = {name: _params(root / d) for name, d in (("student", "default"), ("teacher", "default-teacher"))}
    (root / "default" / "bundle.json").write_text(json.dumps(checks, indent=2) + "\n")
    lines = [HEADER.format(label=LABELS[student], student=student), "## Precision", "", *precision, "",
             "## Parameters", "",
             *[f"- {name}: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in p.items()) for name, p in params.items()],
             "", "## Measured", "", *_winner(study, student), "",
             *_measured(study), "", "## Files (sha256, paths relative to models/; `sha256sum -c` takes this block)",
             "", "```", *_hashes(root), "```", ""]
    card = root / "default" / "README.md"
    card.write_text("\n".join(lines))
    return card
