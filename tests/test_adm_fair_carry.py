"""Phase A carried between sessions (studies/adm_fair_carry.py): published with its hashes, imported once into a
fresh study directory where every phase A job is done and phase B's are not, and refused when anything differs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from studies import adm_fair_carry as carry
from studies import repro_adm_fair
from studies.repro_adm_fair import build_jobs
from studies.study_runner import is_done


def finished_phase_a(out: Path) -> Path:
    """A quick-scale study directory whose phase A jobs have all written their records (synthetic contents), with
    a chosen base, phase B's first records and the files that must stay behind (snapshots, caches)."""
    for job in build_jobs(out, "quick"):
        if carry._is_phase_a(job.name) and not job.name.startswith("ref-"):
            job.done.parent.mkdir(parents=True, exist_ok=True)
            step = int(job.name.rsplit("-", 1)[-1]) if job.name[-1].isdigit() else None
            job.done.write_text(json.dumps({"job": job.name, "step": step, "converged": False, "skipped": True}))
    cell = out / "cells" / "fmnist-classifier" / "base-16" / "ddim_gd-seed0-nfe4.json"   # quick: NFE 4
    model = out / carry.MODEL
    for path, text in {cell: '{"rows": [{"fid": 40.0}]}', model / "config.json": "{}",
                       model / "diffusion_pytorch_model.safetensors": "weights",
                       out / "cells" / "fmnist-classifier" / "base-chosen" / "ddim_gd-seed0-nfe5.json": "{}",
                       out / "heldout" / "sweep-full-a0.05-m0.1.json": "{}",
                       out / "snapshots" / "base-16" / "config.json": "{}",
                       out / "runs" / "base" / "metrics.jsonl": '{"step": 8}\n'}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (out / "base.json").write_text(json.dumps({"step": 24, "converged": False, "all_checks_done": True}))
    (out / "logs").mkdir()
    (out / "logs" / "jobs.jsonl").write_text("".join(json.dumps({"job": n, "seconds": 1.0}) + "\n" for n in
                                                     ("segment-8", "check-16", "train-sweep-full-a0.05-m0.1")))
    return out


def test_published_phase_a_makes_every_phase_a_job_done_in_a_fresh_directory(tmp_path):
    out = finished_phase_a(tmp_path / "study")
    published = carry.publish_base(out, tmp_path / "base", "quick")
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["base"]["step"] == 24 and manifest["scale"] == "quick"
    assert "runs/base-chosen/model/diffusion_pytorch_model.safetensors" in manifest["files"]
    assert not any(f.startswith(("snapshots/", "heldout/")) or "base-chosen/ddim" in f for f in manifest["files"])
    card = (published / "README.md").read_text()   # the curve and checks as the report tables them
    assert "| 16 | 40.00 |" in card and "the arms start from 24" in card and "--from-base" in card
    fresh = tmp_path / "next-session"
    carry.import_base(published, fresh, "quick")
    jobs = build_jobs(fresh, "quick")
    by_name = {job.name: job for job in jobs}
    done = {job.name for job in jobs if is_done(job, by_name)}
    phase_a = {job.name for job in jobs if carry._is_phase_a(job.name) and not job.name.startswith("ref-")}
    assert done == phase_a   # phase B (the sweep on) and the reference statistics still to run
    assert (fresh / carry.MODEL / "diffusion_pytorch_model.safetensors").read_text() == "weights"
    logged = [json.loads(line)["job"] for line in (fresh / "logs" / "jobs.jsonl").read_text().splitlines()]
    assert logged == ["segment-8", "check-16"]   # phase A's job times only
    carry.import_base(published, fresh, "quick")   # a rerun of the same command: nothing copied or logged twice
    assert (fresh / "logs" / "jobs.jsonl").read_text().count("segment-8") == 1


def test_publish_refuses_an_existing_target_and_an_undecided_base(tmp_path):
    out = finished_phase_a(tmp_path / "study")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="exists"):
        carry.publish_base(out, tmp_path / "taken", "quick")
    assert list((tmp_path / "taken").iterdir()) == []
    (out / "base.json").unlink()
    with pytest.raises(SystemExit, match="has not chosen its base"):
        carry.publish_base(out, tmp_path / "base", "quick")
    assert not (tmp_path / "base").exists()


def test_import_refuses_a_changed_file_another_design_and_a_differing_directory(tmp_path):
    published = carry.publish_base(finished_phase_a(tmp_path / "study"), tmp_path / "base", "quick")
    with pytest.raises(SystemExit, match="quick"):
        carry.import_base(published, tmp_path / "a", "session")   # another scale's budgets
    other = tmp_path / "b" / "base.json"
    other.parent.mkdir()
    other.write_text('{"step": 16, "converged": true}')
    with pytest.raises(SystemExit, match="differs"):
        carry.import_base(published, tmp_path / "b", "quick")
    (published / "checks" / "base-16.json").write_text('{"converged": true}')
    with pytest.raises(SystemExit, match="sha256"):
        carry.import_base(published, tmp_path / "c", "quick")
    assert not (tmp_path / "c").exists()


def test_the_study_command_publishes_and_continues_from_a_published_base(tmp_path, capsys):
    out = finished_phase_a(tmp_path / "study")
    assert repro_adm_fair.main(["--out", str(out), "--quick", "--publish-base", str(tmp_path / "base")]) == 0
    fresh = tmp_path / "next"
    assert repro_adm_fair.main(["--out", str(fresh), "--quick", "--from-base", str(tmp_path / "base"), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "base at step 24" in listed and "done  choose-base" in listed and "done  segment-24" in listed
    assert "done  pick" not in listed
    with pytest.raises(SystemExit, match="need --out"):
        repro_adm_fair.main(["--quick", "--from-base", str(tmp_path / "base")])


def test_the_committed_medium_base_is_intact_and_matches_the_registered_design():
    """studies/bases/adm-fair-medium (phase A's product, committed once): every file's sha256 as published, and the
    medium scale's design in studies/adm_fair_study.py unchanged since, or phase B could not continue from it."""
    published = Path(__file__).resolve().parent.parent / "studies" / "bases" / "adm-fair-medium"
    manifest = carry.load_manifest(published, "medium")
    assert manifest["base"] == {"step": 24000, "converged": False, "all_checks_done": True}
    assert (published / carry.MODEL / "unet" / "diffusion_pytorch_model.safetensors").is_file()
