"""The report of studies/repro_demo.py: results.json / results.csv, table.md (teacher, LCM, LCM-AT x steps: classifier
FID, Inception FID, prompt adherence, CLIP score, mean +- std over sampling seeds), fid_vs_steps.png and per-class sample
grids. ``python -m studies.repro_demo _report --out DIR`` makes it from whatever cells exist (N is stated)."""
from __future__ import annotations

import json
from pathlib import Path

from studies import demo_study as study
from studies.study_report_common import (begin_report, cell_text, errorbar_line, labelled_panels, run_summary,
                                          save_figure, tile, training_table, versions_lines, write_results_json)

LABELS = {"teacher": "teacher (DDIM, CFG)", "lcm": "LCM", "lcm-at": "LCM-AT"}
CSV_COLUMNS = ("metric", "model", "steps", "seed", "num", "value", "seconds")
VALUE_KEY = {"adherence": "accuracy", "clip": "clip_score"}   # FID cells: "fid"


def collect_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "cells").rglob("*.json")):
        cell = json.loads(path.read_text())
        metric = cell.get("features") or cell.get("metric", "adherence")
        for row in cell["rows"]:
            value = row[VALUE_KEY.get(metric, "fid")]
            rows.append({"metric": metric, "model": cell["model"], "steps": row.get("nfe", row.get("steps")),
                         "seed": cell["seed"], "num": row["num"], "value": value, "seconds": row["seconds"],
                         "backend": row.get("backend")})
    return rows


def table_markdown(agg: dict, metric: str, title: str, digits: int = 2) -> list[str]:
    keys = [k for k in agg if k[0] == metric]
    if not keys:
        return [f"### {title}", "", "(not measured yet)", ""]
    steps = sorted({k[2] for k in keys})
    lines = [f"### {title}", "", "| model | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for model in ("teacher", *study.STUDENTS):
        cells = [cell_text(agg.get((metric, model, s)), digits) for s in steps]
        if any(c != "–" for c in cells):
            lines.append(f"| {LABELS[model]} | " + " | ".join(cells) + " |")
    nums = sorted({(agg[k]["num"], agg[k]["n_seeds"]) for k in keys})
    return lines + ["", "N (samples per cell and seed, seeds): " + ", ".join(f"{n} x {s}" for n, s in nums), ""]


def plot(agg: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(m, t) for m, t in ((study.CLF, "classifier FID"), ("inception", "Inception FID"),
                                  ("adherence", "prompt adherence"), ("clip", "CLIP score (own CLIP)"))
              if any(k[0] == m for k in agg)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        for model in study.STUDENTS:
            errorbar_line(ax, [(k[2], v) for k, v in agg.items() if k[0] == metric and k[1] == model], LABELS[model])
        teacher = [v for k, v in agg.items() if k[0] == metric and k[1] == "teacher"]
        if teacher:
            ax.axhline(teacher[0]["mean"], color="gray", linestyle="--", label="teacher, 25 steps")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(title)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def first_seeds(arrays, per_row: int, keep: int):
    """Images laid out ``per_row`` seeds per class prompt -> the first ``keep`` seeds of each prompt, same order."""
    return arrays.reshape(-1, per_row, *arrays.shape[1:])[:, :keep].reshape(-1, *arrays.shape[1:])


def sample_grids(out: Path, cfg: dict, report: Path) -> list[str]:
    """One row per class prompt (seeds 0-7 in each row), for each model at each of its step counts, and one
    side-by-side sheet (compare-classes.png): LCM vs LCM-AT at their fewest and middle step counts, and the teacher,
    seeds 0-3 per class."""
    import numpy as np

    from atdiff.eval.fashion_prompts import class_prompts
    from atdiff.runtime.pipeline import Pipeline
    written, arrays = [], {}
    for model in study.MODELS:
        with Pipeline.load(str(study.model_dir(out, model)), backend="torch", device="cpu") as pipe:
            for steps in (cfg["teacher_steps"] if model == "teacher" else cfg["steps"]):
                arrays[model, steps] = np.concatenate([pipe([p], num_images=8, steps=steps, seed=0).arrays
                                                       for p in class_prompts()])
                name = f"grid-{model}-steps{steps}.png"
                tile(arrays[model, steps], 8).save(report / name)
                written.append(name)
    shown = [(m, n) for n in (cfg["steps"][0], cfg["steps"][len(cfg["steps"]) // 2]) for m in study.STUDENTS]
    shown += [("teacher", n) for n in cfg["teacher_steps"]]
    labelled_panels([(f"{LABELS[m]}, {n} step{'s' * (n > 1)}", tile(first_seeds(arrays[m, n], 8, 4), 4))
                     for m, n in shown]).save(report / "compare-classes.png")
    return written + ["compare-classes.png"]


def write_report(out: Path, cfg: dict) -> Path:
    rows = collect_rows(out)
    report, agg = begin_report(out, rows, ("metric", "model", "steps"), "value", CSV_COLUMNS)
    training = [run_summary(out / "runs" / name, name) for name in ("vae", "teacher", *study.STUDENTS)]
    lines = table_markdown(agg, study.CLF, "Classifier FID (lower is better)")
    lines += table_markdown(agg, "inception", "Inception FID (lower is better)")
    lines += table_markdown(agg, "adherence", "Prompt adherence (classifier accuracy on class prompts)", 3)
    lines += table_markdown(agg, "clip", "CLIP score (the study's own CLIP, runs/clip; higher is better)")
    lines += ["### Training", ""] + training_table(training, with_ema=False)
    lines += ["", "### Versions", ""] + versions_lines(rows, training)
    (report / "table.md").write_text("\n".join(lines) + "\n")
    plot(agg, report / "fid_vs_steps.png")
    grids = sample_grids(out, cfg, report)
    write_results_json(out, report, rows, agg, ("metric", "model", "steps"), cfg, training=training, grids=grids)
    return report
