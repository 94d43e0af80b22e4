"""report/tables.md of studies/repro_adm_fair.py: curve.json and arms.json (studies/adm_fair_report.py) as the
markdown tables docs/results.md part III shows, so the page's numbers are the report's, not retyped."""
from __future__ import annotations

SAMPLER_LABELS = {"ddim_gd": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "iddpm": "IDDPM", "es_ddim_gd": "ES (DDIM)"}


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*names) -> list[str]:
    return [_row(*names), "|" + "---|" * len(names)]


def _mean_std(values: list[float]) -> str:
    import statistics
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def curve_table(curve: dict) -> list[str]:
    rows = curve["curve"]
    if not rows:
        return ["(no snapshot measured yet)"]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], {})[r["sampler"]] = r["fid"]
    samplers = sorted({r["sampler"] for r in rows})
    lines = _header("base steps", *(f"{SAMPLER_LABELS[s]} {rows[0]['nfe']}" for s in samplers))
    lines += [_row(step, *(f"{v[s]:.2f}" if s in v else "–" for s in samplers)) for step, v in sorted(by_step.items())]
    return lines + ["", f"Classifier FID, {rows[0]['num']} samples, sampling seed {rows[0]['seed']}, test split."]


def checks_table(curve: dict) -> list[str]:
    lines = _header("check at", "cell", "snapshot (mean ± std)", "plain fine-tune (mean ± std)", "difference",
                    "2σ", "within")
    for check in sorted(curve["checks"], key=lambda c: c["step"]):
        if check.get("skipped"):
            lines.append(_row(check["step"], "–", "skipped", "", "", "", ""))
            continue
        for sampler, c in check["cells"].items():
            lines.append(_row(check["step"], f"{SAMPLER_LABELS[sampler]} {check['nfe']}", _mean_std(c["base"]),
                              _mean_std(c["finetuned"]), f"{c['difference']:+.2f}", f"{2 * c['sigma']:.2f}",
                              "yes" if c["within"] else "no"))
    base = curve["base"]
    verdict = (f"converged at {base['step']} steps" if base.get("converged") else
               f"not converged by the criterion; the arms start from {base['step']}" if base.get("step") else
               "not decided yet")
    return lines + ["", f"Base: {verdict}."]


def sweep_table(pick: dict) -> list[str]:
    best = pick["best"]
    lines = _header("sweep run", "held-out FID (train split)")
    for name, fid in sorted(pick["heldout_fid"].items(), key=lambda kv: kv[1]):
        lines.append(_row(name, f"{fid:.2f}"))
    return lines + ["", f"Pick: {best['variant']}, α = {best['alpha']}, bound {best['bound']}, t sampler "
                        f"{best['timestep_sampler']}; per variant: " +
                    ", ".join(f"{v}: α = {p['alpha']}, bound {p['bound']}" for v, p in pick["best_by_variant"].items())]


def budget_table(budgets: dict) -> list[str]:
    lines = _header("run", "batches", "optimizer steps", "wall time (s)")
    return lines + [_row(name, b["batches"], b["optimizer_steps"], f"{b['wall_s']:.0f}")
                    for name, b in budgets.items() if not name.startswith("sweep")]


def cell_table(cells: list[dict]) -> list[str]:
    if not cells:
        return ["(no cell measured yet)"]
    columns = sorted({(c["sampler"], c["nfe"]) for c in cells}, key=lambda k: (list(SAMPLER_LABELS).index(k[0]), k[1]))
    found = {(c["model"], c["sampler"], c["nfe"]): c for c in cells}
    models = list(dict.fromkeys(c["model"] for c in cells))
    lines = _header("model", *(f"{SAMPLER_LABELS[s]} {n}" for s, n in columns))
    for model in models:
        lines.append(_row(model, *(f"{found[(model, *k)]['mean']:.2f} ± {found[(model, *k)]['std']:.2f}"
                                   if (model, *k) in found else "–" for k in columns)))
    seeds = max(len(c["fids"]) for c in cells)
    return lines + ["", f"Classifier FID, mean ± std over {seeds} sampling seeds of {cells[0]['num']} samples "
                        "(the std is the sampling spread)."]


def decision_table(decision: dict) -> list[str]:
    lines = _header("training seed", "cell", "AT", "α = 0 control", "AT − control", "margin (2 × spread)",
                    "spread used", "beaten")
    for seed in decision["training_seeds"]:
        for c in seed["cells"]:
            if not c["measured"]:
                lines.append(_row(f"{seed['at']} vs {seed['control']}", f"{SAMPLER_LABELS[c['sampler']]} {c['nfe']}",
                                  "not measured", "", "", "", "", "no"))
                continue
            lines.append(_row(f"{seed['at']} vs {seed['control']}", f"{SAMPLER_LABELS[c['sampler']]} {c['nfe']}",
                              f"{c['at']:.2f}", f"{c['control']:.2f}", f"{c['difference']:+.2f}", f"{c['margin']:.2f}",
                              c["spread_used"], "yes" if c["beaten"] else "no"))
    verdict = ("AT beats the α = 0 control" if decision["at_beats_control"] else
               "AT does not beat the α = 0 control" if decision["complete"] else "incomplete: not every cell measured")
    beaten = ", ".join(f"{s['at']}: {s['cells_beaten']} of {len(s['cells'])}" for s in decision["training_seeds"])
    return lines + ["", f"Decision rule: {verdict} (cells beaten: {beaten})."]


def exposure_table(exposure: dict) -> list[str]:
    if not exposure:
        return ["(not measured yet)"]
    lines = _header("model", "max abs (‖x_t‖²/d − q's)", "at t", "mean abs diff", "ε consistency on the sampler's x_t",
                    "ε error on q's x_t (training loss)")
    return lines + [_row(m, f"{e['summary']['max_abs_sq_norm_diff']:.4f}", e["summary"]["at_t"],
                         f"{e['mean_abs_sq_norm_diff']:.4f}", f"{e['mean_eps_consistency']:.4f}",
                         f"{e['mean_q_eps_error']:.4f}") for m, e in exposure.items()]


def tables_markdown(curve: dict, arms: dict) -> str:
    sections = [("Phase A: the base's FID against training steps", curve_table(curve)),
                ("Phase A: convergence checks", checks_table(curve))]
    if arms.get("pick"):
        sections += [("AT strength sweep (held-out)", sweep_table(arms["pick"])),
                     ("Budgets", budget_table(arms["budgets"])), ("Cells", cell_table(arms["cells"])),
                     ("Decision rule", decision_table(arms["decision"])),
                     ("Exposure bias", exposure_table(arms["exposure_bias"]))]
    return "\n".join(line for title, body in sections for line in (f"### {title}", "", *body, "")) + "\n"
