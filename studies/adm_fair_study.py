"""The fair re-test of ADM-AT on Fashion-MNIST (issue 29, docs/results.md part III) as data: budgets, the
pre-registered convergence criterion of the base and where each result lives under the study directory.
studies/repro_adm_fair.py turns it into jobs; studies/adm_fair_stages.py runs and judges them.

Phase A (this file's ``base`` and ``check`` entries): train one base ADM from scratch in segments of
``segment`` steps (resume is bitwise exact and the LR is constant after warm-up, so the segments are one run),
keep the EMA weights after each segment as a snapshot, measure each snapshot's classifier FID (the curve), and at
the check points fine-tune the snapshot plainly for ``check.steps`` optimizer steps with the arms' recipe. The
criterion, written before any number was seen:

    the base counts as converged at snapshot S when, in both curve cells (guided-diffusion's DDIM and
    DPM-Solver++(2M), NFE 10), |mean FID(FT from S) - mean FID(S)| < 2 * sigma, the means over the
    ``check.seeds`` sampling seeds of ``num`` samples and sigma the larger of the two models' std over those
    seeds in that cell. The first such S is the base of the arms; segments after it are not trained. If no check
    point passes by the last segment, the last snapshot is the base and the report says it is not converged by
    the criterion, with the measured fine-tune gain.
"""
from __future__ import annotations

from pathlib import Path

CLF = "fmnist-classifier"
# the curve's cells: the table's two deterministic samplers at NFE 10 (studies/adm_study.py's names and runs)
CURVE_SAMPLERS = ("ddim_gd", "dpmpp_2m")

FULL = dict(
    # the base recipe of part I (studies/adm_study.py FULL.base), run longer
    base=dict(preset="fmnist", batch=64, lr=2e-4, ema=0.9995, seed=0), segment=4000, last=48000,
    # the arms' fine-tuning recipe (part I's, EMA continued from the base's)
    finetune=dict(batch=64, lr=1e-4, ema=0.999, seed=1),
    check=dict(first=16000, every=8000, steps=3000, seeds=(0, 1_000_000, 2_000_000)),
    curve=dict(nfe=10, num=10000, seed=0), save_every=500, ref_num=None,
    # phase B (docs/results.md part III): the AT strength sweep, then the arms
    sweep=dict(batches=400, alphas=(0.025, 0.05, 0.1), bounds=(0.1, 0.002), variants=("full", "detach"),
               heldout=dict(nfe=10, num=5000, seed=9_000_000)),
    arms=dict(batches=3000, adv_steps=3, ip_gamma=0.15, train_seeds=(1, 2)),
    grid=dict(samplers=("ddim_gd", "dpmpp_2m", "iddpm", "es_ddim_gd"), nfes=(5, 10, 20),
              seeds=(0, 1_000_000, 2_000_000), num=10000),
    # the decision rule's cells (measured first)
    decision=dict(samplers=("ddim_gd", "dpmpp_2m"), nfes=(5, 10)))
# One session of the 2-core box (docs/results.md part III, "session scale"): the same design, every stage, shrunk
# to fit ~90 minutes, since a machine's files do not outlive a session here: a 4x cheaper UNet (`fmnist-small`),
# 6000 base steps at most, fine-tunes of 450 batches, 2000 samples a cell. Written before any of its numbers.
SESSION = dict(
    base=dict(preset="fmnist-small", batch=64, lr=2e-4, ema=0.9995, seed=0), segment=1500, last=6000,
    finetune=dict(batch=64, lr=1e-4, ema=0.999, seed=1),
    check=dict(first=3000, every=1500, steps=450, seeds=(0, 1_000_000, 2_000_000)),
    curve=dict(nfe=10, num=2000, seed=0), save_every=150, ref_num=None,
    sweep=dict(batches=75, alphas=(0.025, 0.05, 0.1), bounds=(0.1, 0.002), variants=("full", "detach"),
               heldout=dict(nfe=10, num=2000, seed=9_000_000)),
    arms=dict(batches=450, adv_steps=3, ip_gamma=0.15, train_seeds=(1, 2)),
    grid=dict(samplers=("ddim_gd", "dpmpp_2m", "iddpm", "es_ddim_gd"), nfes=(5, 10, 20),
              seeds=(0, 1_000_000, 2_000_000), num=2000),
    decision=dict(samplers=("ddim_gd", "dpmpp_2m"), nfes=(5, 10)))
# Several sessions of the 2-core box (docs/results.md part III, "medium scale"), written 2026-12-04 after the session
# scale's results and before any medium number: the session scale's model and recipes, with the two things that left
# it without power repaired. Its fine-tunes (450 steps) were shorter than the arms' EMA horizon (0.999: ~1000 steps),
# so every arm's EMA model was still mostly the base's: here every check and arm runs 3000 optimizer steps (FT, IP,
# AT at equal steps 1000 x K = 3, AT at equal data 3000 x 3). Its base was "converged" by the rule only, the curve still
# falling: here the base trains on to 24,000 steps unless a 3000-step fine-tune stops helping first. Cells: 5000
# samples (a seed std ~0.63x that of 2000). Its first 6000 base steps are bitwise the session run's
# (same recipe and seed; resume is exact), so a medium run may start from a copy of that run (the page says so).
MEDIUM = dict(
    base=dict(preset="fmnist-small", batch=64, lr=2e-4, ema=0.9995, seed=0), segment=3000, last=24000,
    finetune=dict(batch=64, lr=1e-4, ema=0.999, seed=1),
    check=dict(first=12000, every=6000, steps=3000, seeds=(0, 1_000_000, 2_000_000)),
    curve=dict(nfe=10, num=5000, seed=0), save_every=500, ref_num=None,
    sweep=dict(batches=400, alphas=(0.025, 0.05, 0.1), bounds=(0.1, 0.002), variants=("full", "detach"),
               heldout=dict(nfe=10, num=2000, seed=9_000_000)),
    arms=dict(batches=3000, adv_steps=3, ip_gamma=0.15, train_seeds=(1, 2)),
    grid=dict(samplers=("ddim_gd", "dpmpp_2m", "iddpm", "es_ddim_gd"), nfes=(5, 10, 20),
              seeds=(0, 1_000_000, 2_000_000), num=5000),
    decision=dict(samplers=("ddim_gd", "dpmpp_2m"), nfes=(5, 10)))
QUICK = dict(
    base=dict(preset="fmnist", batch=16, lr=2e-4, ema=0.99, seed=0), segment=8, last=24,
    finetune=dict(batch=16, lr=1e-4, ema=0.9, seed=1),
    check=dict(first=16, every=8, steps=6, seeds=(0, 1000)),
    curve=dict(nfe=4, num=64, seed=0), save_every=0, ref_num=200,
    sweep=dict(batches=2, alphas=(0.05, 0.1), bounds=(0.1,), variants=("full", "detach"),
               heldout=dict(nfe=4, num=32, seed=9000)),
    arms=dict(batches=6, adv_steps=3, ip_gamma=0.15, train_seeds=(1, 2)),
    grid=dict(samplers=("ddim_gd", "dpmpp_2m", "iddpm", "es_ddim_gd"), nfes=(2, 4), seeds=(0, 1000), num=32),
    decision=dict(samplers=("ddim_gd", "dpmpp_2m"), nfes=(2, 4)))


SCALES = {"full": FULL, "session": SESSION, "medium": MEDIUM, "quick": QUICK}


def scale_name(scale: str | bool) -> str:
    """``--quick`` (True) is the quick scale, False the full one; a name passes through."""
    return {True: "quick", False: "full"}.get(scale, scale) if isinstance(scale, bool) else scale


def config_for(scale: str | bool) -> dict:
    return SCALES[scale_name(scale)]


def segments(cfg: dict) -> list[int]:
    return list(range(cfg["segment"], cfg["last"] + 1, cfg["segment"]))


def check_points(cfg: dict) -> list[int]:
    c = cfg["check"]
    return [s for s in segments(cfg) if s >= c["first"] and (s - c["first"]) % c["every"] == 0]


def base_run(out: Path) -> Path:
    return out / "runs" / "base"


def snapshot_dir(out: Path, step: int) -> Path:
    """The base's EMA weights after ``step`` steps (a copy of runs/base/model taken when the segment ended)."""
    return out / "snapshots" / f"base-{step}"


def check_run(out: Path, step: int) -> Path:
    return out / "runs" / f"ft-check-{step}"


def cell_path(out: Path, model: str, sampler: str, seed: int, nfe: int) -> Path:
    return out / "cells" / CLF / model / f"{sampler}-seed{seed}-nfe{nfe}.json"


def cache_path(out: Path, model: str, sampler: str, seed: int, nfe: int) -> Path:
    return out / "cache" / CLF / model / f"{sampler}-seed{seed}-nfe{nfe}"


def verdict_path(out: Path, step: int) -> Path:
    return out / "checks" / f"base-{step}.json"


def ref_path(out: Path, split: str) -> Path:
    return out / "refs" / f"{CLF}-{split}.npz"


BASE_ARM = "base-chosen"   # the converged snapshot, copied to runs/base-chosen/model (the arms' --init)


def run_dir(out: Path, name: str) -> Path:
    """Phase B's runs live where studies/adm_study.py puts part I's, so its ES stage reads them unchanged."""
    return out / "runs" / name


def sweep_points(cfg: dict) -> list[dict]:
    s = cfg["sweep"]
    return [{"variant": v, "alpha": a, "bound": b, "timestep_sampler": "uniform"}
            for v in s["variants"] for a in s["alphas"] for b in s["bounds"]]


def point_name(point: dict) -> str:
    lsm = "-lsm" if point["timestep_sampler"] != "uniform" else ""
    return f"sweep-{point['variant']}-a{point['alpha']}-m{point['bound']}{lsm}"


def heldout_path(out: Path, name: str) -> Path:
    return out / "heldout" / f"{name}.json"


# the exposure-bias meter's run on every model (toolkit eval exposure-bias): DPM-Solver++(2M), which clips nothing,
# so the sampler's x_t is the network's own doing; q's side on the test split
EXPOSURE = dict(sampler="dpmpp_2m", nfe=10, num=1000, data="fashion-mnist:test", seed=0)


def exposure_path(out: Path, model: str) -> Path:
    return out / "exposure-bias" / model


def pick_path(out: Path, final: bool = False) -> Path:
    return out / ("arms.json" if final else "pick.json")
