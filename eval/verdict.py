"""The compare report's verdict, from the result rows alone.

Tolerances come from seed noise, measured on the reference backend (torch when it ran): ``*_std`` is the
bootstrap std of FID over resampled seeds, or the standard error of the mean CLIP score. Two numbers
further apart than ``2 sigma`` would be told apart by a rerun with new seeds only about 5% of the time, so:
- a backend *agrees* with torch when |metric - torch's| <= 2 sigma_torch: the deployment changes the metric
  less than choosing other seeds would. (Seeds and prompts are identical across backends, so the true
  difference is usually far below this.)
- model M has an *advantage* over the baseline B at some step count when its metric is better by more than
  2 sqrt(sigma_M^2 + sigma_B^2) on the reference backend; a backend *keeps* it when M is still better than B
  there at every such step count. M is *worse* than B where it trails by more than the same margin; the summary
  says so, rather than only "not better".
"""
from __future__ import annotations

import math

METRICS = {"fid": ("FID", -1), "clip": ("CLIP", +1)}   # name -> (label, +1 if higher is better)


def build_verdict(rows: list[dict], baseline: str) -> dict:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    reference = "torch" if "torch" in backends else backends[0]
    cell = {(r["model"], r["backend"], r["steps"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    steps = sorted(set(r["steps"] for r in rows))
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    agreement = [_agreement(cell, m, model, backend, reference, steps)
                 for m in metrics for backend in backends if backend != reference for model in models]
    advantage = [_advantage(cell, m, model, baseline, backend, reference, steps)
                 for m in metrics for model in models if model != baseline for backend in backends]
    return {"reference_backend": reference, "baseline": baseline, "agreement": agreement,
            "advantage": advantage, "summary": _summary(agreement, advantage, reference)}


def _agreement(cell, metric, model, backend, reference, steps) -> dict:
    deltas, tolerances = [], []
    for s in steps:
        ref, other = cell[(model, reference, s)], cell[(model, backend, s)]
        deltas.append(other[metric] - ref[metric])
        tolerances.append(2.0 * (ref[f"{metric}_std"] or 0.0))
    within = [abs(d) <= t for d, t in zip(deltas, tolerances)]
    return {"metric": metric, "model": model, "backend": backend, "steps": steps, "deltas": deltas,
            "tolerances": tolerances, "within": all(within), "cells_within": sum(within)}


def _advantage(cell, metric, model, baseline, backend, reference, steps) -> dict:
    sign = METRICS[metric][1]
    adv, thresholds, ref_adv = [], [], []
    for s in steps:
        mine, base = cell[(model, backend, s)], cell[(baseline, backend, s)]
        ref_mine, ref_base = cell[(model, reference, s)], cell[(baseline, reference, s)]
        adv.append(sign * (mine[metric] - base[metric]))
        thresholds.append(2.0 * math.hypot(ref_mine[f"{metric}_std"] or 0.0, ref_base[f"{metric}_std"] or 0.0))
        ref_adv.append(sign * (ref_mine[metric] - ref_base[metric]))
    significant = [a > t for a, t in zip(ref_adv, thresholds)]
    checked = [a > 0 for a, sig in zip(adv, significant) if sig]
    return {"metric": metric, "model": model, "baseline": baseline, "backend": backend, "steps": steps,
            "advantage": adv, "thresholds": thresholds,
            "significant_on_reference": [s for s, sig in zip(steps, significant) if sig],
            # the other way round too, so that a verdict never reads "not better" where the model is clearly worse
            "worse_on_reference": [s for s, a, t in zip(steps, ref_adv, thresholds) if a < -t],
            "kept": all(checked) if checked else None}


def _comparison(a: dict, reference: str) -> str:
    """One model against the baseline on the reference backend: better, worse, both (at different steps) or
    neither beyond seed noise."""
    label = METRICS[a["metric"]][0]
    better, worse = (",".join(map(str, a[k])) for k in ("significant_on_reference", "worse_on_reference"))
    said = ([f"beats {a['baseline']} on {label} on {reference} at steps {better}"] if better else []) + (
        [f"is worse than {a['baseline']} on {label} on {reference} at steps {worse}"] if worse else [])
    return (f"{a['model']} " + " and ".join(said) if said
            else f"{a['model']} is within seed noise of {a['baseline']} on {label} on {reference} at this N")


def _summary(agreement: list[dict], advantage: list[dict], reference: str) -> str:
    parts = []
    if agreement:
        bad = [f"{a['backend']} ({a['model']}, {METRICS[a['metric']][0]})" for a in agreement if not a["within"]]
        parts.append(f"every backend within seed noise of {reference}" if not bad
                     else "outside seed noise of " + reference + ": " + ", ".join(bad))
    for a in advantage:
        if a["backend"] == reference:
            parts.append(_comparison(a, reference))
    kept = [a for a in advantage if a["backend"] != reference and a["kept"] is not None]
    if kept:
        lost = sorted({f"{a['model']} on {a['backend']} ({METRICS[a['metric']][0]})" for a in kept if not a["kept"]})
        parts.append("advantage lost: " + ", ".join(lost) if lost else "that advantage is kept on every backend")
    return "; ".join(parts) if parts else "one model on one backend: nothing to compare"


def verdict_lines(verdict: dict) -> list[str]:
    lines = [f"**Verdict:** {verdict['summary']}.", ""]
    ref = verdict["reference_backend"]
    for a in verdict["agreement"]:
        label = METRICS[a["metric"]][0]
        cells = ", ".join(f"{s}: {d:+.3g} (tol {t:.3g})" for s, d, t in zip(a["steps"], a["deltas"], a["tolerances"]))
        lines.append(f"- {a['model']}, {label} on {a['backend']} minus {ref}, by steps: {cells} -> "
                     f"{'within' if a['within'] else 'OUTSIDE'} 2 sigma seed noise "
                     f"({a['cells_within']}/{len(a['steps'])})")
    for a in verdict["advantage"]:
        label = METRICS[a["metric"]][0]
        cells = ", ".join(f"{s}: {v:+.3g}" for s, v in zip(a["steps"], a["advantage"]))
        sig = ",".join(map(str, a["significant_on_reference"])) or "none"
        kept = {True: "kept", False: "LOST", None: "nothing significant to keep"}[a["kept"]]
        if a["backend"] == ref:
            kept = "reference"
        lines.append(f"- {a['model']} vs {a['baseline']}, {label} advantage on {a['backend']} by steps: {cells}; "
                     f"significant on {ref} at steps: {sig}"
                     + (f"; worse on {ref} at steps: {','.join(map(str, a['worse_on_reference']))}"
                        if a["worse_on_reference"] else "") + f" -> {kept}")
    return lines
