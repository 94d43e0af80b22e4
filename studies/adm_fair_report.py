"""The report of studies/repro_adm_fair.py: phase A's curve of the base's FID against training steps (curve.json,
curve.csv, curve.png) and the convergence verdicts, phase B's arms and decision rule (arms.json, from
studies/adm_fair_verdict.py), and both as markdown tables (tables.md, studies/adm_fair_tables.py), from whatever
has been measured so far."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from studies import adm_fair_study as study


def curve_rows(out: Path, cfg: dict) -> list[dict]:
    """One row per measured snapshot and curve sampler (sampling seed ``curve.seed``)."""
    c, rows = cfg["curve"], []
    for step in study.segments(cfg):
        for sampler in study.CURVE_SAMPLERS:
            path = study.cell_path(out, f"base-{step}", sampler, c["seed"], c["nfe"])
            if path.exists():
                fid = json.loads(path.read_text())["rows"][0]["fid"]
                rows.append({"step": step, "sampler": sampler, "nfe": c["nfe"], "num": c["num"], "seed": c["seed"],
                             "fid": fid})
    return rows


def verdicts(out: Path, cfg: dict) -> list[dict]:
    paths = (study.verdict_path(out, step) for step in study.check_points(cfg))
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def chosen_base(found: list[dict], cfg: dict) -> dict:
    """The arms' base: the first passing check point once every earlier one is judged; else the last snapshot."""
    for verdict in sorted(found, key=lambda v: v["step"]):
        if verdict.get("converged"):
            return {"step": verdict["step"], "converged": True}
    judged = {v["step"] for v in found}
    done = all(step in judged for step in study.check_points(cfg))
    return {"step": study.segments(cfg)[-1] if done else None, "converged": False, "all_checks_done": done}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for sampler in study.CURVE_SAMPLERS:
        points = [(r["step"], r["fid"]) for r in rows if r["sampler"] == sampler]
        if points:
            ax.plot(*zip(*points), marker="o", label=sampler)
    ax.set_xlabel("base training steps (batch 64)")
    ax.set_ylabel("classifier FID (NFE 10)")
    if rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, cfg: dict) -> dict:
    from atdiff.runtime.staging import write_json
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    rows, found = curve_rows(out, cfg), verdicts(out, cfg)
    with open(report / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "sampler", "nfe", "num", "seed", "fid"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, report / "curve.png")
    from studies.adm_fair_verdict import phase_b
    result = {"curve": rows, "checks": found, "base": chosen_base(found, cfg)}
    write_json(report / "curve.json", result)
    arms = phase_b(out, cfg)
    write_json(report / "arms.json", arms)
    from studies.adm_fair_tables import tables_markdown
    (report / "tables.md").write_text(tables_markdown(result, arms))
    return result
