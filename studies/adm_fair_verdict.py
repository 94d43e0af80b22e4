"""Phase B's report for studies/repro_adm_fair.py: the sweep, every arm's budget and cells, the paired differences
and the pre-registered decision rule (docs/results.md part III), from whatever has been measured so far.

The rule, as registered: AT beats the alpha = 0 control in every training seed, in >= 3 of the 4 decision cells,
by more than 2x the larger of the sampling spread (std over sampling seeds, the larger of the two arms') and the
training spread (|mean difference| between the two training seeds of the same arm, the larger of AT's and the
control's). A cell not yet measured at every seed counts as not beaten, and the record says the rule is incomplete.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from studies import adm_fair_study as study
from studies.adm_fair_arms import arm_names

TRAINING_SEEDS_OF = {"at": ("at-{pick}-s1", "at-pick-s2"), "ctl": ("ctl-s1", "ctl-s2"), "ft": ("ft-s1", "ft-s2")}


def cell(out: Path, model: str, sampler: str, nfe: int, seeds) -> dict | None:
    """mean and std of one model's FID over the sampling seeds, or None until every seed is measured."""
    paths = [study.cell_path(out, model, sampler, s, nfe) for s in seeds]
    if not all(p.exists() for p in paths):
        return None
    fids = [json.loads(p.read_text())["rows"][0]["fid"] for p in paths]
    return {"fids": fids, "mean": statistics.fmean(fids), "std": statistics.stdev(fids) if len(fids) > 1 else 0.0}


def budgets(out: Path) -> dict[str, dict]:
    """Per run: batches and optimizer steps (its metrics log's last row) and training wall time (the runner's log)."""
    seconds = {}
    log = out / "logs" / "jobs.jsonl"
    for line in (log.read_text().splitlines() if log.exists() else []):
        entry = json.loads(line)
        if entry["returncode"] == 0 and entry["job"].startswith("train-"):
            seconds[entry["job"][len("train-"):]] = entry["seconds"]
    found = {}
    for name in seconds:
        metrics = study.run_dir(out, name) / "metrics.jsonl"
        if metrics.exists():
            last = json.loads(metrics.read_text().splitlines()[-1])
            found[name] = {"batches": last["step"], "optimizer_steps": last["optimizer_steps"],
                           "wall_s": seconds[name]}
    return found


def decision(out: Path, cfg: dict, pick_variant: str) -> dict:
    """The rule's per-cell comparisons for each training seed, and the verdict."""
    seeds, d = cfg["grid"]["seeds"], cfg["decision"]
    at_names = [n.format(pick=pick_variant) for n in TRAINING_SEEDS_OF["at"]]
    per_seed, complete = [], True
    for i, (at, ctl) in enumerate(zip(at_names, TRAINING_SEEDS_OF["ctl"])):
        rows = []
        for sampler in d["samplers"]:
            for nfe in d["nfes"]:
                row = compare(out, sampler, nfe, seeds, at, ctl, at_names, TRAINING_SEEDS_OF["ctl"])
                complete &= row is not None
                rows.append(row or {"sampler": sampler, "nfe": nfe, "beaten": False, "measured": False})
        per_seed.append({"at": at, "control": ctl, "cells": rows, "cells_beaten": sum(r["beaten"] for r in rows)})
    wins = all(s["cells_beaten"] >= 3 for s in per_seed)
    return {"training_seeds": per_seed, "complete": complete, "at_beats_control": wins and complete}


def compare(out, sampler, nfe, seeds, at, ctl, at_names, ctl_names) -> dict | None:
    cells = {name: cell(out, name, sampler, nfe, seeds) for name in {at, ctl, *at_names, *ctl_names}}
    if any(c is None for c in cells.values()):
        return None
    return {"sampler": sampler, "nfe": nfe, **margin_test(cells, at, ctl, at_names, ctl_names)}


def margin_test(cells: dict[str, dict], at: str, ctl: str, at_names, ctl_names) -> dict:
    """One cell of the rule: ``at`` beats ``ctl`` when its mean FID is lower by more than 2x the larger of the
    sampling spread (the two models' std over sampling seeds) and the training spread (|mean difference| between
    the training seeds of the same arm, ``at_names`` and ``ctl_names``); ``cells``: name -> ``cell(...)``."""
    sampling = max(cells[at]["std"], cells[ctl]["std"])
    training = max(abs(cells[a]["mean"] - cells[b]["mean"]) for a, b in (at_names, ctl_names))
    diff = cells[at]["mean"] - cells[ctl]["mean"]
    margin = 2 * max(sampling, training)
    return {"at": cells[at]["mean"], "control": cells[ctl]["mean"], "difference": diff, "sampling_spread": sampling,
            "training_spread": training, "margin": margin,
            "spread_used": "sampling" if sampling >= training else "training", "beaten": diff < -margin,
            "measured": True}


def arm_table(out: Path, cfg: dict) -> list[dict]:
    """Every model's mean/std FID in every measured cell of the grid."""
    models = [study.BASE_ARM, *arm_names(cfg)]
    seeds, rows = cfg["grid"]["seeds"], []
    for model in models:
        for sampler in cfg["grid"]["samplers"]:
            for nfe in cfg["grid"]["nfes"]:
                found = cell(out, model, sampler, nfe, seeds)
                if found:
                    rows.append({"model": model, "sampler": sampler, "nfe": nfe, "num": cfg["grid"]["num"], **found})
    return rows


def exposure(out: Path, cfg: dict) -> dict[str, dict]:
    """Each model's exposure-bias summary (toolkit eval exposure-bias), where measured."""
    found = {}
    for model in [study.BASE_ARM, *arm_names(cfg)]:
        path = study.exposure_path(out, model) / "exposure_bias.json"
        if path.exists():
            record = json.loads(path.read_text())
            found[model] = {"summary": record["summary"],
                            "mean_abs_sq_norm_diff": statistics.fmean(abs(r["sq_norm_diff"]) for r in record["rows"]),
                            "mean_eps_consistency": statistics.fmean(r["sampler_eps_consistency"]
                                                                     for r in record["rows"]),
                            "mean_q_eps_error": statistics.fmean(r["q_eps_error"] for r in record["rows"])}
    return found


def phase_b(out: Path, cfg: dict) -> dict:
    pick_file = study.pick_path(out, final=True)
    if not pick_file.exists():
        return {"pick": None}
    pick = json.loads(pick_file.read_text())
    return {"pick": pick, "budgets": budgets(out), "cells": arm_table(out, cfg), "exposure_bias": exposure(out, cfg),
            "decision": decision(out, cfg, pick["best"]["variant"])}
