"""The offline text-to-image demo study (docs/results.md, part II) as data: the models compared, the budgets and
where each result lives under the study directory. studies/repro_demo.py turns it into jobs; demo_study_stages.py
and demo_study_report.py read and write the files named here."""
from __future__ import annotations

from pathlib import Path

STUDENTS = ("lcm", "lcm-at")
MODELS = (*STUDENTS, "teacher")   # evaluation order: the students (fast) first
CLF = "fmnist-classifier"
# The data: the full study captions the Fashion-MNIST package and measures against its test split; --quick uses the
# captioned subset the repository ships (the first 1000 training images as `toolkit train captions` writes them), so
# it runs on any checkout, dataset installed or not: its first `captions` images train, the others are the reference.
DATASET = "fashion-mnist"
BUNDLED_SHARD = "models/demo-data/fmnist-train-000.tar"   # relative to the repository root

FULL = dict(
    data=DATASET, captions=None, vae=dict(steps=4000, batch=64, lr=1e-3),
    teacher=dict(steps=3500, batch=64, lr=3e-4, ema=0.999),
    distill=dict(opt_steps=1200, batch=32, lr=1e-4, w_min=1.0, w_max=3.0, ema=0.95), adv=dict(steps=2, lr=0.05,
                                                                                               max_norm=0.05),
    save_every=250, steps=(1, 2, 4, 8), teacher_steps=(25,), seeds=(0, 1_000_000, 2_000_000), num=10000,
    inception=dict(num=5000), per_class=100, compare=dict(num=2000), ref_num=None,
    clip=dict(steps=1500, batch=256, lr=5e-4))
QUICK = dict(
    data=BUNDLED_SHARD, captions=256, vae=dict(steps=4, batch=8, lr=1e-3), teacher=dict(steps=4, batch=8, lr=3e-4,
                                                                                          ema=0.9),
    distill=dict(opt_steps=4, batch=4, lr=1e-4, w_min=1.0, w_max=3.0, ema=0.95), adv=dict(steps=2, lr=0.05,
                                                                                          max_norm=0.05),
    save_every=0, steps=(1, 2), teacher_steps=(3,), seeds=(0, 1000, 2000), num=32, inception=dict(num=8),
    per_class=2, compare=dict(num=16), ref_num=200, clip=dict(steps=2, batch=8, lr=5e-4))


def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name


def model_dir(out: Path, name: str) -> Path:
    return run_dir(out, name) / "model"


def ref_path(out: Path, features: str) -> Path:
    return out / "refs" / f"{features}-test.npz"


def train_shard(out: Path) -> Path:
    return out / "data" / "train" / "fmnist-train-000.tar"


def reference_images(out: Path) -> Path:
    """--quick's reference: the bundled images not trained on (the full study's is the test split)."""
    return out / "data" / "reference"


def fid_path(out: Path, features: str, model: str, seed: int) -> Path:
    return out / "cells" / features / f"{model}-seed{seed}.json"


def adherence_path(out: Path, model: str, seed: int) -> Path:
    return out / "cells" / "adherence" / f"{model}-seed{seed}.json"


def clip_path(out: Path, model: str, seed: int) -> Path:
    return out / "cells" / "clip" / f"{model}-seed{seed}.json"


def config_for(quick: bool) -> dict:
    return QUICK if quick else FULL
