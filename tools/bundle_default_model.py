"""Bundle the demo study's models as the toolkit's defaults (run once per release, then commit models/):

    python -m tools.bundle_default_model --study /work/study/demo --out models [--replace]

- ``models/default``: the student pipeline named by ``--student`` (the better one measured: plain LCM since
  docs/results.md part II; ``lcm-at`` rebuilds the earlier bundle), what ``toolkit generate`` and ``toolkit
  export`` use without ``--model``; weights in float16 when that validates (the fp16 copy, run in float32 on a CPU
  as the runtime does, must give the classifier's labels and pixels within the stated tolerance of the float32
  original; otherwise the float32 weights ship and the card says so);
- ``models/default-teacher``: the teacher, what ``toolkit train lcm-at`` distils without ``--teacher``; its text
  encoder, VAE and tokenizer are the student's files (relative symlinks: LCM distillation keeps them frozen), its
  toolkit.json carries the default distillation recipe and names the bundled data;
- ``models/demo-data``: the first ``--data-num`` captioned Fashion-MNIST training images as one webdataset shard;
- a model card (README.md) in models/default with data and licenses, commands, measured numbers from the study's
  report (when it exists), limits, and the sha256 of every bundled file (``sha256sum -c`` format; a test checks it).
Each directory is written atomically; existing ones are replaced only with ``--replace``, and only when ``--out`` is
a bundle this script wrote: every file in it is one the model card's sha256 list names (plus the card itself and
the teacher's links). Anything else there (a folder of someone's files, a model put beside the bundle) is refused
with one ``error:`` line and exit 2 before anything is read or written: replacing would delete it.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from atdiff.runtime.errors import ToolkitError
from studies.demo_study import STUDENTS

SHARED = ("text_encoder", "vae", "tokenizer")
PARTS = ("default", "default-teacher", "demo-data")   # what the script writes under --out
CARD = "default/README.md"                            # its sha256 list names every other file of a bundle
_CARD_LINE = re.compile(r"^[0-9a-f]{64}  (\S+)$", re.M)
# Validation of the fp16 copy: 40 images (10 class prompts x 4 seeds, 4 steps), float32 runtime on the CPU.
FP16_MAX_MEAN_ABS = 2.0 / 255     # mean |pixel difference| in [0, 1] units
FP16_MIN_LABEL_AGREEMENT = 0.95   # the classifier's labels of the two sets of images


def save_pipeline(source: Path, dest: Path, fp16: bool) -> None:
    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch.float16 if fp16 else torch.float32)
    pipe.save_pretrained(dest)
    for config in dest.glob("*/config.json"):  # the build machine's paths are not part of the model
        data = json.loads(config.read_text())
        data.pop("_name_or_path", None)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name in ("toolkit.json", "training.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def validate_fp16(original: Path, candidate: Path) -> dict:
    """Images of the float32 original vs the float16 copy (both run in float32 on the CPU)."""
    import numpy as np

    from atdiff.eval.classifier import FashionClassifierFeatures
    from atdiff.eval.fashion_prompts import class_prompts
    from atdiff.runtime.pipeline import Pipeline

    def images(path: Path):
        with Pipeline.load(str(path), backend="torch", device="cpu") as pipe:
            return np.concatenate([pipe([p], num_images=4, steps=4, seed=0).arrays for p in class_prompts()])

    a, b = images(original), images(candidate)
    classifier = FashionClassifierFeatures(device="cpu")
    mean_abs = float(np.abs(a.astype(np.float64) - b).mean() / 255)
    agreement = float((classifier.predict(a) == classifier.predict(b)).mean())
    return {"images": len(a), "steps": 4, "mean_abs_pixel_diff": mean_abs,
            "max_abs_pixel_diff": int(np.abs(a.astype(np.int16) - b).max()), "label_agreement": agreement,
            "passed": mean_abs <= FP16_MAX_MEAN_ABS and agreement >= FP16_MIN_LABEL_AGREEMENT}


def bundle_model(source: Path, dest: Path) -> dict:
    """``source`` -> ``dest`` in float16 if it validates, else float32; returns the validation record."""
    from atdiff.runtime.staging import staged_directory
    with staged_directory(dest, "model_index.json", "model") as tmp:
        save_pipeline(source, tmp, fp16=True)
        check = validate_fp16(source, tmp)
        if not check["passed"]:
            shutil.rmtree(tmp)
            tmp.mkdir()
            save_pipeline(source, tmp, fp16=False)
    return {**check, "precision": "float16" if check["passed"] else "float32"}


def link_shared(teacher: Path, student: Path) -> None:
    """The teacher's frozen parts are byte-identical to the student's: keep one copy, link the other."""
    from atdiff.runtime.provenance import files_sha256
    for part in SHARED:
        if files_sha256(teacher / part) != files_sha256(student / part):
            raise ToolkitError(f"{teacher / part} differs from {student / part}; they must be the same weights")
        shutil.rmtree(teacher / part)
        (teacher / part).symlink_to(Path("..") / student.name / part)


def write_recipe(teacher: Path, recipe: dict) -> None:
    path = teacher / "toolkit.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, "distillation": recipe}, indent=2) + "\n")


def bundle_data(dest: Path, num: int) -> None:
    from atdiff.runtime.staging import staged_directory
    from atdiff.train.demo.fashion_captions import write_shards
    with staged_directory(dest, "fmnist-train-000.tar", "data") as tmp:
        write_shards(tmp, split="train", num=num, per_shard=num)


def check_out(out: Path, replace: bool) -> None:
    """Refuse an ``--out`` the bundle must not write into: anything but a new or empty folder, or (with
    ``--replace``) a previous bundle holding only the files its model card lists."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise ToolkitError(f"--out {out} is a file; pass a folder for {', '.join(PARTS)}")
    from atdiff.runtime.staging import first_unlisted
    card = out / CARD
    listed = set(_CARD_LINE.findall(card.read_text(errors="replace"))) if card.is_file() else set()
    if not listed:
        raise ToolkitError(f"--out {out} is not empty and is not a bundle this script wrote (no {CARD} listing its "
                           "files); nothing was written: choose a new or empty folder")
    stray = first_unlisted(out, {*listed, CARD, *(f"default-teacher/{part}" for part in SHARED)})
    if stray is not None:
        raise ToolkitError(f"--out {out} holds {stray}, which its model card does not list (not part of a bundle): "
                           "rebuilding would delete it; move it out, or choose a new or empty folder")
    if not replace:
        raise ToolkitError(f"--out {out} holds a previous bundle; pass --replace to rebuild it")


def write_samples(model: Path, path: Path) -> None:
    """The README's picture: one row per class prompt, seeds 0-7, 4 steps, from the bundled model itself."""
    import numpy as np

    from atdiff.eval.fashion_prompts import class_prompts
    from atdiff.runtime.pipeline import Pipeline
    from studies.study_report_common import tile
    with Pipeline.load(str(model), backend="torch", device="cpu") as pipe:
        arrays = np.concatenate([pipe([p], num_images=8, steps=4, seed=0).arrays for p in class_prompts()])
    tile(arrays, 8, scale=3).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="The demo study directory (repro_demo.py --out).")
    parser.add_argument("--out", type=Path, default=Path("models"), help="Where default/, default-teacher/ go.")
    parser.add_argument("--student", choices=STUDENTS, default="lcm",
                        help="Which distilled student of the study to bundle (default: lcm, the better one measured).")
    parser.add_argument("--data-num", type=int, default=1000, help="Captioned images to bundle.")
    parser.add_argument("--recipe", default='{"max_steps": 300, "batch_size": 16, "lr": 1e-4, "w_min": 1.0, '
                        '"w_max": 3.0}', help="JSON: the bundled teacher's default distillation settings.")
    parser.add_argument("--replace", action="store_true", help="Rebuild directories that exist.")
    parser.add_argument("--samples", type=Path, help="Also write a per-class sample grid of the bundled model here.")
    args = parser.parse_args(argv)
    try:
        check_out(args.out, args.replace)   # before anything is read or written
        checks = bundle(args)
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(checks, indent=2))
    return 0


def bundle(args: argparse.Namespace) -> dict:
    from tools.model_card import write_card
    student, teacher = args.out / "default", args.out / "default-teacher"
    checks = {"student": bundle_model(args.study / "runs" / args.student / "model", student),
              "teacher": bundle_model(args.study / "runs/teacher/model", teacher)}
    link_shared(teacher, student)
    bundle_data(args.out / "demo-data", args.data_num)
    write_recipe(teacher, {**json.loads(args.recipe), "data": "../demo-data"})
    write_card(args.out, args.study, checks, args.student)
    if args.samples:
        write_samples(student, args.samples)
    return checks


if __name__ == "__main__":
    sys.exit(main())
