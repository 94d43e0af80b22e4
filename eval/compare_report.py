"""The compare report directory: ``report.md`` (table + verdict), ``results.csv``, ``plot.png`` (metric vs
steps, one line per model/backend), ``grid.png`` (the same seeds side by side), ``record.json`` (config,
versions, what ran). Written into a temp dir and renamed over ``out``, so a failed run leaves the previous
report intact."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from atdiff.eval.verdict import METRICS, build_verdict, verdict_lines
from atdiff.runtime.staging import staged_directory

COLUMNS = ["model", "backend", "steps", "fid", "fid_std", "clip", "clip_std", "num", "seconds", "runs_on",
           "model_sha256"]
TABLE_COLUMNS = COLUMNS[:-1]   # report.md leaves out the 64-digit hash (results.csv has it)


# record.json marks a directory as a compare report: an --out is replaced only when its record.json has this
# format and the directory holds nothing else than the files it lists (runtime/staging.py)
RECORD = "record.json"
FORMAT = "at-diffusion-toolkit/compare-report"
FORMAT_VERSION = 1


def write_report(out: str | os.PathLike, rows: list[dict], grids: dict, *, baseline: str, record: dict) -> Path:
    out = Path(out)
    verdict = build_verdict(rows, baseline)
    with staged_directory(out, RECORD, "eval compare report", FORMAT) as staging:
        (staging / "results.csv").write_text(results_csv(rows))
        metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
        plot_metrics(rows, metrics, staging / "plot.png")
        image_grid(grids, staging / "grid.png")
        (staging / "report.md").write_text(report_markdown(rows, verdict, record, pixel_differences(grids, verdict)))
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        (staging / RECORD).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **record,
                                                  "verdict": verdict, "files": files}, indent=2, default=str))
    return out


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return buffer.getvalue()


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k), 4 if k.endswith("std") else 3) for k in TABLE_COLUMNS) + " |")
    return lines


def pixel_differences(grids: dict, verdict: dict) -> list[str]:
    """Largest uint8 difference between each backend's grid images and the reference backend's (same seeds)."""
    ref = verdict["reference_backend"]
    lines = []
    for (model, backend, steps), images in grids.items():
        other = grids.get((model, ref, steps))
        if backend != ref and other is not None and other.shape == images.shape:
            diff = int(np.abs(images.astype(np.int16) - other.astype(np.int16)).max())
            lines.append(f"- {model}, {steps} steps: {backend} vs {ref}, max |pixel difference| = {diff} / 255 "
                         f"over the {len(images)} grid seeds")
    return lines


def report_markdown(rows: list[dict], verdict: dict, record: dict, pixel_lines: list[str] = ()) -> str:
    config = record.get("config", {})
    lines = ["# Deployment comparison", "",
             f"{config.get('num')} samples per cell, seeds {config.get('seed')}.."
             f"{config.get('seed', 0) + config.get('num', 0) - 1}"
             f" (identical on every backend), baseline model: `{verdict['baseline']}`, reference backend: "
             f"`{verdict['reference_backend']}`.", "",
             "FID is against the reference statistics; `fid_std` is its bootstrap std over resampled seeds and "
             "`clip_std` the standard error of the mean CLIP score: the seed noise used as tolerance below.", "",
             *markdown_table(rows), "", "## Verdict", "", *verdict_lines(verdict), "", *pixel_lines,
             *([""] if pixel_lines else []),
             "![metric vs steps](plot.png)", "", "![same seeds on every model and backend](grid.png)", "",
             "Config, versions and what each backend ran on: `record.json`.", ""]
    return "\n".join(lines)


def plot_metrics(rows: list[dict], metrics: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5.5 * max(1, len(metrics)), 4), squeeze=False)
    series = list(dict.fromkeys((r["model"], r["backend"]) for r in rows))
    for ax, metric in zip(axes[0], metrics):
        for model, backend in series:
            pts = sorted((r["steps"], r[metric], r[f"{metric}_std"] or 0.0) for r in rows
                         if r["model"] == model and r["backend"] == backend and r.get(metric) is not None)
            if pts:
                x, y, err = zip(*pts)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{model} / {backend}")
        ax.set_xlabel("steps (network evaluations)")
        ax.set_ylabel(METRICS[metric][0] + (" (lower is better)" if METRICS[metric][1] < 0 else " (higher is better)"))
        ax.set_xticks(sorted({r["steps"] for r in rows}))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_grid(grids: dict, path: Path) -> None:
    """One row per model/backend; for each step count a block of the same seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = list(dict.fromkeys((m, b) for m, b, _ in grids))
    steps = sorted({s for _, _, s in grids})
    strips = [np.concatenate([_block(grids[(m, b, s)]) for s in steps], axis=1) for m, b in series]
    width = max(strip.shape[1] for strip in strips)
    fig, axes = plt.subplots(len(series), 1, figsize=(min(2 + width / 80, 30), 1.3 * len(series) + 0.6), squeeze=False)
    for ax, strip, (model, backend) in zip(axes[:, 0], strips, series):
        block_width = strip.shape[1] / len(steps)
        ax.imshow(strip)
        ax.set_yticks([])
        ax.set_ylabel(f"{model}\n{backend}", rotation=0, ha="right", va="center", fontsize=8)
        labels = [f"{s} step{'s' if s > 1 else ''}" for s in steps]
        ax.set_xticks([block_width * (i + 0.5) for i in range(len(steps))], labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _block(images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Images side by side with a white gap after the block (separates step counts)."""
    h = images.shape[1]
    return np.concatenate([*images, np.full((h, gap, 3), 255, np.uint8)], axis=1)
