"""The ADM study script (studies/repro_adm.py): the job runner's ordering / resume / failure rules, and the
whole study end to end with its --quick budgets (real commands, tiny sizes) on the bundled Fashion-MNIST subset laid
out as the dataset package (conftest.bundled_datasets_dir), so it runs on any machine; the real package's files are
read by the same lookup (tests/test_adm_at.py checks them when installed). The whole study's jobs run in this process
(tests/study_jobs.py) but the report, which the study's own runner runs as a child: one real run of the script."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED_SHARD, dataset_available, requires_fid_inception
from study_jobs import run_quick_study
from studies import repro_adm
from studies.study_runner import Job, run_jobs

ROOT = Path(__file__).resolve().parent.parent


def touch_job(name: str, tmp_path: Path, deps=(), code: str = "") -> Job:
    done = tmp_path / f"{name}.done"
    script = f"{code}\nopen({str(done)!r}, 'w').write('')"
    return Job(name, lambda: [sys.executable, "-c", script], done, tuple(deps))


def test_jobs_run_after_their_deps_and_finished_jobs_are_skipped(tmp_path):
    order = tmp_path / "order.txt"
    log = f"open({str(order)!r}, 'a').write('{{}}\\n')"
    jobs = [touch_job("b", tmp_path, ["a"], log.format("b")), touch_job("a", tmp_path, [], log.format("a")),
            touch_job("c", tmp_path, ["b"], log.format("c"))]
    result = run_jobs(jobs, tmp_path / "logs", parallel=2, verbose=False)
    assert result["failed"] == [] and order.read_text().split() == ["a", "b", "c"]
    again = run_jobs(jobs, tmp_path / "logs", parallel=2, verbose=False)
    assert again["report"] == {} and order.read_text().split() == ["a", "b", "c"]   # nothing reran


def test_a_failing_job_stops_its_dependents_only_and_is_reported(tmp_path):
    jobs = [touch_job("a", tmp_path, [], "raise SystemExit(3)"), touch_job("b", tmp_path, ["a"]),
            touch_job("c", tmp_path, [])]
    result = run_jobs(jobs, tmp_path / "logs", parallel=1, verbose=False)
    assert result["failed"] == ["a"] and result["pending"] == ["a", "b"]
    assert not (tmp_path / "b.done").exists() and (tmp_path / "c.done").exists()
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([touch_job("x", tmp_path, ["nope"])], tmp_path / "logs")


def test_a_refresh_job_reruns_when_a_dep_finished_after_it(tmp_path):
    count = tmp_path / "count.txt"
    log = f"open({str(count)!r}, 'a').write('r\\n')"
    dep, report = touch_job("cell", tmp_path), touch_job("report", tmp_path, ["cell"], log)
    report.refresh = True
    assert run_jobs([dep, report], tmp_path / "logs", verbose=False)["failed"] == []
    assert run_jobs([dep, report], tmp_path / "logs", verbose=False)["report"] == {}   # up to date: skipped
    os.utime(dep.done, (report.done.stat().st_mtime + 10,) * 2)   # the cell finished after the (partial) report
    assert list(run_jobs([dep, report], tmp_path / "logs", verbose=False)["report"]) == ["report"]
    assert count.read_text().split() == ["r", "r"]


def test_the_bundled_subset_is_found_as_fashion_mnist_by_eval_and_by_training(bundled_datasets_dir, monkeypatch):
    from atdiff.eval.fashion_prompts import labels_of
    from atdiff.eval.sources import dataset_labels, dataset_source
    from atdiff.train.core.caption_data import find_records
    from atdiff.train.core.image_data import load_image_dataset
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(bundled_datasets_dir))
    assert dataset_available("fashion-mnist")
    captions = [r.caption for r in find_records(str(BUNDLED_SHARD))]
    train, test = dataset_source("fashion-mnist", "train").images, dataset_source("fashion-mnist", "test").images
    assert (train.shape, test.shape, train.dtype) == ((800, 32, 32), (len(captions) - 800, 32, 32), np.uint8)
    labels = np.concatenate([dataset_labels("fashion-mnist", "train"), dataset_labels("fashion-mnist", "test")])
    np.testing.assert_array_equal(labels, labels_of(captions))
    assert set(labels.tolist()) == set(range(10))
    ds = load_image_dataset("fashion-mnist", class_cond=True)   # `toolkit train adm --data fashion-mnist`
    assert (len(ds), ds.info.channels, ds.info.resolution, ds.info.num_classes) == (800, 1, 32, 10)
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(bundled_datasets_dir / "fashion-mnist"))   # no fashion-mnist/ in it
    assert dataset_available("fashion-mnist") == Path("/usr/share/datasets/fashion-mnist").is_dir()


@pytest.mark.slow
@requires_fid_inception   # the study's Inception FID column
def test_quick_study_runs_every_stage_and_resumes(tmp_path, bundled_datasets_dir, monkeypatch, capsys):
    out = tmp_path / "study"
    args = ["--out", str(out), "--quick", "--jobs", "2"]
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(bundled_datasets_dir))   # looked up at each call (idx_datasets)
    run_quick_study(repro_adm.main, "studies.repro_adm", args, ROOT, monkeypatch)   # tests/study_jobs.py
    results = json.loads((out / "report/results.json").read_text())
    from studies import adm_study
    cfg = adm_study.QUICK
    cells = {(r["features"], r["model"], r["sampler"], r["nfe"]) for r in results["aggregate"]}
    for model in adm_study.MODELS:
        for sampler in adm_study.SAMPLERS:
            for nfe in cfg["nfes"]:
                assert ("fmnist-classifier", model, sampler, nfe) in cells
            assert ("inception", model, sampler, cfg["inception"]["nfe"]) in cells
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 for r in results["rows"])
    inception = [a for a in results["aggregate"] if a["features"] == "inception"]   # one seed: bootstrap noise
    assert all(a["std_kind"] == "bootstrap" and a["std"] > 0 for a in inception)
    seeds = {r["seed"] for r in results["rows"] if r["features"] == "fmnist-classifier"}
    assert seeds == set(cfg["seeds"])
    steps = {t["model"]: t["optimizer_steps"] for t in results["training"]}
    assert steps["ft"] == steps["ip"] == steps["at"] == steps["at-detach"] == cfg["finetune"]["opt_steps"]
    assert results["compare_verdict"] is not None and len(results["grids"]) == 2 * len(adm_study.MODELS) + 1
    assert "compare.png" in results["grids"] and (out / "report/compare.png").is_file()
    for sampler in adm_study.ES_SAMPLERS:   # every model's ES pick under every sampler searched
        assert set(results["es"][sampler]) == set(adm_study.MODELS)
        assert all(r["sampler"] == sampler for r in results["es"][sampler].values())
    table = (out / "report/table.md").read_text()
    assert "ADM-AT (full)" in table
    assert "| ADM-AT (detach) | ADM-FT |" in table   # three seeds: the AT rows are compared with the others
    assert "## Versions" in table and results["versions"]["torch"] and results["training"][0]["versions"]["torch"]
    capsys.readouterr()
    assert repro_adm.main(["--out", str(out), "--quick", "--list"]) == 0   # a rerun would start nothing:
    listing = capsys.readouterr().out                                      # every job is done
    assert listing and all(line.startswith("done") for line in listing.splitlines())


def test_a_job_started_alone_gets_every_core_and_jobs_side_by_side_one(tmp_path):
    jobs = [touch_job("solo", tmp_path, [], ""), touch_job("a", tmp_path, ["solo"]), touch_job("b", tmp_path, ["solo"])]
    result = run_jobs(jobs, tmp_path / "logs", parallel=2, threads=0, verbose=False)
    assert result["report"]["solo"]["threads"] == (os.cpu_count() or 1)
    assert result["report"]["a"]["threads"] == result["report"]["b"]["threads"] == 1
