"""The fair re-test of adversarial training on Fashion-MNIST (issue 29, docs/results.md part III), resumably.

    python -m studies.repro_adm_fair --out /work/study/adm-fair            # real budgets: many CPU hours
    python -m studies.repro_adm_fair --out DIR --scale session             # the same stages in one session (~90 min)
    python -m studies.repro_adm_fair --out /tmp/fair-quick --quick         # every stage, tiny budgets (minutes)
    python -m studies.repro_adm_fair --out DIR --list                      # the jobs and whether each is done
    python -m studies.repro_adm_fair --out DIR --scale medium --publish-base models/B   # phase A's product, to commit
    python -m studies.repro_adm_fair --out NEW --scale medium --from-base models/B      # phase B, another session

Phase A, converging the base (the criterion is in studies/adm_fair_study.py, written before the run):
1. reference statistics: classifier features of the Fashion-MNIST test split (the cells' reference) and of the
   train split (the held-out reference of later picks);
2. the base from scratch in segments (``toolkit train adm --preset fmnist --resume`` to a growing --max-steps),
   a snapshot of its EMA weights after each;
3. the curve: classifier FID of each snapshot under guided-diffusion's DDIM and DPM-Solver++(2M) at NFE 10;
4. at each check point, a plain fine-tune of the snapshot with the arms' recipe and both models at three sampling
   seeds; the verdict says whether the base has converged; segments after the first passing check are skipped;
5. the report: the curve (JSON, CSV, PNG) and the verdicts.

Phase B, from the chosen base (studies/adm_fair_arms.py; the design is docs/results.md part III):
6. the AT strength sweep: short free-AT fine-tunes over alpha x bound x variant, each scored on held-out seeds
   against the train split; the pick, then the loss-second-moment t sampler tried at the pick;
7. the arms (FT, IP, AT full/detach at equal steps, AT at equal data, the alpha = 0 batch-reuse controls, second
   training seeds), their ES factors, and their classifier-FID cells: the decision rule's cells of every model
   first, then the rest of the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from studies import adm_fair_study as study
from studies.adm_fair_arms import arm_jobs, sweep_jobs
from studies.repro_adm import stats_command
from studies.study_runner import Job, module, study_main


def stage(*args) -> list[str]:
    return module("studies.repro_adm_fair", *args)


def build_jobs(out: Path, scale: bool | str) -> list[Job]:
    """The segment chain first (one job at a time, the longest path), then what measures it; the runner's second
    slot takes the curve cells and checks as their snapshots appear."""
    name = study.scale_name(scale)
    cfg, q = study.config_for(name), {"quick": ["--quick"], "full": []}.get(name, ["--scale", name])
    ref = "ref-fmnist-classifier-test"
    jobs = [Job(f"ref-{study.CLF}-{split}", lambda s=split: stats_command(out, cfg, s, study.CLF), study.ref_path(out, split))
            for split in ("test", "train")]
    previous: tuple[str, ...] = ()
    for step in study.segments(cfg):
        jobs.append(Job(f"segment-{step}", lambda s=step: stage("_segment", "--out", out, "--step", s, *q),
                        out / "segments" / f"base-{step}.json", previous))
        previous = (f"segment-{step}",)
    for step in study.segments(cfg):
        name, seed = f"base-{step}", cfg["curve"]["seed"]
        jobs.append(Job(f"curve-{step}", lambda n=name: stage("_cells", "--out", out, "--model", n, "--seeds", seed, *q),
                        out / "cells" / "done" / f"{name}-seeds{seed}.json", (f"segment-{step}", ref)))
    for step in study.check_points(cfg):
        jobs.append(Job(f"ft-check-{step}", lambda s=step: stage("_ftcheck", "--out", out, "--step", s, *q),
                        out / "segments" / f"ft-check-{step}.json", (f"segment-{step}",)))
        jobs.append(Job(f"check-{step}", lambda s=step: stage("_check", "--out", out, "--step", s, *q),
                        study.verdict_path(out, step), (f"ft-check-{step}", f"curve-{step}")))
    checks = tuple(f"check-{step}" for step in study.check_points(cfg))
    jobs.append(Job("choose-base", lambda: stage("_choose", "--out", out, *q), out / "base.json", checks))
    jobs += sweep_jobs(out, cfg, stage, q) + arm_jobs(out, cfg, stage, q, name == "quick")
    jobs.append(Job("report", lambda: stage("_report", "--out", out, *q), out / "report" / "curve.json",
                    tuple(job.name for job in jobs), refresh=True))
    return jobs


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # internal stages, run by the jobs
        from studies import adm_fair_stages
        return adm_fair_stages.main(sys.argv[1:])
    argv, carry = carry_options(sys.argv[1:] if argv is None else argv)
    if carry.publish_base or carry.from_base:
        from studies import adm_fair_carry
        scale = "quick" if carry.quick else carry.scale
        if carry.publish_base:
            print(f"phase A published to {adm_fair_carry.publish_base(carry.out.resolve(), carry.publish_base, scale)}")
            return 0
        carry.out.mkdir(parents=True, exist_ok=True)
        base = adm_fair_carry.import_base(carry.from_base.resolve(), carry.out.resolve(), scale)["base"]
        print(f"phase A from {carry.from_base}: base at step {base['step']} (converged: {base['converged']})")
    return study_main(argv, __doc__.splitlines()[0], build_jobs, study.config_for, tuple(study.SCALES),
                      epilog="--publish-base DIR: write phase A's chosen base and records to a new DIR (to commit); "
                             "--from-base DIR: start from one, for phase B in another session "
                             "(studies/adm_fair_carry.py)")


def carry_options(argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    """--publish-base DIR / --from-base DIR (studies/adm_fair_carry.py); the rest goes to the shared command line.
    --out, --scale and --quick are read here too and passed on."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--publish-base", type=Path, help="Write phase A's chosen base and records to a new DIR.")
    parser.add_argument("--from-base", type=Path, help="Start from a published phase A (DIR from --publish-base).")
    carry, rest = parser.parse_known_args(argv)
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--out", type=Path)
    shared.add_argument("--scale", default="full")
    shared.add_argument("--quick", action="store_true")
    known, _ = shared.parse_known_args(rest)
    if (carry.publish_base or carry.from_base) and known.out is None:
        raise SystemExit("--publish-base / --from-base need --out (the study directory)")
    return rest, argparse.Namespace(**vars(carry), **vars(known))


if __name__ == "__main__":
    sys.exit(main())
