"""Phase B of the fair re-test (docs/results.md part III): the AT strength sweep and the arms, all fine-tuned from
the converged base with one recipe, as training commands and jobs for studies/repro_adm_fair.py.

Every arm with training seed s sees the same batches and t/eps draws as the other arms of seed s (the trainer
derives them from (seed, step)), so arm differences are paired. Free AT's --max-steps counts batches: at K = 3 an
arm of B/3 batches makes B optimizer steps ("equal steps"), one of B batches 3B ("equal data").
"""
from __future__ import annotations

import json
from pathlib import Path

from studies import adm_fair_study as study
from studies.study_runner import Job, module, toolkit


def finetune(out: Path, name: str, kind: str, batches: int, seed: int, cfg: dict, extra: list) -> list[str]:
    f = cfg["finetune"]
    return toolkit("train", kind, "--data", "fashion-mnist", "--init", study.run_dir(out, study.BASE_ARM) / "model",
                   "--out", study.run_dir(out, name), "--max-steps", batches, "--batch-size", f["batch"], "--lr",
                   f["lr"], "--ema-decay", f["ema"], "--no-ema-warmup", "--seed", seed, "--save-every",
                   cfg["save_every"], "--log-every", 10, "--resume", *extra)


def at_args(point: dict, cfg: dict, alpha: float | None = None) -> list:
    """Free AT at a sweep point; ``alpha`` = 0 makes the batch-reuse control (delta stays 0)."""
    return ["--adv-steps", cfg["arms"]["adv_steps"], "--adv-lr", point["alpha"] if alpha is None else alpha,
            "--adv-max-norm", point["bound"], "--adv-target-grad", point["variant"], "--timestep-sampler",
            point["timestep_sampler"]]


def sweep_command(out: Path, point: dict, cfg: dict, name: str | None = None) -> list[str]:
    """One sweep run: a short free-AT fine-tune at ``point`` (run name: the point's, unless ``name``)."""
    return finetune(out, name or study.point_name(point), "adm-at", cfg["sweep"]["batches"],
                    cfg["arms"]["train_seeds"][0], cfg, at_args(point, cfg))


def arm_specs(cfg: dict, pick: dict) -> dict[str, tuple[str, int, int, list]]:
    """name -> (toolkit train kind, batches, training seed, extra args), from the final pick (arms.json)."""
    a = cfg["arms"]
    steps_batches, data_batches, (s1, s2) = a["batches"] // a["adv_steps"], a["batches"], a["train_seeds"]
    best, by_variant = pick["best"], pick["best_by_variant"]
    specs = {f"ft-s{s}": ("adm", a["batches"], s, []) for s in (s1, s2)}
    specs["ip-s1"] = ("adm-ip", a["batches"], s1, ["--ip-gamma", a["ip_gamma"]])
    for variant, point in by_variant.items():
        specs[f"at-{variant}-s1"] = ("adm-at", steps_batches, s1, at_args(point, cfg))
    specs["at-pick-s2"] = ("adm-at", steps_batches, s2, at_args(best, cfg))  # the picked AT arm, seed 2
    specs["at-data-s1"] = ("adm-at", data_batches, s1, at_args(best, cfg))
    for s in (s1, s2):
        specs[f"ctl-s{s}"] = ("adm-at", steps_batches, s, at_args(best, cfg, alpha=0.0))
    specs["ctl-data-s1"] = ("adm-at", data_batches, s1, at_args(best, cfg, alpha=0.0))
    return specs


def arm_names(cfg: dict) -> list[str]:
    """Every arm, in the order they are trained: the decision rule's models first (the alpha = 0 controls and the AT
    arms of both training seeds; the pick is not known when the jobs are built, so both variants' seed-1 arms),
    then the rest of the table. at-pick-s2 is the picked variant (arms.json says which) at the second seed."""
    return [*rule_arms(cfg), "ft-s1", "ft-s2", "ip-s1", "at-data-s1", "ctl-data-s1"]


def rule_arms(cfg: dict) -> list[str]:
    return ["ctl-s1", "ctl-s2", "at-pick-s2", *(f"at-{x}-s1" for x in cfg["sweep"]["variants"])]


def arm_command(out: Path, name: str, cfg: dict) -> list[str]:
    pick = json.loads(study.pick_path(out, final=True).read_text())
    kind, batches, seed, extra = arm_specs(cfg, pick)[name]
    return finetune(out, name, kind, batches, seed, cfg, extra)


def model_done(out: Path, name: str) -> Path:
    return study.run_dir(out, name) / "model" / "training.json"


def sweep_jobs(out: Path, cfg: dict, stage, q: list) -> list[Job]:
    ref = f"ref-{study.CLF}-train"
    jobs, held = [], []
    points = study.sweep_points(cfg)
    for point in points:
        name = study.point_name(point)
        jobs.append(Job(f"train-{name}", lambda p=point: sweep_command(out, p, cfg), model_done(out, name),
                        ("choose-base",)))
        jobs.append(Job(f"heldout-{name}", lambda n=name: stage("_heldout", "--out", out, "--model", n, *q),
                        study.heldout_path(out, name), (f"train-{name}", ref)))
        held.append(f"heldout-{name}")
    jobs.append(Job("pick", lambda: stage("_pick", "--out", out, *q), study.pick_path(out), tuple(held)))
    # the reference's loss-second-moment t sampler, tried once at the uniform pick
    lsm = "sweep-lsm"
    jobs.append(Job(f"train-{lsm}", lambda: stage("_train_lsm", "--out", out, *q), model_done(out, lsm), ("pick",)))
    jobs.append(Job(f"heldout-{lsm}", lambda: stage("_heldout", "--out", out, "--model", lsm, *q),
                    study.heldout_path(out, lsm), (f"train-{lsm}", ref)))
    jobs.append(Job("pick-final", lambda: stage("_pick", "--out", out, "--final", *q), study.pick_path(out, True),
                    ("pick", f"heldout-{lsm}")))
    return jobs


def arm_jobs(out: Path, cfg: dict, stage, q: list, quick: bool = False) -> list[Job]:
    """Training and the decision rule's cells of the rule's models (rule_arms), then the same for the other models,
    then each model's exposure bias and ES factor (part I's stage, on guided-diffusion's DDIM: part I's budgets, or
    its quick ones) and the rest of the table. The runner starts ready jobs in list order, so on a short budget the
    rule is decided first."""
    rule = rule_arms(cfg)
    later = [n for n in [study.BASE_ARM, *arm_names(cfg)] if n not in rule]
    trained = {name: "choose-base" if name == study.BASE_ARM else f"train-{name}" for name in [*rule, *later]}
    jobs = []
    for names in (rule, later):
        jobs += [Job(trained[n], lambda n=n: arm_command(out, n, cfg), model_done(out, n), ("pick-final",))
                 for n in names if n != study.BASE_ARM]
        jobs += grid_jobs(out, cfg, stage, q, "decision", {n: (trained[n],) for n in names})
    models = [*rule, *later]
    jobs += [exposure_job(out, name, trained[name]) for name in models]
    jobs += [es_job(out, name, trained[name], quick) for name in models]
    jobs += grid_jobs(out, cfg, stage, q, "rest", {n: (f"es-{n}",) for n in models})
    return jobs


def exposure_job(out: Path, name: str, dep: str) -> Job:
    e = study.EXPOSURE
    return Job(f"exposure-{name}", lambda: toolkit("eval", "exposure-bias", study.run_dir(out, name) / "model",
                                                   "--sampler", e["sampler"], "--nfe", e["nfe"], "--num", e["num"],
                                                   "--data", e["data"], "--seed", e["seed"], "--device", "cpu",
                                                   "--out", study.exposure_path(out, name)),
               study.exposure_path(out, name) / "exposure_bias.json", (dep,))


def es_job(out: Path, name: str, dep: str, quick: bool) -> Job:
    from studies.adm_study import es_path
    flags = ["--quick"] if quick else []
    return Job(f"es-{name}", lambda: module("studies.repro_adm", "_es", "--out", out, "--model", name,
                                            "--sampler", "ddim_gd", *flags),
               es_path(out, name, "ddim_gd"), (dep, f"ref-{study.CLF}-train"))


def grid_jobs(out: Path, cfg: dict, stage, q: list, group: str, deps: dict[str, tuple[str, ...]]) -> list[Job]:
    """One job per (sampling seed, model) for a group of cells, seed by seed (one complete table first)."""
    return [Job(f"grid-{group}-{name}-seed{seed}",
                lambda n=name, s=seed: stage("_grid", "--out", out, "--model", n, "--seeds", s, "--group", group, *q),
                out / "cells" / "done" / f"{group}-{name}-seed{seed}.json", (*dep, f"ref-{study.CLF}-test"))
            for seed in cfg["grid"]["seeds"] for name, dep in deps.items()]
