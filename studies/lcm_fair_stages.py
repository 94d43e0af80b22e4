"""The in-process stages of studies/repro_lcm_fair.py (the LCM part of the fair re-test, docs/results.md part III).

``_segment`` trains a phase's run (the teacher, then plain LCM from it) up to a step count and keeps its model/ as a
snapshot, ``_cells`` measures a snapshot's classifier FID cells, ``_check`` applies the pre-registered criterion
(studies/lcm_fair_study.py) to a snapshot and the next one, ``_choose`` fixes the teacher / LCM's budget N,
``_heldout`` and ``_pick`` run the sweep's held-out pick, ``_alias`` makes an arm that is a bitwise copy of a run
already trained, ``_armcells`` measures an arm with part II's stages, ``_report`` writes the tables. Each writes its
result file last, so a killed stage reruns; trainers resume from their checkpoints, FID cells from their caches.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from studies import demo_study as demo
from studies import lcm_fair_study as study
from studies.adm_fair_stages import copy_snapshot, judge, write_record
from studies.study_runner import toolkit


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def teacher_dir(out: Path) -> Path:
    return demo.model_dir(out, study.snapshot("teacher", read(study.chosen_path(out, "teacher"))["step"]))


def budget(out: Path) -> int:
    """N: LCM's optimizer steps at convergence (the chosen snapshot of the distillation phase)."""
    return read(study.chosen_path(out, "distill"))["step"]


def common_distill_args(out: Path, cfg: dict, run: str, batches: int, seed: int) -> list:
    d = cfg["distill"]
    return ["--teacher", teacher_dir(out), "--data", demo.train_shard(out).parent, "--out", demo.run_dir(out, run),
            "--max-steps", batches, "--batch-size", d["batch"], "--lr", d["lr"], "--w-min", d["w_min"], "--w-max",
            d["w_max"], "--ema-decay", d["ema"], "--seed", seed, "--save-every", cfg["save_every"], "--resume",
            "--log-every", 10]


def distill_command(out: Path, cfg: dict, run: str, spec: dict) -> list[str]:
    """``toolkit train lcm`` or ``lcm-at`` from the chosen teacher with part II's recipe; LCM-AT's eta is both the
    per-element ascent step and the bound (part II's 0.05 / 0.05), eta = 0 the batch-reuse control."""
    adv = (["--adv-steps", spec["adv_steps"], "--adv-lr", spec["eta"], "--adv-max-norm", spec["eta"]]
           if spec["kind"] == "lcm-at" else [])
    return toolkit("train", spec["kind"], *common_distill_args(out, cfg, run, spec["batches"], spec["seed"]), *adv)


def segment_command(out: Path, cfg: dict, phase: str, step: int) -> list[str]:
    """One run per phase, resumed to a growing --max-steps: the trainer's resume is bitwise (data order and noise
    from (seed, step), optimizer, EMA and LCM's target network checkpointed) and the LR is constant (no warm-up)."""
    if phase == "distill":
        return distill_command(out, cfg, "lcm", {"kind": "lcm", "batches": step, "seed": cfg["distill"]["seed"]})
    t = cfg["teacher"]
    return toolkit("train", "teacher", "--data", demo.train_shard(out).parent, "--vae", demo.model_dir(out, "vae"),
                   "--out", demo.run_dir(out, "teacher"), "--max-steps", step, "--batch-size", t["batch"], "--lr",
                   t["lr"], "--ema-decay", t["ema"], "--seed", t["seed"], "--save-every", cfg["save_every"],
                   "--resume")


def converged_by(out: Path, cfg: dict, phase: str, step: int) -> int | None:
    """A passing check that makes segment ``step`` unneeded (a check of S needs the segment after S only)."""
    segment = cfg[phase]["segment"]
    for point in study.check_points(cfg, phase):
        path = study.check_path(out, phase, point)
        if point + segment < step and path.exists() and read(path)["converged"]:
            return point
    return None


def run_segment(out: Path, cfg: dict, phase: str, step: int) -> None:
    record = {"phase": phase, "step": step, "trained": False}
    passed = converged_by(out, cfg, phase, step)
    if passed is not None:
        record["skipped"] = f"converged at {passed}"
    else:
        started = time.time()
        subprocess.run(segment_command(out, cfg, phase, step), check=True)
        copy_snapshot(demo.model_dir(out, study.PHASE_RUN[phase]), demo.model_dir(out, study.snapshot(phase, step)))
        record.update(trained=True, seconds=round(time.time() - started, 1))
    write_record(out / "segments" / f"{phase}-{step}.json", record)


def phase_cfg(cfg: dict, phase: str) -> dict:
    """Part II's cell keys for a phase's snapshot cells (run_fid reads num and steps)."""
    c = cfg[phase]["cells"]
    return {"num": c["num"], "steps": c["steps"]}


def run_cells(out: Path, cfg: dict, model: str, seeds, cells: dict, features: str = study.CLF) -> None:
    """Part II's FID stage (one file per model and seed, every step count) for each seed not measured yet."""
    from studies.demo_study_stages import run_fid
    if not demo.model_dir(out, model).exists():
        return  # a skipped segment: nothing to measure
    for seed in seeds:
        if not demo.fid_path(out, features, model, seed).exists():
            run_fid(out, model, features, seed, cells)


def cell_fids(out: Path, model: str, seeds, steps: int, features: str = study.CLF) -> list[float] | None:
    """The FID of ``model`` at ``steps`` for each seed, or None until every seed is measured."""
    paths = [demo.fid_path(out, features, model, s) for s in seeds]
    if not all(p.exists() for p in paths):
        return None
    return [next(r["fid"] for r in read(p)["rows"] if r["nfe"] == steps) for p in paths]


def run_check(out: Path, cfg: dict, phase: str, step: int) -> None:
    """The criterion at snapshot ``step``: the next snapshot moves no cell's mean FID by 2 sigma or more."""
    c, following = cfg[phase]["cells"], step + cfg[phase]["segment"]
    names = [study.snapshot(phase, s) for s in (step, following)]
    if not all(demo.model_dir(out, n).exists() for n in names):
        write_record(study.check_path(out, phase, step), {"step": step, "converged": False, "skipped": True})
        return
    for name in names:
        run_cells(out, cfg, name, c["seeds"], phase_cfg(cfg, phase))
    fids = [{f"{n} steps": cell_fids(out, name, c["seeds"], n) for n in c["steps"]} for name in names]
    verdict = judge(*fids)   # its "base" is snapshot S, its "finetuned" the next one
    write_record(study.check_path(out, phase, step), {"step": step, "next": following, "num": c["num"],
                                                       "seeds": list(c["seeds"]), **verdict})


def chosen(found: list[dict], points: list[int], last: int) -> dict:
    """The first passing check once every earlier one is judged; the last snapshot when none passes."""
    judged = {v["step"]: v for v in found}
    for point in points:
        if point not in judged:
            return {"step": None, "converged": False, "all_checks_done": False}
        if judged[point].get("converged"):
            return {"step": point, "converged": True}
    return {"step": last, "converged": False, "all_checks_done": True}


def checks(out: Path, cfg: dict, phase: str) -> list[dict]:
    paths = (study.check_path(out, phase, s) for s in study.check_points(cfg, phase))
    return [read(p) for p in paths if p.exists()]


def choose(out: Path, cfg: dict, phase: str) -> None:
    result = chosen(checks(out, cfg, phase), study.check_points(cfg, phase), study.segments(cfg, phase)[-1])
    if result["step"] is None:
        raise SystemExit(f"the {phase} phase is not decided yet: some convergence checks are not judged")
    write_record(study.chosen_path(out, phase), result)


def heldout_model(out: Path, name: str) -> str:
    """``lcm`` is plain LCM at N (the LCM phase's snapshot), a reference row of the sweep; else a sweep run."""
    return study.snapshot("distill", budget(out)) if name == "lcm" else name


def run_heldout(out: Path, cfg: dict, name: str) -> None:
    """The sweep's pick metric: classifier FID against the *train* split on seeds no table cell uses."""
    from atdiff.eval.fashion_prompts import class_prompts
    from atdiff.eval.fid import load_stats
    from studies.repro_adm import ref_path
    from studies.study_fid import extractor, fid_rows
    h = cfg["sweep"]["heldout"]
    rows = fid_rows(demo.model_dir(out, heldout_model(out, name)), load_stats(ref_path(out, "train", study.CLF)),
                    extractor(study.CLF), nfes=h["steps"], num=h["num"], seed=h["seed"],
                    prompts=tuple(class_prompts()), cache=out / "cache" / "heldout" / name)
    fids = {r["nfe"]: r["fid"] for r in rows}
    write_record(study.heldout_path(out, name), {"model": name, **h, "fid": fids,
                                                  "mean": sum(fids.values()) / len(fids), "rows": rows})


def pick(out: Path, cfg: dict) -> None:
    """The LCM-AT point (eta > 0) with the lowest mean held-out FID; its control is eta = 0 at the same K."""
    names = [*(study.point_name(p) for p in study.sweep_points(cfg)), "lcm"]
    heldout = {n: read(study.heldout_path(out, n))["mean"] for n in names}
    best = min((p for p in study.sweep_points(cfg) if p["eta"] > 0), key=lambda p: heldout[study.point_name(p)])
    write_record(study.pick_path(out), {"heldout_mean": heldout, "best": best, "budget": budget(out)})


def arm_spec(out: Path, cfg: dict, name: str) -> dict:
    return study.arm_specs(cfg, read(study.pick_path(out)), budget(out))[name]


def alias(out: Path, cfg: dict, name: str) -> None:
    """An arm whose command already ran (same recipe, seed and budget): a copy of that run's model."""
    copy_snapshot(demo.model_dir(out, arm_spec(out, cfg, name)["source"]), demo.model_dir(out, name))


def arm_cells(out: Path, cfg: dict, name: str, group: str) -> None:
    """The rule's classifier-FID cells (every step count and seed), or the rest: prompt adherence, CLIP score
    (part II's stages, seed 0) and the Inception FID at its step count (seed 0)."""
    from studies.demo_study_stages import run_adherence, run_clip
    if group == "classifier":
        run_cells(out, cfg, name, cfg["seeds"], cfg)
    else:
        i = cfg["inception"]
        run_cells(out, cfg, name, (i["seed"],), dict(cfg, steps=i["steps"]), features="inception")
        for path, measure in ((demo.adherence_path, run_adherence), (demo.clip_path, run_clip)):
            if not path(out, name, 0).exists():
                measure(out, name, 0, cfg)
    write_record(out / "cells" / "done" / f"{group}-{name}.json", {"model": name, "group": group})


def snapshot_cells(out: Path, cfg: dict, phase: str, step: int) -> None:
    run_cells(out, cfg, study.snapshot(phase, step), cfg[phase]["cells"]["seeds"], phase_cfg(cfg, phase))
    write_record(out / "cells" / "done" / f"{study.snapshot(phase, step)}.json", {"phase": phase, "step": step})


STAGES = {
    "_segment": lambda a, out, cfg: run_segment(out, cfg, a.phase, a.step),
    "_cells": lambda a, out, cfg: snapshot_cells(out, cfg, a.phase, a.step),
    "_check": lambda a, out, cfg: run_check(out, cfg, a.phase, a.step),
    "_choose": lambda a, out, cfg: choose(out, cfg, a.phase),
    "_heldout": lambda a, out, cfg: run_heldout(out, cfg, a.model),
    "_pick": lambda a, out, cfg: pick(out, cfg),
    "_alias": lambda a, out, cfg: alias(out, cfg, a.model),
    "_armcells": lambda a, out, cfg: arm_cells(out, cfg, a.model, a.group),
    "_report": lambda a, out, cfg: report(out, cfg),
}


def report(out: Path, cfg: dict) -> None:
    from studies.lcm_fair_report import write_report
    write_report(out, cfg)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", choices=study.PHASES, default="teacher")
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--model", default="")
    parser.add_argument("--group", choices=["classifier", "rest"], default="classifier")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", choices=sorted(study.SCALES), default="session")
    args = parser.parse_args(argv)
    STAGES[args.stage](args, args.out.resolve(), study.config_for("quick" if args.quick else args.scale))
    return 0
