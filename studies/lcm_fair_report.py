"""The report of studies/repro_lcm_fair.py, from whatever has been measured so far: both phases' curves and
convergence checks, the sweep and its pick, every arm's budget and cells, the pre-registered decision rule per
training seed and LCM-AT against plain LCM, paired (report/lcm_fair.json; report/tables.md, lcm_fair_tables.py).

The rule, as registered (docs/results.md part III, LCM part): LCM-AT beats its eta = 0 control in every training
seed, in >= 3 of the 4 classifier-FID cells (1/2/4/8 steps), by more than 2x the larger of the sampling spread and
the training spread (studies/adm_fair_verdict.margin_test, the ADM rule's own test). A cell not yet measured at every
sampling seed counts as not beaten, and the record says the rule is incomplete.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from studies import demo_study as demo
from studies import lcm_fair_study as study
from studies.lcm_fair_stages import cell_fids, checks, chosen, read


def fid_cell(out: Path, model: str, seeds, steps: int, features: str = study.CLF) -> dict | None:
    fids = cell_fids(out, model, seeds, steps, features)
    if fids is None:
        return None
    return {"fids": fids, "mean": statistics.fmean(fids), "std": statistics.stdev(fids) if len(fids) > 1 else 0.0}


def curve(out: Path, cfg: dict, phase: str) -> dict:
    """Every measured snapshot's cells, the checks and the phase's result (chosen snapshot)."""
    c, rows = cfg[phase]["cells"], []
    for step in study.segments(cfg, phase):
        for steps in c["steps"]:
            found = fid_cell(out, study.snapshot(phase, step), c["seeds"], steps)
            if found:
                rows.append({"step": step, "steps": steps, "num": c["num"], **found})
    found = checks(out, cfg, phase)
    return {"curve": rows, "checks": found,
            "chosen": chosen(found, study.check_points(cfg, phase), study.segments(cfg, phase)[-1])}


def sweep(out: Path, cfg: dict, n: int) -> list[dict]:
    """Every sweep run's held-out FIDs (and plain LCM's at N), with its batches and optimizer steps."""
    runs = [(study.point_name(p), p) for p in study.sweep_points(cfg)] + [("lcm", {"eta": None, "adv_steps": 1})]
    rows = []
    for name, point in runs:
        path = study.heldout_path(out, name)
        if path.exists():
            record = read(path)
            rows.append({"run": name, "eta": point["eta"], "adv_steps": point["adv_steps"],
                         "batches": n // point["adv_steps"], "optimizer_steps": n,
                         "fid": {int(k): v for k, v in record["fid"].items()},
                         "mean": record["mean"], "num": record["num"], "seed": record["seed"]})
    return rows


def job_seconds(out: Path) -> dict[str, float]:
    """Wall time of every job that finished (the runner's log; a job retried after a kill: its last run)."""
    log, seconds = out / "logs" / "jobs.jsonl", {}
    for line in (log.read_text().splitlines() if log.exists() else []):
        entry = json.loads(line)
        if entry["returncode"] == 0:
            seconds[entry["job"]] = entry["seconds"]
    return seconds


def trained_steps(out: Path, run: str, batches: int) -> int | None:
    """Optimizer steps the run had made after ``batches`` batches (its metrics log), or None if not logged."""
    metrics = demo.run_dir(out, run) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    done = [r for r in rows if r["step"] == batches]
    return done[-1]["optimizer_steps"] if done else None


def budgets(out: Path, cfg: dict, pick: dict, n: int) -> dict[str, dict]:
    """Per arm: kind, training seed, eta, K, batches, optimizer steps as logged and training wall time (for a copy,
    its source's: the sweep run's job, or the LCM phase's segments up to N)."""
    seconds, found = job_seconds(out), {}
    segments = [s for s in study.segments(cfg, "distill") if s <= n]
    for name, spec in study.arm_specs(cfg, pick, n).items():
        source = spec["source"] or name
        if source == study.snapshot("distill", n):
            run, wall = "lcm", sum(seconds.get(f"segment-distill-{s}", 0.0) for s in segments)
        else:
            run, wall = source, seconds.get(f"train-{source}")
        steps = trained_steps(out, run, spec["batches"])
        if steps is not None:
            found[name] = {**spec, "optimizer_steps": steps, "wall_s": wall}
    return found


def decision(out: Path, cfg: dict) -> dict:
    """The rule's per-cell comparisons for each training seed, and the verdict."""
    from studies.adm_fair_verdict import margin_test
    at_names, ctl_names = zip(*study.RULE_PAIRS)
    per_seed, complete = [], True
    for at, ctl in study.RULE_PAIRS:
        rows = []
        for steps in cfg["steps"]:
            cells = {m: fid_cell(out, m, cfg["seeds"], steps) for m in {*at_names, *ctl_names}}
            measured = all(c is not None for c in cells.values())
            complete &= measured
            rows.append({"steps": steps, **(margin_test(cells, at, ctl, at_names, ctl_names) if measured
                                             else {"beaten": False, "measured": False})})
        per_seed.append({"at": at, "control": ctl, "cells": rows, "cells_beaten": sum(r["beaten"] for r in rows)})
    wins = all(s["cells_beaten"] >= cfg["rule_cells"] for s in per_seed)
    return {"training_seeds": per_seed, "complete": complete, "at_beats_control": wins and complete,
            "cells_needed": cfg["rule_cells"]}


def paired(out: Path, cfg: dict, pairs) -> list[dict]:
    """Descriptive: a - b per sampling seed (the same seeds, so paired), its mean and std, per step count."""
    rows = []
    for a, b in pairs:
        for steps in cfg["steps"]:
            fa, fb = (cell_fids(out, m, cfg["seeds"], steps) for m in (a, b))
            if fa and fb:
                diffs = [x - y for x, y in zip(fa, fb)]
                rows.append({"a": a, "b": b, "steps": steps, "differences": diffs, "mean": statistics.fmean(diffs),
                             "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0})
    return rows


def arm_cells(out: Path, cfg: dict) -> list[dict]:
    """Every arm's measured cells: classifier FID (mean/std over seeds), Inception FID, adherence, CLIP score."""
    rows = []
    for arm in study.ARMS:
        for steps in cfg["steps"]:
            found = fid_cell(out, arm, cfg["seeds"], steps)
            if found:
                rows.append({"model": arm, "metric": study.CLF, "steps": steps, **found})
        i = cfg["inception"]
        for steps in i["steps"]:
            found = fid_cell(out, arm, (i["seed"],), steps, "inception")
            if found:
                rows.append({"model": arm, "metric": "inception", "steps": steps, "num": i["num"], **found})
        for metric, path, key in (("adherence", demo.adherence_path, "accuracy"), ("clip", demo.clip_path,
                                                                                  "clip_score")):
            if path(out, arm, 0).exists():
                rows += [{"model": arm, "metric": metric, "steps": r["steps"], "mean": r[key], "num": r["num"],
                          "sem": r.get("clip_score_sem")} for r in read(path(out, arm, 0))["rows"]]
    return rows


def arms(out: Path, cfg: dict) -> dict:
    if not study.pick_path(out).exists():
        return {"pick": None}
    pick = read(study.pick_path(out))
    n = pick["budget"]
    return {"pick": pick, "budgets": budgets(out, cfg, pick, n), "cells": arm_cells(out, cfg),
            "decision": decision(out, cfg), "vs_lcm": paired(out, cfg, study.LCM_PAIRS),
            "vs_control": paired(out, cfg, study.RULE_PAIRS)}


def write_report(out: Path, cfg: dict) -> dict:
    from atdiff.runtime.staging import write_json
    from studies.lcm_fair_tables import tables_markdown
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    budget = study.chosen_path(out, "distill")
    n = read(budget)["step"] if budget.exists() else None
    result = {"teacher": curve(out, cfg, "teacher"), "distill": curve(out, cfg, "distill"),
              "sweep": sweep(out, cfg, n) if n else [], **arms(out, cfg)}
    write_json(report / "lcm_fair.json", result)
    (report / "tables.md").write_text(tables_markdown(result))
    return result
