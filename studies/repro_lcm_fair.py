"""The fair re-test of LCM-AT against LCM on the demo text-to-image model (issue 29, docs/results.md part III, LCM
part), resumably.

    python -m studies.repro_lcm_fair --out DIR --scale session --jobs 2 --threads 1   # the registered budgets
    python -m studies.repro_lcm_fair --out /tmp/lcm-fair-quick --quick                # every stage, tiny budgets
    python -m studies.repro_lcm_fair --out DIR --list                                 # the jobs, and which are done
    python -m studies.repro_lcm_fair _report --out DIR --scale session                # the tables from what exists

Rerunning the same command resumes: finished jobs are skipped, trainers continue from their checkpoints and FID
cells from their per-chunk caches. The design and criteria are in studies/lcm_fair_study.py; the stages:
1. part II's data, VAE and CLIP (studies/repro_demo.py's own jobs) and the reference statistics: the test split
   (the cells) and the train split (the sweep's held-out pick);
2. the teacher, part II's recipe, in segments (``--resume`` to a growing --max-steps), a snapshot after each,
   classifier FID of each (DDIM 25 + CFG 3, 3 sampling seeds), the convergence check of each snapshot against the
   next; the first converged snapshot is the teacher;
3. plain ``toolkit train lcm`` from it the same way (cells at 1, 2 and 4 steps): the first converged snapshot gives
   the budget N (optimizer steps);
4. the sweep: LCM-AT at eta x K and eta = 0 at each K, N optimizer steps each, training seed 1, held-out FID
   against the train split on sampling seeds 9,000,000+; the pick;
5. the arms (LCM, LCM-AT at the pick and its eta = 0 control at equal optimizer steps, training seeds 1 and 2;
   LCM-AT and its control at equal batches, seed 1), the decision rule's models first; every arm's classifier FID
   at 1/2/4/8 steps (3 seeds), then prompt adherence, CLIP score and the Inception FID (seed 0); 6. the report.
"""
from __future__ import annotations

import sys
from pathlib import Path

from studies import demo_study as demo
from studies import lcm_fair_study as study
from studies.lcm_fair_stages import arm_spec, budget, distill_command
from studies.repro_adm import ref_path, stats_command
from studies.study_runner import Job, module, study_main

CLF = study.CLF
PART_II_JOBS = ("captions", "train-vae", f"ref-{CLF}", "ref-inception", "train-clip")


def stage(*args) -> list[str]:
    return module("studies.repro_lcm_fair", *args)


def part_ii_jobs(out: Path, cfg: dict, quick: bool) -> list[Job]:
    """Part II's own jobs for the data, the VAE, the test-split references and the CLIP, unchanged, and the
    train-split reference of the held-out pick (part III's command)."""
    from studies.repro_demo import evaluation_jobs, training_jobs
    found = {job.name: job for job in training_jobs(out, cfg, quick) + evaluation_jobs(out, cfg, quick)}
    train_ref = Job(f"ref-{CLF}-train", lambda: stats_command(out, cfg, "train", CLF), ref_path(out, "train", CLF))
    return [found[name] for name in PART_II_JOBS] + [train_ref]


def phase_jobs(out: Path, cfg: dict, phase: str, q: list, first: tuple[str, ...]) -> list[Job]:
    """The segment chain (segment i also waits for the check that may make it unneeded), each snapshot's cells, the
    checks (a snapshot against the next) and the choice."""
    steps, seg, jobs = study.segments(cfg, phase), cfg[phase]["segment"], []
    for i, step in enumerate(steps):
        deps = first if i == 0 else (f"segment-{phase}-{steps[i - 1]}",) + (
            (f"check-{phase}-{steps[i - 2]}",) if i >= 2 else ())
        jobs.append(Job(f"segment-{phase}-{step}",
                        lambda s=step: stage("_segment", "--out", out, "--phase", phase, "--step", s, *q),
                        out / "segments" / f"{phase}-{step}.json", deps))
    jobs += [Job(f"cells-{phase}-{step}", lambda s=step: stage("_cells", "--out", out, "--phase", phase, "--step", s, *q),
                 out / "cells" / "done" / f"{study.snapshot(phase, step)}.json", (f"segment-{phase}-{step}", f"ref-{CLF}"))
             for step in steps]
    points = study.check_points(cfg, phase)
    jobs += [Job(f"check-{phase}-{step}", lambda s=step: stage("_check", "--out", out, "--phase", phase, "--step", s, *q),
                 study.check_path(out, phase, step), (f"cells-{phase}-{step}", f"cells-{phase}-{step + seg}"))
             for step in points]
    return jobs + [Job(f"choose-{phase}", lambda: stage("_choose", "--out", out, "--phase", phase, *q),
                       study.chosen_path(out, phase), tuple(f"check-{phase}-{s}" for s in points))]


def model_done(out: Path, name: str) -> Path:
    return demo.model_dir(out, name) / "training.json"


def sweep_command(out: Path, cfg: dict, point: dict) -> list[str]:
    """LCM-AT at ``point`` for N optimizer steps (N / K batches), training seed 1."""
    spec = dict(point, kind="lcm-at", batches=budget(out) // point["adv_steps"], seed=cfg["arms"]["train_seeds"][0])
    return distill_command(out, cfg, study.point_name(point), spec)


def sweep_jobs(out: Path, cfg: dict, q: list) -> list[Job]:
    ref, jobs = f"ref-{CLF}-train", []
    for point in study.sweep_points(cfg):
        name = study.point_name(point)
        jobs.append(Job(f"train-{name}", lambda p=point: sweep_command(out, cfg, p), model_done(out, name),
                        ("choose-distill",)))
    held = [(n, (f"train-{n}", ref)) for n in (study.point_name(p) for p in study.sweep_points(cfg))]
    held.append(("lcm", ("choose-distill", ref)))   # plain LCM at N: the sweep's reference row
    jobs += [Job(f"heldout-{n}", lambda n=n: stage("_heldout", "--out", out, "--model", n, *q),
                 study.heldout_path(out, n), deps) for n, deps in held]
    return jobs + [Job("pick", lambda: stage("_pick", "--out", out, *q), study.pick_path(out),
                       tuple(f"heldout-{n}" for n, _ in held))]


def arm_command(out: Path, cfg: dict, name: str, q: list) -> list[str]:
    """A copy of the run that already made this arm (same command and seed), else its training command."""
    spec = arm_spec(out, cfg, name)
    return stage("_alias", "--out", out, "--model", name, *q) if spec["source"] else distill_command(out, cfg, name,
                                                                                                      spec)


def arm_jobs(out: Path, cfg: dict, q: list) -> list[Job]:
    """Training and classifier cells of the rule's arms, then of the others, then every arm's other metrics: the
    runner starts ready jobs in list order, so a short budget decides the rule first."""
    jobs = []
    for names in (study.RULE_ARMS, [a for a in study.ARMS if a not in study.RULE_ARMS]):
        jobs += [Job(f"train-{n}", lambda n=n: arm_command(out, cfg, n, q), model_done(out, n), ("pick",))
                 for n in names]
        jobs += [cells_job(out, n, "classifier", q, (f"train-{n}", f"ref-{CLF}")) for n in names]
    return jobs + [cells_job(out, n, "rest", q, (f"train-{n}", "ref-inception", "train-clip")) for n in study.ARMS]


def cells_job(out: Path, name: str, group: str, q: list, deps: tuple[str, ...]) -> Job:
    return Job(f"{group}-{name}", lambda: stage("_armcells", "--out", out, "--model", name, "--group", group, *q),
               out / "cells" / "done" / f"{group}-{name}.json", deps)


def build_jobs(out: Path, scale: bool | str) -> list[Job]:
    """The teacher's segment chain first (the longest path), then what measures it; part II's data, VAE, references
    and CLIP; LCM's chain from the chosen teacher; the sweep; the arms; the report."""
    name = "quick" if scale is True else "session" if scale is False else scale
    cfg, q = study.config_for(name), ["--scale", name]
    first = part_ii_jobs(out, cfg, name == "quick")
    jobs = first[:2] + phase_jobs(out, cfg, "teacher", q, ("train-vae",)) + first[2:]
    jobs += phase_jobs(out, cfg, "distill", q, ("choose-teacher",))
    jobs += sweep_jobs(out, cfg, q) + arm_jobs(out, cfg, q)
    jobs.append(Job("report", lambda: stage("_report", "--out", out, *q), out / "report" / "lcm_fair.json",
                    tuple(job.name for job in jobs), refresh=True))
    return jobs


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # internal stages, run by the jobs
        from studies import lcm_fair_stages
        return lcm_fair_stages.main(sys.argv[1:])
    return study_main(argv, __doc__.splitlines()[0], build_jobs, study.config_for, tuple(study.SCALES))


if __name__ == "__main__":
    sys.exit(main())
