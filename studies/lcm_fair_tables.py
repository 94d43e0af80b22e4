"""report/tables.md of studies/repro_lcm_fair.py: lcm_fair.json (studies/lcm_fair_report.py) as the markdown tables
docs/results.md part III's LCM part shows, so the page's numbers are the report's, not retyped. Row and cell
formatting is part III's (studies/adm_fair_tables.py)."""
from __future__ import annotations

from studies.adm_fair_tables import _header, _mean_std, _row

PHASE_TITLES = {"teacher": ("teacher", "teacher steps"), "distill": ("plain LCM", "LCM optimizer steps")}
METRICS = {"fmnist-classifier": ("classifier FID ↓", 2), "inception": ("Inception FID ↓", 2),
           "adherence": ("adherence ↑", 3), "clip": ("CLIP score ↑", 2)}


def curve_table(phase: str, result: dict) -> list[str]:
    rows, (_, what) = result["curve"], PHASE_TITLES[phase]
    if not rows:
        return ["(no snapshot measured yet)"]
    steps = sorted({r["steps"] for r in rows})
    found = {(r["step"], r["steps"]): r for r in rows}
    lines = _header(what, *(f"{s} steps" for s in steps))
    for step in sorted({r["step"] for r in rows}):
        lines.append(_row(step, *(_mean_std(found[step, s]["fids"]) if (step, s) in found else "–" for s in steps)))
    seeds = max(len(r["fids"]) for r in rows)
    return lines + ["", f"Classifier FID, mean ± std over {seeds} sampling seeds of {rows[0]['num']} samples, test "
                        "split."]


def checks_table(phase: str, result: dict) -> list[str]:
    lines = _header("check at", "cell", "snapshot (mean ± std)", "next snapshot (mean ± std)", "difference", "2σ",
                    "within")
    for check in sorted(result["checks"], key=lambda c: c["step"]):
        if check.get("skipped"):
            lines.append(_row(check["step"], "–", "skipped (no next snapshot)", "", "", "", ""))
            continue
        for cell, c in check["cells"].items():
            lines.append(_row(check["step"], cell, _mean_std(c["base"]), _mean_std(c["finetuned"]),
                              f"{c['difference']:+.2f}", f"{2 * c['sigma']:.2f}", "yes" if c["within"] else "no"))
    ch, (name, what) = result["chosen"], PHASE_TITLES[phase]
    verdict = (f"converged at {ch['step']} {what}" if ch.get("converged") else
               f"not converged by the criterion; the last snapshot, {ch['step']}, is used" if ch.get("step") else
               "not decided yet")
    return lines + ["", f"The {name}: {verdict}."]


def sweep_table(rows: list[dict], pick: dict | None) -> list[str]:
    if not rows:
        return ["(not measured yet)"]
    steps = sorted({s for r in rows for s in r["fid"]})
    lines = _header("run", "η", "K", "batches", "optimizer steps", *(f"{s} steps" for s in steps), "mean")
    for r in sorted(rows, key=lambda r: r["mean"]):
        eta = "– (plain LCM)" if r["eta"] is None else r["eta"]
        lines.append(_row(r["run"], eta, r["adv_steps"], r["batches"], r["optimizer_steps"],
                          *(f"{r['fid'][s]:.2f}" if s in r["fid"] else "–" for s in steps),
                          f"{r['mean']:.2f}"))
    lines += ["", f"Held-out classifier FID against the train split, {rows[0]['num']} samples from sampling seed "
                  f"{rows[0]['seed']} on."]
    if pick:
        best = pick["best"]
        lines.append(f"Pick (lowest mean among η > 0): η = {best['eta']}, K = {best['adv_steps']}; its control: "
                     f"η = 0 at K = {best['adv_steps']}.")
    return lines


def budget_table(budgets: dict) -> list[str]:
    lines = _header("arm", "command", "training seed", "η", "K", "batches", "optimizer steps", "wall time (s)",
                    "same run as")
    return lines + [_row(name, b["kind"], b["seed"], "–" if b["eta"] is None else b["eta"], b["adv_steps"],
                         b["batches"], b["optimizer_steps"], "–" if b["wall_s"] is None else f"{b['wall_s']:.0f}",
                         b["source"] or "–") for name, b in budgets.items()]


def _cell_text(row: dict, digits: int) -> str:
    if "fids" in row and len(row["fids"]) > 1:
        return f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}"
    return f"{row['mean']:.{digits}f}" + (f" ± {row['sem']:.{digits}f}" if row.get("sem") else "")


def cells_table(cells: list[dict]) -> list[str]:
    if not cells:
        return ["(no cell measured yet)"]
    columns = sorted({(c["metric"], c["steps"]) for c in cells}, key=lambda k: (list(METRICS).index(k[0]), k[1]))
    found = {(c["model"], c["metric"], c["steps"]): c for c in cells}
    lines = _header("arm", *(f"{METRICS[m][0]} {s}" for m, s in columns))
    for model in dict.fromkeys(c["model"] for c in cells):
        lines.append(_row(model, *(_cell_text(found[model, *k], METRICS[k[0]][1]) if (model, *k) in found else "–"
                                   for k in columns)))
    return lines + ["", "Classifier FID: mean ± std over the sampling seeds (the sampling spread); Inception FID, "
                        "adherence and CLIP score (the study's own CLIP, ± standard error over images): seed 0."]


def decision_table(decision: dict) -> list[str]:
    lines = _header("training seed", "cell", "LCM-AT", "η = 0 control", "LCM-AT − control", "margin (2 × spread)",
                    "spread used", "beaten")
    for seed in decision["training_seeds"]:
        pair = f"{seed['at']} vs {seed['control']}"
        for c in seed["cells"]:
            if not c["measured"]:
                lines.append(_row(pair, f"{c['steps']} steps", "not measured", "", "", "", "", "no"))
                continue
            lines.append(_row(pair, f"{c['steps']} steps", f"{c['at']:.2f}", f"{c['control']:.2f}",
                              f"{c['difference']:+.2f}", f"{c['margin']:.2f}", c["spread_used"],
                              "yes" if c["beaten"] else "no"))
    verdict = ("LCM-AT beats the η = 0 control" if decision["at_beats_control"] else
               "LCM-AT does not beat the η = 0 control" if decision["complete"] else
               "incomplete: not every cell measured")
    beaten = ", ".join(f"{s['at']}: {s['cells_beaten']} of {len(s['cells'])}" for s in decision["training_seeds"])
    return lines + ["", f"Decision rule ({decision['cells_needed']} cells needed in every training seed): {verdict} "
                        f"(cells beaten: {beaten})."]


def paired_table(rows: list[dict], what: str) -> list[str]:
    if not rows:
        return ["(not measured yet)"]
    lines = _header("pair", "steps", "per sampling seed", "mean ± std")
    lines += [_row(f"{r['a']} − {r['b']}", r["steps"], ", ".join(f"{d:+.2f}" for d in r["differences"]),
                   f"{r['mean']:+.2f} ± {r['std']:.2f}") for r in rows]
    return lines + ["", f"Classifier FID differences, {what}, paired by sampling seed (descriptive, not the rule)."]


def tables_markdown(result: dict) -> str:
    sections = []
    for phase in ("teacher", "distill"):
        name = PHASE_TITLES[phase][0]
        sections += [(f"The {name}: FID against training steps", curve_table(phase, result[phase])),
                     (f"The {name}: convergence checks", checks_table(phase, result[phase]))]
    sections.append(("LCM-AT sweep (held-out)", sweep_table(result["sweep"], result.get("pick"))))
    if result.get("pick"):
        sections += [("Budgets", budget_table(result["budgets"])), ("Cells", cells_table(result["cells"])),
                     ("Decision rule", decision_table(result["decision"])),
                     ("LCM-AT against its control, paired", paired_table(result["vs_control"], "LCM-AT − control")),
                     ("LCM-AT against plain LCM (fresh batches), paired",
                      paired_table(result["vs_lcm"], "LCM-AT − LCM at equal optimizer steps"))]
    return "\n".join(line for title, body in sections for line in (f"### {title}", "", *body, "")) + "\n"
