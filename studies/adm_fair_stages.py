"""The in-process stages of studies/repro_adm_fair.py (phase A: converging the base).

``_segment`` trains the base up to a step count and keeps its EMA weights as a snapshot, ``_ftcheck`` fine-tunes a
snapshot plainly, ``_cells`` measures classifier FID cells of one model, ``_check`` applies the pre-registered
convergence criterion (studies/adm_fair_study.py), ``_report`` writes the curve. Each writes its result file last,
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

from studies import adm_fair_study as study
from studies.adm_study_stages import run_plan
from studies.study_runner import toolkit


def converged_before(out: Path, step: int, cfg: dict) -> int | None:
    """The first check point before ``step`` whose verdict says converged, or None."""
    for point in study.check_points(cfg):
        path = study.verdict_path(out, point)
        if point < step and path.exists() and json.loads(path.read_text())["converged"]:
            return point
    return None


def train_base(out: Path, step: int, cfg: dict) -> list[str]:
    b = cfg["base"]
    return toolkit("train", "adm", "--data", "fashion-mnist", "--preset", b["preset"], "--out", study.base_run(out),
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
    """``base-S`` is a snapshot, ``ft-check-S`` the fine-tune of one, anything else a phase-B run."""
    kind, _, step = model.rpartition("-")
    if kind == "base" and step.isdigit():
        return study.snapshot_dir(out, int(step))
    if kind == "ft-check" and step.isdigit():
        return study.check_run(out, int(step)) / "model"
    return study.run_dir(out, model) / "model"


def run_cells(out: Path, model: str, seeds: tuple[int, ...], cfg: dict,
              cells: list[tuple[str, int]] | None = None, num: int | None = None) -> None:
    """Classifier FID of ``model`` against the test split in each (sampler, NFE) cell (default: the curve's) at
    each seed; a finished cell is skipped."""
    from atdiff.eval.fid import load_stats
    from studies.study_fid import extractor
    if not model_path(out, model).exists():
        return  # its segment was skipped: nothing to measure
    cells = cells or [(sampler, cfg["curve"]["nfe"]) for sampler in study.CURVE_SAMPLERS]
    num = num or cfg["curve"]["num"]
    ref, features = load_stats(study.ref_path(out, "test")), extractor(study.CLF)
    for seed in seeds:
        for sampler, nfe in cells:
            path = study.cell_path(out, model, sampler, seed, nfe)
            if not path.exists():
                rows = cell_rows(out, model, sampler, seed, nfe, num, ref, features)
                write_record(path, {"model": model, "sampler": sampler, "seed": seed, "num": num, "rows": rows})


def cell_rows(out: Path, model: str, sampler: str, seed: int, nfe: int, num: int, ref, features) -> list[dict]:
    """One cell's FID rows. ES runs on its DDIM with the model's held-out lambda (part I's ES stage); lambda 1.0 is
    that DDIM itself, so its cell is reused."""
    from studies.adm_study import ES_OF, es_path
    from studies.study_fid import fid_rows
    plan, base = run_plan(sampler), ES_OF.get(sampler)
    if base is not None:
        plan["eps_scale"] = json.loads(es_path(out, model, base).read_text())["chosen"]
        if plan["eps_scale"] == 1.0:
            return json.loads(study.cell_path(out, model, base, seed, nfe).read_text())["rows"]
    return fid_rows(model_path(out, model), ref, features, nfes=(nfe,), num=num, seed=seed, **plan,
                    cache=study.cache_path(out, model, sampler, seed, nfe))


def grid_cells(cfg: dict, group: str) -> list[tuple[str, int]]:
    """The decision rule's cells, or the rest of the table (ES after its DDIM, so lambda 1.0 can reuse it)."""
    decision = [(s, n) for s in cfg["decision"]["samplers"] for n in cfg["decision"]["nfes"]]
    if group == "decision":
        return decision
    return [(s, n) for s in cfg["grid"]["samplers"] for n in cfg["grid"]["nfes"] if (s, n) not in decision]


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


def choose_base(out: Path, cfg: dict) -> None:
    """Copy the converged snapshot (the report's rule) to runs/base-chosen/model, the arms' --init."""
    from studies.adm_fair_report import chosen_base, verdicts
    chosen = chosen_base(verdicts(out, cfg), cfg)
    if chosen["step"] is None:
        raise SystemExit("the base is not decided yet: some convergence checks are not judged")
    copy_snapshot(study.snapshot_dir(out, chosen["step"]), study.run_dir(out, study.BASE_ARM) / "model")
    write_record(out / "base.json", chosen)


def run_heldout(out: Path, model: str, cfg: dict) -> None:
    """The sweep's pick metric: classifier FID against the *train* split on seeds no table cell uses."""
    from atdiff.eval.fid import load_stats
    from studies.study_fid import extractor, fid_rows
    h = cfg["sweep"]["heldout"]
    rows = fid_rows(model_path(out, model), load_stats(study.ref_path(out, "train")), extractor(study.CLF),
                    nfes=(h["nfe"],), num=h["num"], seed=h["seed"], **run_plan("ddim_gd"),
                    cache=out / "cache" / "heldout" / model)
    write_record(study.heldout_path(out, model), {"model": model, **h, "fid": rows[0]["fid"], "rows": rows})


def heldout_fid(out: Path, name: str) -> float:
    return json.loads(study.heldout_path(out, name).read_text())["fid"]


def pick(out: Path, cfg: dict, final: bool) -> None:
    """The sweep point with the lowest held-out FID, overall and per variant; with ``final``, the
    loss-second-moment run at that point replaces it where it is lower."""
    if not final:
        points = study.sweep_points(cfg)
        fids = {study.point_name(p): heldout_fid(out, study.point_name(p)) for p in points}
        by_variant = {v: min((p for p in points if p["variant"] == v), key=lambda p: fids[study.point_name(p)])
                      for v in cfg["sweep"]["variants"]}
        best = min(by_variant.values(), key=lambda p: fids[study.point_name(p)])
        write_record(study.pick_path(out), {"heldout_fid": fids, "best": best, "best_by_variant": by_variant})
        return
    record = json.loads(study.pick_path(out).read_text())
    lsm_fid, best = heldout_fid(out, "sweep-lsm"), record["best"]
    record["heldout_fid"]["sweep-lsm"] = lsm_fid
    if lsm_fid < record["heldout_fid"][study.point_name(best)]:
        best = dict(best, timestep_sampler="loss-second-moment")
        record["best"], record["best_by_variant"][best["variant"]] = best, best
    write_record(study.pick_path(out, final=True), record)


def train_lsm(out: Path, cfg: dict) -> None:
    from studies.adm_fair_arms import sweep_command
    best = json.loads(study.pick_path(out).read_text())["best"]
    point = dict(best, timestep_sampler="loss-second-moment")
    subprocess.run(sweep_command(out, point, cfg, name="sweep-lsm"), check=True)


def run_grid(out: Path, model: str, seed: int, group: str, cfg: dict) -> None:
    run_cells(out, model, (seed,), cfg, grid_cells(cfg, group), cfg["grid"]["num"])
    write_record(out / "cells" / "done" / f"{group}-{model}-seed{seed}.json", {"model": model, "seed": seed})


def write_record(path: Path, record: dict) -> None:
    from atdiff.runtime.staging import write_json
    write_json(path, record)


STAGES = {
    "_segment": lambda a, out, cfg: run_segment(out, a.step, cfg),
    "_ftcheck": lambda a, out, cfg: run_ftcheck(out, a.step, cfg),
    "_cells": lambda a, out, cfg: run_curve(out, a.model, a.seeds, cfg),
    "_check": lambda a, out, cfg: run_check(out, a.step, cfg),
    "_choose": lambda a, out, cfg: choose_base(out, cfg),
    "_heldout": lambda a, out, cfg: run_heldout(out, a.model, cfg),
    "_pick": lambda a, out, cfg: pick(out, cfg, a.final),
    "_train_lsm": lambda a, out, cfg: train_lsm(out, cfg),
    "_grid": lambda a, out, cfg: run_grid(out, a.model, int(a.seeds), a.group, cfg),
    "_report": lambda a, out, cfg: report(out, cfg),
}


def report(out: Path, cfg: dict) -> None:
    from studies.adm_fair_report import write_report
    write_report(out, cfg)


def run_curve(out: Path, model: str, seeds: str, cfg: dict) -> None:
    run_cells(out, model, tuple(int(s) for s in seeds.split(",")), cfg)
    write_record(out / "cells" / "done" / f"{model}-seeds{seeds.replace(',', '-')}.json", {"model": model, "seeds": seeds})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--model", default="")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--group", choices=["decision", "rest"], default="decision")
    parser.add_argument("--final", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", choices=sorted(study.SCALES), default="full")
    args = parser.parse_args(argv)
    STAGES[args.stage](args, args.out.resolve(), study.config_for("quick" if args.quick else args.scale))
    return 0
