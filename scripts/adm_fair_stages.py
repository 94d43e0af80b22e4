"""The in-process stages of scripts/repro_adm_fair.py (phase A: converging the base).

``_segment`` trains the base up to a step count and keeps its EMA weights as a snapshot, ``_ftcheck`` fine-tunes a
snapshot plainly, ``_cells`` measures classifier FID cells of one model, ``_check`` applies the pre-registered
convergence criterion (scripts/adm_fair_study.py), ``_report`` writes the curve. Each writes its result file last,
so a killed stage reruns; trainers resume from their checkpoints and FID cells from their per-chunk caches.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from scripts import adm_fair_study as study
from scripts.adm_study_stages import run_plan
from scripts.study_runner import toolkit


def converged_before(out: Path, step: int, cfg: dict) -> int | None:
    """The first check point before ``step`` whose verdict says converged, or None."""
    for point in study.check_points(cfg):
        path = study.verdict_path(out, point)
        if point < step and path.exists() and json.loads(path.read_text())["converged"]:
            return point
    return None


def train_base(out: Path, step: int, cfg: dict) -> list[str]:
    b = cfg["base"]
    return toolkit("train", "adm", "--data", "fashion-mnist", "--preset", "fmnist", "--out", study.base_run(out),
                   "--max-steps", step, "--batch-size", b["batch"], "--lr", b["lr"], "--ema-decay", b["ema"],
                   "--seed", b["seed"], "--save-every", cfg["save_every"], "--log-every", 50, "--resume")


def train_check(out: Path, step: int, cfg: dict) -> list[str]:
    f = cfg["finetune"]
    return toolkit("train", "adm", "--data", "fashion-mnist", "--init", study.snapshot_dir(out, step), "--out",
                   study.check_run(out, step), "--max-steps", cfg["check"]["steps"], "--batch-size", f["batch"],
                   "--lr", f["lr"], "--ema-decay", f["ema"], "--no-ema-warmup", "--seed", f["seed"],
                   "--save-every", cfg["save_every"], "--log-every", 10, "--resume")


def run_segment(out: Path, step: int, cfg: dict) -> None:
    """Train the base to ``step`` (resuming the previous segment) and copy its model/ to the snapshot; skipped once
    an earlier check point passed the criterion."""
    record = {"step": step, "trained": False}
    passed = converged_before(out, step, cfg)
    if passed is not None:
        record["skipped"] = f"the base converged at step {passed}"
    else:
        started = time.time()
        subprocess.run(train_base(out, step, cfg), check=True)
        copy_snapshot(study.base_run(out) / "model", study.snapshot_dir(out, step))
        record.update(trained=True, seconds=round(time.time() - started, 1))
    write_record(out / "segments" / f"base-{step}.json", record)


def copy_snapshot(model: Path, snapshot: Path) -> None:
    """Copy under a temporary name, then rename: a snapshot directory is either whole or absent."""
    if snapshot.exists():
        return
    tmp = snapshot.with_name(f".{snapshot.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier copy of this stage's own
    shutil.copytree(model, tmp)
    tmp.rename(snapshot)


def run_ftcheck(out: Path, step: int, cfg: dict) -> None:
    record = {"step": step, "trained": False}
    if not study.snapshot_dir(out, step).exists():
        record["skipped"] = "no snapshot (segment skipped)"
    else:
        subprocess.run(train_check(out, step, cfg), check=True)
        record["trained"] = True
    write_record(out / "segments" / f"ft-check-{step}.json", record)


def model_path(out: Path, model: str) -> Path:
    """``base-S`` is a snapshot, ``ft-check-S`` the fine-tune of one."""
    kind, step = model.rsplit("-", 1)
    return study.snapshot_dir(out, int(step)) if kind == "base" else study.check_run(out, int(step)) / "model"


def run_cells(out: Path, model: str, seeds: tuple[int, ...], cfg: dict) -> None:
    """Classifier FID of ``model`` in every curve cell at each seed; a finished cell is skipped."""
    from eval.fid import load_stats
    from scripts.study_fid import extractor, fid_rows
    if not model_path(out, model).exists():
        return  # its segment was skipped: nothing to measure
    c = cfg["curve"]
    ref, features = load_stats(study.ref_path(out, "test")), extractor(study.CLF)
    for seed in seeds:
        for sampler in study.CURVE_SAMPLERS:
            path = study.cell_path(out, model, sampler, seed, c["nfe"])
            if path.exists():
                continue
            rows = fid_rows(model_path(out, model), ref, features, nfes=(c["nfe"],), num=c["num"], seed=seed,
                            **run_plan(sampler), cache=study.cache_path(out, model, sampler, seed, c["nfe"]))
            write_record(path, {"model": model, "sampler": sampler, "seed": seed, "num": c["num"], "rows": rows})


def cell_fids(out: Path, model: str, sampler: str, seeds, nfe: int) -> list[float]:
    return [json.loads(study.cell_path(out, model, sampler, s, nfe).read_text())["rows"][0]["fid"] for s in seeds]


def judge(base: dict[str, list[float]], tuned: dict[str, list[float]]) -> dict:
    """The pre-registered criterion on per-sampler FID lists (one per sampling seed) of the snapshot and its
    fine-tune: converged when every |mean difference| < 2 x the larger of the two seed stds."""
    cells = {}
    for sampler in base:
        sigma = max(statistics.stdev(base[sampler]), statistics.stdev(tuned[sampler]))
        diff = statistics.fmean(tuned[sampler]) - statistics.fmean(base[sampler])
        cells[sampler] = {"base": base[sampler], "finetuned": tuned[sampler], "difference": diff, "sigma": sigma,
                          "within": abs(diff) < 2 * sigma}
    return {"converged": all(c["within"] for c in cells.values()), "cells": cells}


def run_check(out: Path, step: int, cfg: dict) -> None:
    c = cfg["check"]
    names = (f"base-{step}", f"ft-check-{step}")
    if not all(model_path(out, name).exists() for name in names):
        write_record(study.verdict_path(out, step), {"step": step, "converged": False, "skipped": True})
        return
    for name in names:
        run_cells(out, name, tuple(c["seeds"]), cfg)
    nfe = cfg["curve"]["nfe"]
    fids = [{s: cell_fids(out, name, s, c["seeds"], nfe) for s in study.CURVE_SAMPLERS} for name in names]
    verdict = {"step": step, "finetune_steps": c["steps"], "nfe": nfe, "num": cfg["curve"]["num"],
               "seeds": list(c["seeds"]), **judge(*fids)}
    write_record(study.verdict_path(out, step), verdict)


def write_record(path: Path, record: dict) -> None:
    from runtime.staging import write_json
    write_json(path, record)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["_segment", "_ftcheck", "_cells", "_check", "_report"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--model", default="")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg, out = study.config_for(args.quick), args.out.resolve()
    if args.stage == "_segment":
        run_segment(out, args.step, cfg)
    elif args.stage == "_ftcheck":
        run_ftcheck(out, args.step, cfg)
    elif args.stage == "_cells":
        run_cells(out, args.model, tuple(int(s) for s in args.seeds.split(",")), cfg)
        write_record(out / "cells" / "done" / f"{args.model}-seeds{args.seeds.replace(',', '-')}.json",
                     {"model": args.model, "seeds": args.seeds})
    elif args.stage == "_check":
        run_check(out, args.step, cfg)
    else:
        from scripts.adm_fair_report import write_report
        write_report(out, cfg)
    return 0
