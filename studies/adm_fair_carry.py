"""Carry phase A's product (the chosen base and the records that chose it) from one session's machine to the next.

On this workplace a machine's files do not outlive a session, and the medium scale needs more core-hours than one
session has: phase A (the base's curve and convergence checks) fits in one, phase B (sweep and arms) does not. So
once phase A has chosen its base, ``--publish-base DIR`` writes that base's EMA weights and every phase A record
(segments, curve and check cells, verdicts, the choice, the base's training log and job times) to DIR with their
sha256 in manifest.json; DIR is committed once, as the study's base weights. A later session's
``--from-base DIR`` checks the hashes and that the study's design is unchanged, copies them into a fresh --out,
and the study goes on with phase B: every phase A job finds its record and is not rerun.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from atdiff.runtime.provenance import sha256_file as sha256

from studies import adm_fair_study as study

# phase A's records, relative to the study directory (the snapshots, checkpoints and sample caches stay behind)
RECORDS = ("base.json", "segments/*.json", "checks/*.json", "cells/done/base-*.json", "cells/done/ft-check-*.json",
           f"cells/{study.CLF}/base-*/*.json", f"cells/{study.CLF}/ft-check-*/*.json",
           "runs/base/metrics.jsonl", "runs/base/toolkit-run.json", "runs/base/config.json")
MODEL = Path("runs") / study.BASE_ARM / "model"
PHASE_A_JOBS = ("ref-*", "segment-*", "curve-*", "ft-check-*", "check-*", "choose-base")


def phase_a_files(out: Path) -> list[Path]:
    """Phase A's files under ``out`` (relative paths): its records and the chosen base's model directory."""
    files = {p.relative_to(out) for pattern in RECORDS for p in out.glob(pattern)
             if p.is_file() and study.BASE_ARM not in p.parts}   # base-chosen's own cells are phase B's
    files |= {p.relative_to(out) for p in (out / MODEL).rglob("*") if p.is_file()}
    return sorted(files)


def publish_base(out: Path, to: Path, scale: str) -> Path:
    """Write phase A's product to ``to`` (refused if it exists: nothing is overwritten), whole or not at all."""
    if not (out / "base.json").exists() or not (out / MODEL).is_dir():
        raise SystemExit(f"{out}: phase A has not chosen its base yet (no base.json / {MODEL}); run the study "
                         "until its choose-base job is done, then publish")
    if to.exists():
        raise SystemExit(f"{to} exists; --publish-base writes a new directory (pick another path or remove it)")
    partial = to.with_name(f".{to.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)   # a killed earlier publish's own leftovers
    files = {}
    for rel in phase_a_files(out):
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / rel, partial / rel)
        files[str(rel)] = sha256(partial / rel)
    jobs = partial / "logs" / "jobs.jsonl"   # phase A's wall times, for the report's budgets
    jobs.parent.mkdir(parents=True, exist_ok=True)
    jobs.write_text("".join(line for line in _job_lines(out) if _is_phase_a(json.loads(line)["job"])))
    files["logs/jobs.jsonl"] = sha256(jobs)
    base = json.loads((out / "base.json").read_text())
    manifest = {"scale": scale, "config": study.config_for(scale), "base": base, "files": files}
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (partial / "README.md").write_text(card(out, scale, to))
    os.replace(partial, to)
    return to


def card(out: Path, scale: str, to: Path) -> str:
    """The published base's README: what it is, phase A's curve and checks as the report tables them."""
    from studies.adm_fair_report import chosen_base, curve_rows, verdicts
    from studies.adm_fair_tables import checks_table, curve_table
    cfg = study.config_for(scale)
    found = verdicts(out, cfg)
    curve = {"curve": curve_rows(out, cfg), "checks": found, "base": chosen_base(found, cfg)}
    return "\n".join([
        f"# Phase A's base of the fair re-test of adversarial training, {scale} scale", "",
        f"`{MODEL}` holds the EMA weights ({cfg['base']['preset']} preset) that this scale's phase B (the AT "
        "strength sweep and the arms) starts from, chosen by phase A's registered convergence criterion "
        "(docs/results.md part III); the other files are the phase A records that chose it, `manifest.json` their "
        "sha256 and the design (studies/adm_fair_study.py). Written by `--publish-base`; a later session continues "
        "with:", "",
        f"    python -m studies.repro_adm_fair --out DIR --scale {scale} --from-base {to} --jobs 2 --threads 1", "",
        "## The base's curve", "", *curve_table(curve), "", "## Convergence checks", "", *checks_table(curve), ""])


def _job_lines(out: Path) -> list[str]:
    log = out / "logs" / "jobs.jsonl"
    return log.read_text().splitlines(keepends=True) if log.exists() else []


def _is_phase_a(job: str) -> bool:
    return any(fnmatch.fnmatch(job, pattern) for pattern in PHASE_A_JOBS)


def load_manifest(src: Path, scale: str) -> dict:
    """The published base's manifest, checked: the same scale and design as this run, every file's hash intact."""
    path = src / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{src}: no manifest.json; --from-base takes a directory written by --publish-base")
    manifest = json.loads(path.read_text())
    design = json.loads(json.dumps(study.config_for(scale)))   # as the manifest holds it (tuples as lists)
    if manifest["scale"] != scale or manifest["config"] != design:
        raise SystemExit(f"{src} was published by the {manifest['scale']!r} scale with another design than this "
                         f"run's {scale!r} scale (studies/adm_fair_study.py): pass the matching --scale")
    for rel, digest in manifest["files"].items():
        if not (src / rel).is_file() or sha256(src / rel) != digest:
            raise SystemExit(f"{src / rel}: missing or changed since it was published (sha256 differs)")
    return manifest


def import_base(src: Path, out: Path, scale: str) -> dict:
    """Copy a published phase A into ``out`` once (a file already there must be the same: a fresh --out is
    simplest); its job times are appended to out's job log, and out/phase-a-from.json marks the import done."""
    manifest = load_manifest(src, scale)
    marker = out / "phase-a-from.json"
    if marker.exists():
        if json.loads(marker.read_text())["files"] != manifest["files"]:
            raise SystemExit(f"{out} already holds another published phase A ({marker}); use a fresh --out")
        return manifest
    for rel in manifest["files"]:
        target = out / rel
        if rel == "logs/jobs.jsonl":
            continue
        if target.exists():
            if sha256(target) != manifest["files"][rel]:
                raise SystemExit(f"{target} exists and differs from the published {src / rel}; use a fresh --out")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.copy2(src / rel, tmp)
        os.replace(tmp, target)   # a file is whole or absent: a killed import reruns
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / "jobs.jsonl", "a") as log:
        log.write((src / "logs" / "jobs.jsonl").read_text())
    marker.write_text(json.dumps(dict(manifest, source=str(src)), indent=2) + "\n")
    return manifest
