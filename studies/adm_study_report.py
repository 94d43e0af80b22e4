"""The ADM study's report: the finished cells of studies/repro_adm.py as tables, a plot and sample grids.

Writes ``OUT/report/``: results.json and results.csv (one row per model x sampler x NFE x features x seed),
table.md (the seed paper's layout: rows = training methods, columns = sampler x NFE, mean +- std over the
sampling seeds, or the bootstrap std where a column has one seed; each AT row against the others, cell by cell,
beyond seed spread or not; the ES searches; the training budgets and wall times; the versions), fid_vs_nfe.png,
grid-<model>-nfe<N>.png and compare.png (every model side by side).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from studies import adm_study as study
from studies.adm_study import CLF
from studies.study_report_common import (begin_report, cell_text, errorbar_line, labelled_panels, run_summary,
                                          save_figure, stacked, tile, training_table, versions_lines,
                                          write_results_json)

SAMPLER_LABELS = {"ddim_gd": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "iddpm": "IDDPM", "es_ddim_gd": "ES (DDIM)",
                  "ddim": "diffusers DDIM", "es_ddim": "ES (diffusers DDIM)"}
CSV_COLUMNS = ("features", "model", "sampler", "eps_scale", "nfe", "seed", "num", "fid", "seconds")


def sampled_as(sampler: str, eps_scale: float | None) -> str:
    """The cell whose samples a cell scored: an ES cell without scaling (lambda = 1.0) reuses its DDIM cell's."""
    base = study.ES_OF.get(sampler)
    return base if base and eps_scale in (None, 1.0) else sampler


def collect_rows(out: Path) -> list[dict]:
    """One row per cell and NFE. A cell that reuses another's samples (sampled_as) counts 0 seconds: summing the
    column gives the compute actually spent."""
    rows = []
    for path in sorted((out / "cells").rglob("*.json")):
        cell = json.loads(path.read_text())
        reused = sampled_as(cell["sampler"], cell["eps_scale"]) != cell["sampler"]
        for row in cell["rows"]:
            rows.append({"features": cell["features"], "model": cell["model"], "sampler": cell["sampler"],
                         "eps_scale": cell["eps_scale"], "nfe": row["nfe"], "seed": cell["seed"], "num": row["num"],
                         "fid": row["fid"], "seconds": 0.0 if reused else row["seconds"],
                         "backend": row.get("backend")})
    return rows


def with_bootstrap_noise(out: Path, agg: dict, rows: list[dict], features: str = "inception", rounds: int = 20) -> dict:
    """Cells of ``features`` measured at one sampling seed (the Inception column) get as their std the bootstrap std
    of FID over ``rounds`` resamplings of their samples (cell_bootstrap_std), marked ``std_kind: bootstrap``; a cell
    whose feature cache is gone keeps none."""
    ref = study.ref_path(out, "test", features)
    agg = dict(agg)
    for r in rows:
        key = (features, r["model"], r["sampler"], r["nfe"])
        cache = study.cache_path(out, features, r["model"], sampled_as(r["sampler"], r["eps_scale"]), r["seed"],
                                 r["nfe"]) / f"nfe-{r['nfe']}"
        if r["features"] == features and agg[key]["n_seeds"] == 1 and ref.is_file() and (cache / "key.json").is_file():
            agg[key] = {**agg[key], "std": cell_bootstrap_std(out, cache, ref, rounds), "std_kind": "bootstrap"}
    return agg


def cell_bootstrap_std(out: Path, cache: Path, ref: Path, rounds: int) -> float:
    """atdiff.eval.fid.ReferenceFID.bootstrap_std over a cell's feature cache (as studies/fid_bootstrap.py). ~30 s a
    cell on one thread for 5k x 2048-d features, so it is kept in OUT/cache/bootstrap.json, keyed by the cache's key
    file and chunk count: a rebuilt cache is recomputed."""
    from atdiff.eval.fid import ReferenceFID, load_stats
    from atdiff.runtime.staging import write_json
    from studies.fid_bootstrap import cached_features
    memo_path = out / "cache" / "bootstrap.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    key = (f"{cache.relative_to(out)} rounds={rounds} chunks={len(list(cache.glob('chunk-*.npz')))} "
           f"key_mtime={(cache / 'key.json').stat().st_mtime_ns}")
    if key not in memo:
        memo[key] = ReferenceFID(load_stats(ref)).bootstrap_std(cached_features(cache), rounds=rounds)
        write_json(memo_path, memo)
    return memo[key]


def table_markdown(agg: dict, features: str, samplers=study.TABLE_SAMPLERS) -> list[str]:
    keys = [k for k in agg if k[0] == features and k[2] in samplers]
    if not keys:
        return ["(not measured yet)"]
    nfes = sorted({k[3] for k in keys})
    columns = [(s, n) for s in samplers for n in nfes if any(k[2] == s and k[3] == n for k in keys)]
    lines = ["| method | " + " | ".join(f"{SAMPLER_LABELS[s]} {n}" for s, n in columns) + " |",
             "|---|" + "---|" * len(columns)]
    best = {col: min((k for k in keys if (k[2], k[3]) == col), key=lambda k: agg[k]["mean"]) for col in columns}
    for model in study.MODELS:
        cells = [bold_if(best[(s, n)] == (features, model, s, n), cell_text(agg.get((features, model, s, n))))
                 for s, n in columns]
        if any(c != "–" for c in cells):
            lines.append(f"| {study.LABELS[model]} | " + " | ".join(cells) + " |")
    return lines + ["", table_note([agg[k] for k in keys])]


def bold_if(condition: bool, text: str) -> str:
    return f"**{text}**" if condition else text


def table_note(stats: list[dict]) -> str:
    """N and the seed count under a table; a table whose cells have different seed counts (a study still running)
    says so, since a cell without ± then has one seed."""
    seeds = sorted({s["n_seeds"] for s in stats})
    bootstrap = any(s.get("std_kind") == "bootstrap" for s in stats)
    spread = ("± is the bootstrap std of FID over resamplings of the N samples: the seed noise at this N"
              if bootstrap else "mean ± std over seeds")
    if len(seeds) > 1 and seeds[0] == 1:
        spread += "; a cell without ± has one seed"
    counts = "–".join(map(str, (seeds[0], seeds[-1]) if len(seeds) > 1 else seeds))
    nums = "/".join(map(str, sorted({s["num"] for s in stats})))
    return f"N = {nums} samples per cell and seed; {counts} sampling seed(s) per cell ({spread}); lowest mean in each " \
           "column in bold."


def versus_table(agg: dict, features: str, models=("at", "at-detach")) -> list[str]:
    """Each AT variant against every other row, per sampler: in how many NFE cells its FID is lower by more than
    the seed spread, within it, higher by more. Spread as in eval/verdict.py: 2 sqrt(std_a^2 + std_b^2), the std
    being over a cell's sampling seeds; cells with one seed have no spread and are left out."""
    nfes = sorted({key[3] for key in agg})

    def counts(model, other, sampler):
        tally = [0, 0, 0]   # better, within, worse
        for nfe in nfes:
            mine, theirs = agg.get((features, model, sampler, nfe)), agg.get((features, other, sampler, nfe))
            if mine is None or theirs is None or None in (mine["std"], theirs["std"]):
                continue
            delta, spread = mine["mean"] - theirs["mean"], 2.0 * math.hypot(mine["std"], theirs["std"])
            tally[0 if delta < -spread else 2 if delta > spread else 1] += 1
        return tally
    rows = []
    for i, model in enumerate(models):
        for other in (m for m in study.MODELS if m not in models[:i + 1]):   # each AT pair once
            tallies = [counts(model, other, s) for s in study.TABLE_SAMPLERS]
            if any(sum(t) for t in tallies):
                rows.append(f"| {study.LABELS[model]} | {study.LABELS[other]} | "
                            + " | ".join("/".join(map(str, t)) if sum(t) else "–" for t in tallies) + " |")
    if not rows:
        return ["(needs two or more sampling seeds per cell)"]
    return ["NFE cells where the AT row's FID is lower / within seed spread / higher than the other row's "
            "(spread: 2 sqrt(std_a² + std_b²) over sampling seeds; one training run per method, so training noise "
            "is not in it).", "", "| AT row | vs | " + " | ".join(SAMPLER_LABELS[s] for s in study.TABLE_SAMPLERS)
            + " |", "|---|---|" + "---|" * len(study.TABLE_SAMPLERS)] + rows


def es_table(picks: dict, sampler_label: str) -> list[str]:
    """Classifier FID by ES factor, one row per model (its lowest in bold), from the es/*.json records."""
    if not picks:
        return []
    first = next(iter(picks.values()))
    lambdas = list(first["fid_by_lambda"])
    lines = ["", f"## ES factor, {sampler_label} (NFE {first['nfe']}, {first['num']} samples on held-out seeds "
             f"{first['seed']}+, classifier FID vs the train split)", "",
             "| method | " + " | ".join(f"λ = {lam}" for lam in lambdas) + " | chosen |",
             "|---" * (len(lambdas) + 2) + "|"]
    for model, pick in picks.items():
        fids = pick["fid_by_lambda"]
        cells = [f"**{fids[lam]:.2f}**" if float(lam) == pick["chosen"] else f"{fids[lam]:.2f}" for lam in lambdas]
        lines.append(f"| {study.LABELS[model]} | " + " | ".join(cells) + f" | {pick['chosen']} |")
    return lines


def training_summary(out: Path) -> list[dict]:
    return [run_summary(out / "runs" / model, model) for model in study.MODELS]


def plot(agg: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samplers = study.TABLE_SAMPLERS
    fig, axes = plt.subplots(1, len(samplers), figsize=(4 * len(samplers), 3.4), sharey=True)
    for ax, sampler in zip(axes, samplers):
        for i, model in enumerate(study.MODELS):
            errorbar_line(ax, [(k[3], v) for k, v in agg.items() if k[0] == CLF and k[1] == model and k[2] == sampler],
                          study.LABELS[model], color=f"C{i}")
        nfes = sorted({k[3] for k in agg if k[0] == CLF})
        ax.set_title(SAMPLER_LABELS[sampler])
        ax.set_xscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
    axes[0].set_ylabel("classifier FID (lower is better)")
    # one legend for the figure, from every panel: a panel may lack a model whose cells are not measured yet
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:   # none before the first cell is measured
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    save_figure(fig, path, bottom=0.1)


def sample_grids(out: Path, cfg: dict, report: Path) -> list[str]:
    """count samples (the table's DDIM, seeds 0..count-1) per model at each grid NFE, tiled 8 wide, and compare.png: the first
    16 seeds of every model side by side, one row of panels per NFE (same seeds, so the same starting noise)."""
    from atdiff.runtime.pipeline import Pipeline
    written, arrays = [], {}
    for model in study.MODELS:
        with Pipeline.load(str(study.model_dir(out, model)), backend="torch", device="cpu") as pipe:
            for nfe in cfg["grid"]["nfes"]:
                sampler, options = study.SAMPLER_RUNS["ddim_gd"]
                arrays[model, nfe] = pipe(num_images=cfg["grid"]["count"], steps=nfe, sampler=sampler,
                                          sampler_options=options, seed=0).arrays
                name = f"grid-{model}-nfe{nfe}.png"
                tile(arrays[model, nfe], 8).save(report / name)
                written.append(name)
    stacked([labelled_panels([(f"{study.LABELS[m]}, DDIM {n}", tile(arrays[m, n][:16], 4)) for m in study.MODELS])
             for n in cfg["grid"]["nfes"]]).save(report / "compare.png")
    return written + ["compare.png"]


def write_report(out: Path, cfg: dict) -> Path:
    rows = collect_rows(out)
    report, agg = begin_report(out, rows, ("features", "model", "sampler", "nfe"), "fid", CSV_COLUMNS)
    agg = with_bootstrap_noise(out, agg, rows)
    es = {sampler: {m: json.loads(p.read_text()) for m in study.MODELS
                    if (p := study.es_path(out, m, sampler)).is_file()} for sampler in study.ES_SAMPLERS}
    training = training_summary(out)
    lines = ["## Classifier FID", ""] + table_markdown(agg, CLF) + ["", "## Inception FID", ""]
    lines += table_markdown(agg, "inception")
    lines += ["", "## ADM-AT against the other rows (classifier FID)", ""] + versus_table(agg, CLF)
    lines += ["", "## Diffusers' default DDIM (x0 clipped, ε not re-derived from it)", ""]
    for features, title in ((CLF, "Classifier FID"), ("inception", "Inception FID")):
        lines += [f"{title}:", ""] + table_markdown(agg, features, study.X0_CLIP_SAMPLERS) + [""]
    for sampler, picks in es.items():
        lines += es_table(picks, SAMPLER_LABELS[sampler])
    lines += ["", "## Training", ""] + training_table(training, with_ema=True)
    lines += ["", "## Versions", ""] + versions_lines(rows, training)
    (report / "table.md").write_text("\n".join(lines) + "\n")
    plot(agg, report / "fid_vs_nfe.png")
    grids = sample_grids(out, cfg, report)
    write_results_json(out, report, rows, agg, ("features", "model", "sampler", "nfe"), cfg, es=es, training=training,
                       grids=grids)
    return report
