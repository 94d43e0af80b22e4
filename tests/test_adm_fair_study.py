"""The fair AT re-test's phase A logic (scripts/adm_fair_*): the pre-registered convergence criterion, which
segments are skipped after it passes, and which snapshot becomes the arms' base."""
from __future__ import annotations

import json

from scripts import adm_fair_study as study
from scripts.adm_fair_report import chosen_base
from scripts.adm_fair_stages import converged_before, judge, train_base
from scripts.repro_adm_fair import build_jobs
from tolerance import EPS64


def test_judge_passes_only_when_every_cell_moves_less_than_two_seed_stds():
    base = {"ddim_gd": [10.0, 10.2, 9.8], "dpmpp_2m": [6.0, 6.1, 5.9]}   # stds 0.2 and 0.1
    within = {"ddim_gd": [10.2, 10.3, 10.1], "dpmpp_2m": [5.9, 6.0, 5.8]}  # moves 0.2 (< 0.4) and 0.1 (< 0.2)
    assert judge(base, within)["converged"]
    gained = dict(within, dpmpp_2m=[5.6, 5.7, 5.5])                        # moves 0.4 >= 2 x 0.1
    verdict = judge(base, gained)
    assert not verdict["converged"]
    assert verdict["cells"]["ddim_gd"]["within"] and not verdict["cells"]["dpmpp_2m"]["within"]
    # the inputs' own rounding, two means of three and a difference, in float64 near 6: ~12 roundings of EPS64/2
    assert abs(verdict["cells"]["dpmpp_2m"]["difference"] + 0.4) <= 12 * EPS64 / 2 * 6.1


def test_sigma_is_the_larger_of_the_two_models_spreads():
    base, tuned = {"ddim_gd": [10.0, 10.0, 10.0]}, {"ddim_gd": [9.0, 9.5, 10.0]}  # stds 0 and 0.5; moves 0.5
    assert judge(base, tuned)["cells"]["ddim_gd"]["sigma"] == 0.5
    assert judge(base, tuned)["converged"]


def _verdict(out, step, converged):
    path = study.verdict_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "converged": converged}))
    return json.loads(path.read_text())


def test_segments_after_the_first_passing_check_are_skipped_and_it_becomes_the_base(tmp_path):
    cfg = study.FULL
    assert study.check_points(cfg) == [16000, 24000, 32000, 40000, 48000]
    found = [_verdict(tmp_path, 16000, False), _verdict(tmp_path, 24000, True)]
    assert converged_before(tmp_path, 24000, cfg) is None      # the check of S does not skip S itself
    assert converged_before(tmp_path, 28000, cfg) == 24000
    assert chosen_base(found, cfg) == {"step": 24000, "converged": True}


def test_no_passing_check_takes_the_last_snapshot_only_once_every_check_is_judged(tmp_path):
    cfg = study.FULL
    found = [_verdict(tmp_path, s, False) for s in study.check_points(cfg)[:-1]]
    assert chosen_base(found, cfg)["step"] is None
    found.append(_verdict(tmp_path, 48000, False))
    assert chosen_base(found, cfg) == {"step": 48000, "converged": False, "all_checks_done": True}


def test_jobs_chain_the_segments_and_check_after_both_models_exist(tmp_path):
    jobs = {job.name: job for job in build_jobs(tmp_path, quick=False)}
    assert jobs["segment-8000"].deps == ("segment-4000",) and jobs["segment-4000"].deps == ()
    assert set(jobs["check-16000"].deps) == {"ft-check-16000", "curve-16000"}
    assert jobs["segment-4000"].command()[-4:] == ["_segment", "--out", str(tmp_path), "--step", "4000"][-4:]
    train = train_base(tmp_path, 8000, study.FULL)
    assert train[train.index("--max-steps") + 1] == "8000" and "--resume" in train  # one run, grown per segment
    assert jobs["report"].refresh and set(jobs["report"].deps) == set(jobs) - {"report"}
