"""Pieces both study reports use (studies/adm_study_report.py, studies/demo_study_report.py): mean +- std
over seeds, the table cell text, the per-run training summary, CSV writing and image tiling."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n_seeds": len(values)}


def aggregate(rows: list[dict], keys: tuple[str, ...], value: str) -> dict:
    """Rows grouped by ``keys`` (a tuple of their values) -> {mean, std, n_seeds, num} of ``value`` over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return {key: {**mean_std([r[value] for r in group]), "num": group[0]["num"]} for key, group in groups.items()}


def cell_text(stat: dict | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def run_summary(run: Path, name: str) -> dict:
    """Batches, optimizer steps, wall time (sum of the metric-log intervals, so pauses between resumed sessions do
    not count) and options from training.json of the run directory ``run``."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (
        run / "metrics.jsonl").is_file() else []
    times = [x["time"] for x in lines]
    wall = sum(b - a for a, b in zip(times, times[1:]) if 0 < b - a < 600)
    record = run / "model" / "training.json"
    data = json.loads(record.read_text()) if record.is_file() else {}
    options = data.get("options", {})
    return {"model": name, "command": data.get("command"), "batches": lines[-1]["step"] if lines else 0,
            "optimizer_steps": lines[-1].get("optimizer_steps", lines[-1]["step"]) if lines else 0,
            "wall_seconds": round(wall), "batch_size": options.get("batch_size"), "lr": options.get("lr"),
            "ema_decay": options.get("ema_decay"), "versions": data.get("versions")}


def training_table(training: list[dict], with_ema: bool) -> list[str]:
    """The report's training table: one row per run_summary record (EMA decay only where the runs set one)."""
    head = ["run", "command", "batches", "optimizer steps", "batch", "lr"] + (["EMA"] if with_ema else []) + ["wall time"]
    keys = ["model", "command", "batches", "optimizer_steps", "batch_size", "lr"] + (["ema_decay"] if with_ema else [])
    rows = [[str(t[k]) for k in keys] + [f"{t['wall_seconds'] / 60:.1f} min"] for t in training]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def versions_lines(rows: list[dict], training: list[dict]) -> list[str]:
    """What the numbers came from: the packages this report runs with, the backends the cells were sampled on
    (each cell records its own) and the packages each training run recorded, runs with equal versions on one line."""
    from atdiff.runtime.provenance import versions

    def text(found: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in found.items())
    by_versions: dict[str, list[str]] = {}
    for t in training:
        if t.get("versions"):
            by_versions.setdefault(text(t["versions"]), []).append(t["model"])
    backends = sorted({r["backend"] for r in rows if r.get("backend")})
    return ([f"- this report: {text(versions('eval'))}", f"- cells sampled on: {'; '.join(backends) or '–'}"]
            + [f"- {', '.join(names)} trained with: {found}" for found, names in by_versions.items()])


def write_csv(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def tile(arrays, width: int, scale: int = 2):
    """uint8 images [N, H, W(, C)] -> one PIL image, ``width`` per row, enlarged ``scale`` x (nearest)."""
    import numpy as np
    from PIL import Image
    rows = [np.concatenate(list(arrays[i:i + width]), axis=1) for i in range(0, len(arrays), width)]
    rows[-1] = np.pad(rows[-1], [(0, 0), (0, rows[0].shape[1] - rows[-1].shape[1])] + [(0, 0)] * (rows[0].ndim - 2))
    grid = np.concatenate(rows, axis=0).squeeze()
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def labelled_panels(panels: list[tuple[str, object]], gap: int = 8, header: int = 16):
    """PIL images side by side on white, each under its label (PIL's default font), ``gap`` px apart."""
    from PIL import Image, ImageDraw
    width = sum(image.width for _, image in panels) + gap * (len(panels) - 1)
    height = header + max(image.height for _, image in panels)
    sheet = Image.new("RGB", (width, height), "white")
    draw, x = ImageDraw.Draw(sheet), 0
    for label, image in panels:
        sheet.paste(image.convert("RGB"), (x, header))
        draw.text((x + 2, 2), label, fill="black")
        x += image.width + gap
    return sheet


def stacked(sheets: list, gap: int = 8):
    """PIL images one under another on white, ``gap`` px apart."""
    from PIL import Image
    sheet = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets) + gap * (len(sheets) - 1)),
                      "white")
    y = 0
    for s in sheets:
        sheet.paste(s, (0, y))
        y += s.height + gap
    return sheet


def errorbar_line(ax, points: list[tuple], label: str, color: str | None = None) -> None:
    """One model's line: ``points`` are (x, {mean, std}) pairs; error bars are the seed std. Pass ``color`` to keep
    a model's colour the same in every panel (matplotlib's cycle shifts when a panel lacks a model)."""
    points = sorted(points, key=lambda p: p[0])
    if points:
        ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["std"] or 0 for p in points],
                    marker="o", capsize=3, label=label, color=color)


def begin_report(out: Path, rows: list[dict], keys: tuple[str, ...], value: str, columns: tuple[str, ...]):
    """Make OUT/report, write results.csv from ``rows``; returns the report dir and the aggregate over seeds."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    write_csv(rows, columns, report / "results.csv")
    return report, aggregate(rows, keys, value)


def write_results_json(out: Path, report: Path, rows: list[dict], agg: dict, keys: tuple[str, ...], cfg: dict,
                       **extra) -> None:
    """report/results.json: the raw rows, the aggregate by ``keys``, the study's config, the package versions, the
    verdict of the deployment check (compare/record.json) when it ran, and ``extra`` sections."""
    from atdiff.runtime.provenance import versions
    from atdiff.runtime.staging import write_json
    compare = out / "compare" / "record.json"
    write_json(report / "results.json", {
        "rows": rows, "aggregate": [dict(zip(keys, k), **v) for k, v in agg.items()], **extra,
        "versions": versions("eval"),
        "compare_verdict": json.loads(compare.read_text()).get("verdict") if compare.is_file() else None,
        "config": cfg})


def save_figure(fig, path: Path, bottom: float = 0.0) -> None:
    """Lay out and write ``fig``; ``bottom``: the fraction of its height kept free (for a figure legend)."""
    import matplotlib.pyplot as plt
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
