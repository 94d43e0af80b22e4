"""The fair re-test of LCM-AT against LCM on the demo text-to-image model (issue 29, docs/results.md part III, "LCM
part") as data: budgets, the pre-registered convergence criteria, the sweep, the arms and where each result lives
under the study directory. studies/repro_lcm_fair.py turns it into jobs; studies/lcm_fair_stages.py runs them.

The layout under the study directory is part II's (studies/demo_study.py: runs/NAME/model, refs/FEATURES-test.npz,
cells/FEATURES/MODEL-seedS.json), so part II's data, VAE, CLIP and cell stages run on it unchanged.

The criteria, written before any number was seen (the same for both phases):

    a phase (the teacher, then plain LCM from it) is trained in segments, a snapshot kept after each, and every
    snapshot measured at 3 sampling seeds in the phase's cells. It counts as converged at snapshot S when, in every
    cell, |mean FID(next snapshot) - mean FID(S)| < 2 sigma, sigma the larger of the two snapshots' std over the
    seeds: one more segment of plain training no longer helps by more than the sampling noise. The first such S is
    the phase's result (the teacher; LCM's budget N in optimizer steps); segments after the one that judges it are
    not trained. If no S passes, the last snapshot is the result and the report says it is not converged.
"""
from __future__ import annotations

from pathlib import Path

from studies import demo_study as demo

CLF = demo.CLF
SEEDS = (0, 1_000_000, 2_000_000)
# part II's data, VAE and CLIP at the full study's budgets (and the keys its job builders read)
_PART_II = ("data", "captions", "vae", "clip", "ref_num", "compare")

# The arms' cells are part II's keys (steps, seeds, num, per_class, inception), so part II's FID, adherence and CLIP
# stages (studies/demo_study_stages.py) measure the arms with this config as it is.
SESSION = dict(
    {k: demo.FULL[k] for k in _PART_II}, save_every=250,
    steps=(1, 2, 4, 8), seeds=SEEDS, num=2000, per_class=100, inception=dict(steps=(4,), num=2000, seed=0),
    # part II's teacher recipe, trained on in segments of its 3500 steps
    teacher=dict(batch=64, lr=3e-4, ema=0.999, seed=0, segment=3500, last=10500,
                 cells=dict(steps=(25,), seeds=SEEDS, num=2000)),
    # part II's distillation recipe (toolkit train lcm); segments count optimizer steps (= batches for plain LCM)
    distill=dict(batch=32, lr=1e-4, w_min=1.0, w_max=3.0, ema=0.95, seed=1, segment=1200, last=4800,
                 cells=dict(steps=(1, 2, 4), seeds=SEEDS, num=2000)),
    # LCM-AT: eta is both the per-element ascent step (--adv-lr) and the bound (--adv-max-norm), as in part II
    sweep=dict(etas=(0.005, 0.015, 0.05), adv_steps=(2, 3), heldout=dict(steps=(2, 4), num=2000, seed=9_000_000)),
    # the decision rule: LCM-AT must beat its control in this many of the classifier-FID cells (steps), every seed
    arms=dict(train_seeds=(1, 2)), rule_cells=3)
QUICK = dict(
    {k: demo.QUICK[k] for k in _PART_II}, save_every=0,
    steps=(1, 2), seeds=(0, 1000), num=32, per_class=2, inception=dict(steps=(2,), num=8, seed=0),
    teacher=dict(batch=8, lr=3e-4, ema=0.9, seed=0, segment=4, last=8, cells=dict(steps=(3,), seeds=(0, 1000), num=32)),
    distill=dict(batch=4, lr=1e-4, w_min=1.0, w_max=3.0, ema=0.95, seed=1, segment=6, last=18,
                 cells=dict(steps=(1, 2), seeds=(0, 1000), num=32)),
    sweep=dict(etas=(0.05,), adv_steps=(2, 3), heldout=dict(steps=(1, 2), num=32, seed=9000)),
    arms=dict(train_seeds=(1, 2)), rule_cells=1)
SCALES = {"session": SESSION, "quick": QUICK}
PHASES = ("teacher", "distill")
PHASE_RUN = {"teacher": "teacher", "distill": "lcm"}   # the growing run of each phase, runs/NAME


def config_for(scale: str | bool) -> dict:
    """``--quick`` (True) is the quick scale; a name passes through."""
    return SCALES["quick" if scale is True else "session" if scale is False else scale]


def segments(cfg: dict, phase: str) -> list[int]:
    p = cfg[phase]
    return list(range(p["segment"], p["last"] + 1, p["segment"]))


def check_points(cfg: dict, phase: str) -> list[int]:
    """Snapshots that can be judged: every one but the last (the check compares S with the next snapshot)."""
    return segments(cfg, phase)[:-1]


def snapshot(phase: str, step: int) -> str:
    """The model name of a phase's snapshot (runs/NAME/model, a copy of the run's model/ after the segment)."""
    return f"{PHASE_RUN[phase]}-{step}"


def check_path(out: Path, phase: str, step: int) -> Path:
    return out / "checks" / f"{phase}-{step}.json"


def chosen_path(out: Path, phase: str) -> Path:
    """teacher.json (the chosen teacher snapshot) or budget.json (N, LCM's optimizer steps)."""
    return out / ("teacher.json" if phase == "teacher" else "budget.json")


def sweep_points(cfg: dict) -> list[dict]:
    """eta x K, then the eta = 0 batch-reuse control at each K."""
    s = cfg["sweep"]
    return [{"eta": e, "adv_steps": k} for k in s["adv_steps"] for e in (*s["etas"], 0.0)]


def point_name(point: dict) -> str:
    return f"sweep-k{point['adv_steps']}-eta{point['eta']}"


def heldout_path(out: Path, name: str) -> Path:
    return out / "heldout" / f"{name}.json"


def pick_path(out: Path) -> Path:
    return out / "pick.json"


def arm_specs(cfg: dict, pick: dict, budget: int) -> dict[str, dict]:
    """name -> kind, batches, training seed, eta, K, and ``source``: the run it is a bitwise copy of (the same
    command at the same seed already ran: the LCM phase's snapshot at N, the sweep's runs at seed 1), or None."""
    (s1, s2), best = cfg["arms"]["train_seeds"], pick["best"]
    k, eta = best["adv_steps"], best["eta"]
    control = point_name({"eta": 0.0, "adv_steps": k})
    arm = lambda kind, batches, seed, e, source=None: dict(  # noqa: E731
        kind=kind, batches=batches, seed=seed, eta=e, adv_steps=k if kind == "lcm-at" else 1, source=source)
    return {"ctl-s1": arm("lcm-at", budget // k, s1, 0.0, control), "lcmat-s1": arm("lcm-at", budget // k, s1, eta,
                                                                                    point_name(best)),
            "lcmat-s2": arm("lcm-at", budget // k, s2, eta), "ctl-s2": arm("lcm-at", budget // k, s2, 0.0),
            "lcm-s1": arm("lcm", budget, s1, None, snapshot("distill", budget)), "lcm-s2": arm("lcm", budget, s2, None),
            "lcmat-data-s1": arm("lcm-at", budget, s1, eta), "ctl-data-s1": arm("lcm-at", budget, s1, 0.0)}


RULE_ARMS = ("ctl-s1", "lcmat-s1", "lcmat-s2", "ctl-s2")   # the decision rule's models: trained and measured first
ARMS = (*RULE_ARMS, "lcm-s1", "lcm-s2", "lcmat-data-s1", "ctl-data-s1")
# the rule's pairs per training seed (LCM-AT, its eta = 0 control), and the descriptive pairs against plain LCM
RULE_PAIRS = (("lcmat-s1", "ctl-s1"), ("lcmat-s2", "ctl-s2"))
LCM_PAIRS = (("lcmat-s1", "lcm-s1"), ("lcmat-s2", "lcm-s2"))
