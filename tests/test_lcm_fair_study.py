"""The LCM part of the fair re-test (studies/lcm_fair_*, studies/repro_lcm_fair.py, docs/results.md part III): the
pre-registered convergence criterion of both phases, which segments it skips, the sweep and its pick, the arms'
budgets, the decision rule, the tables, and (slow) the whole study end to end with its --quick budgets (its jobs in
this process, tests/study_jobs.py, but the report, which the study's own runner runs as a child)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import requires_fid_inception
from study_jobs import run_quick_study
from studies import demo_study as demo
from studies import repro_lcm_fair
from studies import lcm_fair_study as study
from studies.lcm_fair_report import decision, write_report
from studies.lcm_fair_stages import chosen, converged_by, pick, run_check, segment_command
from studies.repro_lcm_fair import build_jobs, sweep_command

ROOT = Path(__file__).resolve().parent.parent


def _fid_cells(out, model, fids_by_steps, seeds, features=study.CLF):
    """Cell files as part II's FID stage writes them: one per model and seed, a row per step count."""
    for i, seed in enumerate(seeds):
        path = demo.fid_path(out, features, model, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": model, "seed": seed, "rows": [{"nfe": n, "fid": f[i]}
                                                                             for n, f in fids_by_steps.items()]}))
    demo.model_dir(out, model).mkdir(parents=True, exist_ok=True)


def _record(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_a_snapshot_is_converged_only_when_the_next_moves_every_cell_less_than_two_stds(tmp_path):
    cfg = study.SESSION
    seeds = cfg["distill"]["cells"]["seeds"]
    _fid_cells(tmp_path, "lcm-1200", {1: [30.0, 30.2, 29.8], 2: [8.0, 8.1, 7.9], 4: [6.0, 6.1, 5.9]}, seeds)
    _fid_cells(tmp_path, "lcm-2400", {1: [29.8, 30.0, 29.6], 2: [8.0, 8.1, 7.9], 4: [5.9, 6.0, 5.8]}, seeds)
    _fid_cells(tmp_path, "lcm-3600", {1: [29.0, 29.2, 28.8], 2: [8.0, 8.1, 7.9], 4: [5.9, 6.0, 5.8]}, seeds)
    run_check(tmp_path, cfg, "distill", 1200)   # moves 0.2 < 0.4, 0 and 0.1 < 0.2: converged
    run_check(tmp_path, cfg, "distill", 2400)   # 1 step moves 0.8 >= 2 x 0.2: not
    first, second = (json.loads(study.check_path(tmp_path, "distill", s).read_text()) for s in (1200, 2400))
    assert first["converged"] and first["next"] == 2400 and set(first["cells"]) == {"1 steps", "2 steps", "4 steps"}
    assert not second["converged"] and not second["cells"]["1 steps"]["within"] and second["cells"]["4 steps"]["within"]
    run_check(tmp_path, cfg, "distill", 3600)   # no 4800 snapshot: the segment was skipped
    assert json.loads(study.check_path(tmp_path, "distill", 3600).read_text())["skipped"]


def test_the_first_passing_check_is_chosen_once_every_earlier_one_is_judged_else_the_last_snapshot():
    points, last = [1200, 2400, 3600], 4800
    assert chosen([{"step": 2400, "converged": True}], points, last)["step"] is None   # 1200 not judged yet
    assert chosen([{"step": 1200, "converged": False}, {"step": 2400, "converged": True}], points, last) == {
        "step": 2400, "converged": True}
    failed = [{"step": s, "converged": False} for s in points]
    assert chosen(failed, points, last) == {"step": 4800, "converged": False, "all_checks_done": True}


def test_a_segment_is_skipped_only_when_a_check_it_cannot_change_passed(tmp_path):
    cfg = study.SESSION
    assert study.segments(cfg, "teacher") == [3500, 7000, 10500] and study.check_points(cfg, "teacher") == [3500, 7000]
    _record(study.check_path(tmp_path, "teacher", 3500), {"step": 3500, "converged": True})
    assert converged_by(tmp_path, cfg, "teacher", 7000) is None        # 7000 is what judges 3500
    assert converged_by(tmp_path, cfg, "teacher", 10500) == 3500
    jobs = {job.name: job for job in build_jobs(tmp_path, "session")}
    assert jobs["segment-teacher-10500"].deps == ("segment-teacher-7000", "check-teacher-3500")
    assert jobs["segment-distill-1200"].deps == ("choose-teacher",)
    assert set(jobs["check-distill-2400"].deps) == {"cells-distill-2400", "cells-distill-3600"}


def test_segments_resume_one_run_to_a_growing_step_count_with_part_twos_recipes(tmp_path):
    cfg = study.SESSION
    _record(study.chosen_path(tmp_path, "teacher"), {"step": 7000, "converged": True})
    option = lambda command, name: command[command.index(name) + 1]  # noqa: E731
    teacher = segment_command(tmp_path, cfg, "teacher", 7000)
    assert teacher[3:5] == ["train", "teacher"] and "--resume" in teacher and option(teacher, "--max-steps") == "7000"
    assert [option(teacher, o) for o in ("--batch-size", "--lr", "--ema-decay")] == ["64", "0.0003", "0.999"]
    lcm = segment_command(tmp_path, cfg, "distill", 2400)
    assert lcm[3:5] == ["train", "lcm"] and option(lcm, "--out") == str(demo.run_dir(tmp_path, "lcm"))
    assert option(lcm, "--teacher") == str(demo.model_dir(tmp_path, "teacher-7000"))
    assert [option(lcm, o) for o in ("--max-steps", "--batch-size", "--lr", "--w-min", "--w-max", "--ema-decay",
                                     "--seed")] == ["2400", "32", "0.0001", "1.0", "3.0", "0.95", "1"]


def test_the_sweep_is_eta_times_k_with_an_eta_zero_control_per_k_at_n_optimizer_steps(tmp_path):
    cfg = study.SESSION
    points = study.sweep_points(cfg)
    assert len(points) == 8 and len({study.point_name(p) for p in points}) == 8
    assert sorted(p["adv_steps"] for p in points if p["eta"] == 0) == [2, 3]
    _record(study.chosen_path(tmp_path, "teacher"), {"step": 3500})
    _record(study.chosen_path(tmp_path, "distill"), {"step": 2400})
    option = lambda command, name: command[command.index(name) + 1]  # noqa: E731
    command = sweep_command(tmp_path, cfg, {"eta": 0.015, "adv_steps": 3})
    assert command[3:5] == ["train", "lcm-at"] and option(command, "--max-steps") == "800"   # 2400 / K
    assert option(command, "--adv-lr") == option(command, "--adv-max-norm") == "0.015"
    assert option(command, "--seed") == "1"


def test_the_pick_is_the_lowest_mean_heldout_fid_among_eta_above_zero(tmp_path):
    cfg = study.SESSION
    _record(study.chosen_path(tmp_path, "distill"), {"step": 2400})
    for i, point in enumerate(study.sweep_points(cfg)):
        _record(study.heldout_path(tmp_path, study.point_name(point)), {"mean": 0.5 if point["eta"] == 0 else 10 - i})
    _record(study.heldout_path(tmp_path, "lcm"), {"mean": 0.1})
    pick(tmp_path, cfg)
    record = json.loads(study.pick_path(tmp_path).read_text())
    assert record["best"] == {"eta": 0.05, "adv_steps": 3} and record["budget"] == 2400   # the last eta > 0 point
    assert record["heldout_mean"]["sweep-k3-eta0.0"] == 0.5 and record["heldout_mean"]["lcm"] == 0.1


def test_arms_pair_equal_optimizer_steps_equal_batches_and_eta_zero_controls():
    specs = study.arm_specs(study.SESSION, {"best": {"eta": 0.015, "adv_steps": 3}}, 2400)
    assert set(specs) == set(study.ARMS)
    steps = {name: s["batches"] * s["adv_steps"] for name, s in specs.items()}
    assert {steps[n] for n in ("lcm-s1", "lcm-s2", "lcmat-s1", "lcmat-s2", "ctl-s1", "ctl-s2")} == {2400}
    assert specs["lcmat-s1"]["batches"] == 800 and specs["lcm-s1"]["batches"] == 2400
    assert specs["lcmat-data-s1"]["batches"] == specs["ctl-data-s1"]["batches"] == 2400 and steps["ctl-data-s1"] == 7200
    assert [specs[n]["eta"] for n in ("ctl-s1", "ctl-s2", "ctl-data-s1")] == [0.0] * 3
    assert specs["lcmat-s2"]["seed"] == specs["ctl-s2"]["seed"] == specs["lcm-s2"]["seed"] == 2
    # the seed-1 arms whose command already ran are copies of that run; the seed-2 arms are trained
    assert (specs["lcm-s1"]["source"], specs["lcmat-s1"]["source"], specs["ctl-s1"]["source"]) == (
        "lcm-2400", "sweep-k3-eta0.015", "sweep-k3-eta0.0")
    assert specs["lcmat-s2"]["source"] is None and specs["lcmat-data-s1"]["source"] is None


def _rule_cells(out, cfg, fids):
    for model, values in fids.items():
        _fid_cells(out, model, {n: values for n in cfg["steps"]}, cfg["seeds"])


def test_the_rule_needs_every_training_seed_to_beat_its_control_by_the_larger_spread(tmp_path):
    cfg = study.SESSION                       # cells: 1/2/4/8 steps, 3 sampling seeds, 3 of 4 needed
    fids = {"ctl-s1": [10.0, 10.2, 10.1], "ctl-s2": [10.1, 10.3, 10.2], "lcmat-s1": [9.0, 9.2, 9.1],
            "lcmat-s2": [9.1, 9.3, 9.2]}       # 1.0 better, sampling std 0.1, training spread 0.1
    _rule_cells(tmp_path, cfg, fids)
    verdict = decision(tmp_path, cfg)
    assert verdict["complete"] and verdict["at_beats_control"]
    assert [s["cells_beaten"] for s in verdict["training_seeds"]] == [4, 4]
    _rule_cells(tmp_path, cfg, dict(fids, **{"lcmat-s2": [9.7, 9.9, 9.8]}))   # training spread 0.7: margin 1.4
    verdict = decision(tmp_path, cfg)
    assert not verdict["at_beats_control"] and verdict["training_seeds"][0]["cells"][0]["spread_used"] == "training"
    demo.fid_path(tmp_path, study.CLF, "ctl-s2", cfg["seeds"][0]).unlink()
    assert not decision(tmp_path, cfg)["complete"]


def test_the_report_renders_every_table_from_what_was_measured(tmp_path):
    cfg = study.QUICK
    seeds = cfg["teacher"]["cells"]["seeds"]
    _fid_cells(tmp_path, "teacher-4", {3: [40.0, 41.0]}, seeds)
    _fid_cells(tmp_path, "teacher-8", {3: [30.0, 31.0]}, seeds)
    run_check(tmp_path, cfg, "teacher", 4)
    text = (write_report(tmp_path, cfg), (tmp_path / "report" / "tables.md").read_text())[1]
    assert "| 4 | 40.50 ± 0.71 |" in text and "| 4 | 3 steps | 40.50 ± 0.71 | 30.50 ± 0.71 | -10.00 | 1.41 | no |" in text
    assert "The teacher: not converged by the criterion; the last snapshot, 8, is used." in text
    assert "The plain LCM: not decided yet." in text and "Decision rule" not in text
    _record(study.chosen_path(tmp_path, "distill"), {"step": 12})
    _record(study.pick_path(tmp_path), {"best": {"eta": 0.05, "adv_steps": 2}, "budget": 12, "heldout_mean": {}})
    _rule_cells(tmp_path, cfg, {"ctl-s1": [10.0, 10.2], "ctl-s2": [10.1, 10.3], "lcmat-s1": [9.0, 9.2],
                                "lcmat-s2": [9.1, 9.3], "lcm-s1": [8.0, 8.2]})
    text = (write_report(tmp_path, cfg), (tmp_path / "report" / "tables.md").read_text())[1]
    assert "| lcmat-s1 vs ctl-s1 | 1 steps | 9.10 | 10.10 | -1.00 | 0.28 | sampling | yes |" in text
    assert "| lcmat-s1 − lcm-s1 | 2 | +1.00, +1.00 | +1.00 ± 0.00 |" in text
    assert "LCM-AT beats the η = 0 control" in text


@pytest.mark.slow
@requires_fid_inception   # the arms' Inception FID cell
def test_quick_study_runs_every_stage_reports_and_resumes(tmp_path, bundled_datasets_dir, monkeypatch, capsys):
    out = tmp_path / "study"
    args = ["--out", str(out), "--quick", "--jobs", "2", "--threads", "1"]
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(bundled_datasets_dir))   # looked up at each call (idx_datasets)
    run_quick_study(repro_lcm_fair.main, "studies.repro_lcm_fair", args, ROOT, monkeypatch)   # tests/study_jobs.py
    result = json.loads((out / "report" / "lcm_fair.json").read_text())
    assert result["teacher"]["chosen"]["step"] in study.segments(study.QUICK, "teacher")
    n = result["pick"]["budget"]
    assert n in study.segments(study.QUICK, "distill") and len(result["sweep"]) == len(study.sweep_points(study.QUICK)) + 1
    assert set(result["budgets"]) == set(study.ARMS)
    assert all(b["optimizer_steps"] == b["batches"] * b["adv_steps"] for b in result["budgets"].values())
    metrics = {(c["model"], c["metric"], c["steps"]) for c in result["cells"]}
    for arm in study.ARMS:
        assert {(arm, study.CLF, s) for s in study.QUICK["steps"]} | {(arm, "inception", 2), (arm, "adherence", 1),
                                                                       (arm, "clip", 2)} <= metrics
    assert result["decision"]["complete"] and "### Decision rule" in (out / "report" / "tables.md").read_text()
    capsys.readouterr()
    assert repro_lcm_fair.main(["--out", str(out), "--quick", "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing and all(line.startswith("done") for line in listing.splitlines())
