"""The fair AT re-test's phase A logic (studies/adm_fair_*): the pre-registered convergence criterion, which
segments are skipped after it passes, and which snapshot becomes the arms' base."""
from __future__ import annotations

import json
import statistics

from studies import adm_fair_study as study
from studies.adm_fair_report import chosen_base
from studies.adm_fair_arms import arm_names, arm_specs
from studies.adm_fair_stages import converged_before, grid_cells, judge, pick, train_base
from studies.repro_adm_fair import build_jobs
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
    jobs = {job.name: job for job in build_jobs(tmp_path, "full")}
    assert jobs["segment-8000"].deps == ("segment-4000",) and jobs["segment-4000"].deps == ()
    assert set(jobs["check-16000"].deps) == {"ft-check-16000", "curve-16000"}
    assert jobs["segment-4000"].command()[-4:] == ["_segment", "--out", str(tmp_path), "--step", "4000"][-4:]
    train = train_base(tmp_path, 8000, study.FULL)
    assert train[train.index("--max-steps") + 1] == "8000" and "--resume" in train  # one run, grown per segment
    assert jobs["report"].refresh and set(jobs["report"].deps) == set(jobs) - {"report"}


def _heldout(out, name, fid):
    path = study.heldout_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fid": fid}))


def test_the_sweep_pick_is_the_lowest_heldout_fid_overall_and_per_variant(tmp_path):
    cfg = study.FULL
    points = study.sweep_points(cfg)
    assert len(points) == 12 and len({study.point_name(p) for p in points}) == 12
    for i, point in enumerate(points):   # full: 20..25, detach: 26..31, except one detach point lowest of all
        _heldout(tmp_path, study.point_name(point), 20.0 + i)
    lowest = next(p for p in points if p["variant"] == "detach" and p["alpha"] == 0.1 and p["bound"] == 0.002)
    _heldout(tmp_path, study.point_name(lowest), 10.0)
    pick(tmp_path, cfg, final=False)
    record = json.loads(study.pick_path(tmp_path).read_text())
    assert record["best"] == lowest and record["best_by_variant"]["detach"] == lowest
    assert record["best_by_variant"]["full"] == points[0]
    _heldout(tmp_path, "sweep-lsm", 9.5)   # the loss-second-moment t sampler at the pick wins
    pick(tmp_path, cfg, final=True)
    final = json.loads(study.pick_path(tmp_path, final=True).read_text())
    assert final["best"] == dict(lowest, timestep_sampler="loss-second-moment") == final["best_by_variant"]["detach"]


def test_arms_pair_equal_steps_equal_data_and_the_alpha_zero_controls():
    cfg = study.FULL
    best = {"variant": "detach", "alpha": 0.05, "bound": 0.1, "timestep_sampler": "uniform"}
    full = dict(best, variant="full", alpha=0.1)
    specs = arm_specs(cfg, {"best": best, "best_by_variant": {"full": full, "detach": best}})
    assert set(specs) == set(arm_names(cfg))
    assert specs["ft-s1"][:3] == ("adm", 3000, 1) and specs["ft-s2"][:3] == ("adm", 3000, 2)
    assert specs["at-detach-s1"][1] == 1000 and specs["at-data-s1"][1] == 3000   # x K = 3: 3000 / 9000 steps
    option = lambda spec, name: spec[3][spec[3].index(name) + 1]  # noqa: E731
    assert option(specs["at-full-s1"], "--adv-lr") == 0.1 and option(specs["at-full-s1"], "--adv-target-grad") == "full"
    for control, budget in (("ctl-s1", 1000), ("ctl-s2", 1000), ("ctl-data-s1", 3000)):
        assert specs[control][1] == budget and option(specs[control], "--adv-lr") == 0.0
        assert option(specs[control], "--adv-steps") == 3
    assert specs["ctl-s2"][2] == specs["at-pick-s2"][2] == 2 and option(specs["at-pick-s2"], "--adv-lr") == 0.05


def test_decision_cells_come_first_and_the_rest_completes_the_table():
    cfg = study.FULL
    decision, rest = grid_cells(cfg, "decision"), grid_cells(cfg, "rest")
    assert decision == [("ddim_gd", 5), ("ddim_gd", 10), ("dpmpp_2m", 5), ("dpmpp_2m", 10)]
    assert sorted(decision + rest) == sorted((s, n) for s in cfg["grid"]["samplers"] for n in cfg["grid"]["nfes"])
    es = [i for i, (s, _) in enumerate(rest) if s == "es_ddim_gd"]
    assert es and min(es) > max(i for i, (s, _) in enumerate(rest) if s == "ddim_gd")   # ES may reuse its DDIM


def test_the_session_scale_trains_the_small_preset_and_passes_its_name_to_every_stage(tmp_path):
    jobs = {job.name: job for job in build_jobs(tmp_path, "session")}
    cfg = study.config_for("session")
    assert study.check_points(cfg) == [3000, 4500, 6000]
    assert jobs["segment-1500"].command()[-2:] == ["--scale", "session"]
    assert jobs["grid-decision-ctl-s1-seed0"].deps == ("train-ctl-s1", f"ref-{study.CLF}-test")
    assert "es-ctl-s1" in jobs["grid-rest-ctl-s1-seed0"].deps
    assert "--quick" not in jobs["es-ctl-s1"].command() and "--scale" not in jobs["es-ctl-s1"].command()
    train = train_base(tmp_path, 1500, cfg)
    assert train[train.index("--preset") + 1] == "fmnist-small"


def test_the_medium_scale_outlasts_the_ema_horizon_and_continues_the_session_base(tmp_path):
    """What the medium scale was registered to repair (docs/results.md part III): every check and arm runs at least
    three EMA horizons of optimizer steps, and its base is the session scale's recipe trained on further."""
    medium, session = study.config_for("medium"), study.config_for("session")
    horizon = 1 / (1 - medium["finetune"]["ema"])
    k = medium["arms"]["adv_steps"]
    point = {"variant": "detach", "alpha": 0.1, "bound": 0.1, "timestep_sampler": "uniform"}
    by_variant = {"detach": point, "full": dict(point, variant="full")}
    specs = arm_specs(medium, {"best": point, "best_by_variant": by_variant})
    steps = {name: batches * (k if kind == "adm-at" else 1) for name, (kind, batches, _, _) in specs.items()}
    assert min(steps.values()) >= 3 * horizon and medium["check"]["steps"] >= 3 * horizon
    assert steps["ft-s1"] == medium["arms"]["batches"] == steps["at-detach-s1"] == steps["ctl-s1"]
    assert steps["at-data-s1"] == k * medium["arms"]["batches"]
    assert medium["base"] == session["base"] and study.segments(medium)[:2] == [3000, 6000]
    assert set(study.segments(session)) & set(study.segments(medium)) == {3000, 6000}   # the copyable snapshots
    jobs = {job.name: job for job in build_jobs(tmp_path, "medium")}
    assert jobs["segment-9000"].command()[-2:] == ["--scale", "medium"]
    assert study.check_points(medium) == [12000, 18000, 24000]


def _cells(out, model, fids_by_cell):
    for (sampler, nfe), fids in fids_by_cell.items():
        for seed, fid in zip(study.QUICK["grid"]["seeds"], fids):
            path = study.cell_path(out, model, sampler, seed, nfe)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rows": [{"fid": fid}]}))


def test_the_decision_rule_needs_every_training_seed_to_beat_its_control_by_the_larger_spread(tmp_path):
    from studies.adm_fair_verdict import decision
    cfg = study.QUICK                      # decision cells: ddim_gd and dpmpp_2m at NFE 2 and 4, two sampling seeds
    cells = [(s, n) for s in cfg["decision"]["samplers"] for n in cfg["decision"]["nfes"]]
    control = {c: [10.0, 10.2] for c in cells}                       # sampling std 0.141
    _cells(tmp_path, "ctl-s1", control)
    _cells(tmp_path, "ctl-s2", {c: [10.1, 10.3] for c in cells})     # training spread 0.1
    at = {c: [9.0, 9.2] for c in cells}                              # 1.0 better: > 2 x 0.141
    at[cells[0]] = [10.0, 10.2]                                      # one cell no better: 3 of 4 still beat
    _cells(tmp_path, "at-full-s1", at)
    _cells(tmp_path, "at-pick-s2", {c: [9.1, 9.3] for c in cells})
    verdict = decision(tmp_path, cfg, "full")
    assert verdict["complete"] and verdict["at_beats_control"]
    # in the first cell AT's two seeds differ by 0.9: that training spread (margin 1.8) also stops seed 2's 1.0 gain
    assert [s["cells_beaten"] for s in verdict["training_seeds"]] == [3, 3]
    first = verdict["training_seeds"][0]["cells"][1]
    assert first["spread_used"] == "sampling" and abs(first["margin"] - 2 * statistics.stdev([10.0, 10.2])) < 1e-12
    # a second AT seed far from the first: the training spread (1.4) now sets the margin and nothing is beaten
    _cells(tmp_path, "at-pick-s2", {c: [10.5, 10.7] for c in cells})
    verdict = decision(tmp_path, cfg, "full")
    assert not verdict["at_beats_control"] and verdict["training_seeds"][0]["cells"][1]["spread_used"] == "training"
    # an unmeasured cell: the rule is incomplete and does not pass
    (study.cell_path(tmp_path, "ctl-s2", cells[0][0], cfg["grid"]["seeds"][0], cells[0][1])).unlink()
    assert not decision(tmp_path, cfg, "full")["complete"]


def test_the_tables_show_the_decision_cells_and_verdict_as_measured(tmp_path):
    from studies.adm_fair_tables import decision_table, tables_markdown
    from studies.adm_fair_verdict import decision
    cfg = study.QUICK
    cells = [(s, n) for s in cfg["decision"]["samplers"] for n in cfg["decision"]["nfes"]]
    for name, fids in (("ctl-s1", [10.0, 10.2]), ("ctl-s2", [10.1, 10.3]), ("at-full-s1", [9.0, 9.2]),
                       ("at-pick-s2", [9.1, 9.3])):
        _cells(tmp_path, name, {c: fids for c in cells})
    table = decision_table(decision(tmp_path, cfg, "full"))
    assert "| at-full-s1 vs ctl-s1 | DDIM 2 | 9.10 | 10.10 | -1.00 | 0.28 | sampling | yes |" in table
    assert table[-1] == "Decision rule: AT beats the α = 0 control (cells beaten: at-full-s1: 4 of 4, at-pick-s2: 4 of 4)."
    (study.cell_path(tmp_path, "ctl-s2", cells[0][0], cfg["grid"]["seeds"][0], cells[0][1])).unlink()
    table = decision_table(decision(tmp_path, cfg, "full"))
    assert table[-1].startswith("Decision rule: incomplete") and "| not measured |" in "\n".join(table)
    curve = {"curve": [{"step": 8, "sampler": "ddim_gd", "nfe": 4, "num": 64, "seed": 0, "fid": 30.125}],
             "checks": [], "base": {"step": None, "converged": False}}
    text = tables_markdown(curve, {"pick": None})
    assert "| 8 | 30.12 |" in text and "Base: not decided yet." in text and "Decision rule" not in text


def test_the_decision_rules_models_are_trained_and_measured_before_the_other_arms(tmp_path):
    order = [job.name for job in build_jobs(tmp_path, "session")]
    rule = ["ctl-s1", "ctl-s2", "at-pick-s2", "at-full-s1", "at-detach-s1"]
    last_rule_cell = max(order.index(f"grid-decision-{n}-seed{s}") for n in rule for s in study.SESSION["grid"]["seeds"])
    assert last_rule_cell < min(order.index(f"train-{n}") for n in ("ft-s1", "ft-s2", "ip-s1", "at-data-s1"))
    assert last_rule_cell < order.index("grid-decision-base-chosen-seed0") < order.index("exposure-ctl-s1")
    assert order.index("grid-decision-ft-s1-seed0") < order.index("grid-rest-ctl-s1-seed0")
