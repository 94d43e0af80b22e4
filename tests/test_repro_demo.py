"""studies/repro_demo.py --quick: every stage of the demo study (captions, VAE, teacher, LCM, LCM-AT, FID, adherence,
exports, compare, the study's own CLIP and CLIP scores, report) runs end to end with tiny budgets, and a rerun has nothing
left to do. The jobs run in this process (tests/study_jobs.py) except the report, which the study's own runner runs as
a child: the one real run of ``python -m studies.repro_demo``. The quick study's data is the captioned subset the
repository ships (models/demo-data), so this runs on any machine with the dev install, Fashion-MNIST installed or not;
only the real dataset's captions command (tested in tests/test_demo_pipeline.py) and the test split as the reference
are left to the full study."""
import json
import os
import tarfile
from pathlib import Path

import pytest

from conftest import requires_fid_inception
from study_jobs import run_quick_study
from atdiff.runtime.errors import ToolkitError
from studies import demo_study, repro_demo
from studies.demo_study_stages import split_bundled_shard

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / demo_study.QUICK["data"]


def test_the_bundled_shard_splits_into_training_samples_and_unseen_reference_images(tmp_path):
    split_bundled_shard(BUNDLED, tmp_path, 10)
    with tarfile.open(BUNDLED) as bundled, tarfile.open(demo_study.train_shard(tmp_path)) as train:
        names = train.getnames()
        assert names == [f"{i:06d}.{ext}" for i in range(10) for ext in ("png", "txt")]
        assert all(train.extractfile(n).read() == bundled.extractfile(n).read() for n in names)   # unchanged bytes
        reference = sorted(demo_study.reference_images(tmp_path).iterdir())
        samples = len(bundled.getnames()) // 2
        assert [p.name for p in reference] == [f"{i:06d}.png" for i in range(10, samples)]
        assert reference[0].read_bytes() == bundled.extractfile("000010.png").read()
    with pytest.raises(ToolkitError, match="needs the others as its reference"):
        split_bundled_shard(BUNDLED, tmp_path / "all", samples)


@pytest.mark.slow
@requires_fid_inception   # the study's Inception FID column
def test_quick_demo_study_runs_every_stage_and_reports(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--quick", "--jobs", "2", "--threads", "1"]
    # tests/study_jobs.py; the child runs in tmp_path, so it finds the studies package on PYTHONPATH
    run_quick_study(repro_demo.main, "studies.repro_demo", args, tmp_path, monkeypatch,
                    env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    results = json.loads((out / "report" / "results.json").read_text())
    metrics = {(r["metric"], r["model"], r["steps"]) for r in results["aggregate"]}
    for model in ("lcm", "lcm-at"):
        for steps in (1, 2):
            assert {("fmnist-classifier", model, steps), ("inception", model, steps),
                    ("adherence", model, steps), ("clip", model, steps)} <= metrics
    assert {("fmnist-classifier", "teacher", 3), ("clip", "teacher", 3)} <= metrics
    seeds = next(r for r in results["aggregate"] if r["metric"] == "fmnist-classifier")["n_seeds"]
    assert seeds == 3
    assert results["compare_verdict"] is not None
    assert "### Versions" in (out / "report" / "table.md").read_text() and results["versions"]["torch"]
    assert (out / "report" / "grid-lcm-at-steps1.png").is_file()
    assert (out / "report" / "compare-classes.png").is_file()   # LCM vs LCM-AT vs the teacher, side by side
    assert (out / "runs" / "lcm-at" / "model" / "toolkit.json").is_file()  # the distilled model's own defaults
    assert json.loads((out / "study.json").read_text())["config"]["data"] == demo_study.BUNDLED_SHARD
    capsys.readouterr()
    assert repro_demo.main(["--out", str(out), "--quick", "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing and all(line.startswith("done") for line in listing.splitlines())
