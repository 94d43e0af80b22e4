"""Rerun the offline text-to-image demo study (docs/results.md, part II), resumably, on a CPU.

    python scripts/repro_demo.py --out /work/study/demo             # the real budgets: a few CPU hours
    python scripts/repro_demo.py --out /tmp/demo-quick --quick      # every stage with tiny budgets (minutes)
    python scripts/repro_demo.py --out DIR --list                   # the jobs and whether each is done

Stages (each a resumable job, run by scripts/study_runner.py):
1. data: captioned Fashion-MNIST shards (32x32 RGB, train split) and the class-prompt file;
2. the pipeline: ``toolkit train vae`` (32x32 -> 8x8x4), ``toolkit train teacher`` (UNet + CLIP text encoder,
   jointly, caption dropout for CFG);
3. distillation from that teacher with equal optimizer-step budgets and the same seed: ``toolkit train lcm`` and
   ``toolkit train lcm-at`` (free AT makes K optimizer steps per batch, so its run takes 1/K of the batches);
4. evaluation at 1/2/4/8 steps (teacher: its DDIM at 25 steps): prompt adherence, classifier FID (3 seeds) and
   the Inception FID (seed 0), then fp16 exports of both students and ``toolkit eval compare`` torch vs ONNX
   Runtime; 5. the report (results.json / csv, table.md, plots, grids).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from scripts.study_runner import Job, study_main, toolkit  # noqa: E402

STUDENTS = ("lcm", "lcm-at")

FULL = dict(
    captions=None, vae=dict(steps=4000, batch=64, lr=1e-3), teacher=dict(steps=5000, batch=64, lr=3e-4, ema=0.999),
    distill=dict(opt_steps=1500, batch=32, lr=1e-4, w_min=1.0, w_max=3.0, ema=0.95), adv=dict(steps=2, lr=0.05,
                                                                                               max_norm=0.05),
    save_every=250)
QUICK = dict(
    captions=256, vae=dict(steps=4, batch=8, lr=1e-3), teacher=dict(steps=4, batch=8, lr=3e-4, ema=0.9),
    distill=dict(opt_steps=4, batch=4, lr=1e-4, w_min=1.0, w_max=3.0, ema=0.95), adv=dict(steps=2, lr=0.05,
                                                                                          max_norm=0.05),
    save_every=0)


def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name


def model_dir(out: Path, name: str) -> Path:
    return run_dir(out, name) / "model"


def training_jobs(out: Path, cfg: dict) -> list[Job]:
    data = out / "data" / "train"
    num = ["--num", cfg["captions"]] if cfg["captions"] else []
    every = ["--save-every", cfg["save_every"], "--resume"]
    v, t = cfg["vae"], cfg["teacher"]
    jobs = [Job("captions", lambda: toolkit("train", "captions", "--out", data, "--split", "train", *num),
                data / "fmnist-train-000.tar"),
            Job("train-vae", lambda: toolkit("train", "vae", "--data", data, "--out", run_dir(out, "vae"),
                                             "--max-steps", v["steps"], "--batch-size", v["batch"], "--lr", v["lr"],
                                             "--seed", 0, *every),
                model_dir(out, "vae") / "training.json", ("captions",)),
            Job("train-teacher", lambda: toolkit("train", "teacher", "--data", data, "--vae", model_dir(out, "vae"),
                                                 "--out", run_dir(out, "teacher"), "--max-steps", t["steps"],
                                                 "--batch-size", t["batch"], "--lr", t["lr"], "--ema-decay", t["ema"],
                                                 "--seed", 0, *every),
                model_dir(out, "teacher") / "training.json", ("train-vae",))]
    return jobs + [Job(f"train-{name}", lambda n=name: distill_command(out, n, cfg),
                       model_dir(out, name) / "training.json", ("train-teacher",)) for name in STUDENTS]


def distill_command(out: Path, name: str, cfg: dict) -> list[str]:
    """LCM and LCM-AT from the same teacher, data and seed, with the same number of optimizer steps."""
    d, a = cfg["distill"], cfg["adv"]
    adv = ["--adv-steps", a["steps"], "--adv-lr", a["lr"], "--adv-max-norm", a["max_norm"]] if name == "lcm-at" else []
    batches = d["opt_steps"] // (a["steps"] if adv else 1)
    return toolkit("train", name, "--teacher", model_dir(out, "teacher"), "--data", out / "data" / "train",
                   "--out", run_dir(out, name), "--max-steps", batches, "--batch-size", d["batch"], "--lr", d["lr"],
                   "--w-min", d["w_min"], "--w-max", d["w_max"], "--ema-decay", d["ema"], "--seed", 1,
                   "--save-every", cfg["save_every"], "--resume", "--log-every", 10, *adv)


def build_jobs(out: Path, quick: bool) -> list[Job]:
    return training_jobs(out, QUICK if quick else FULL)


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, __doc__.splitlines()[0], build_jobs, lambda quick: QUICK if quick else FULL)


if __name__ == "__main__":
    sys.exit(main())
