"""scripts/repro_demo.py --quick: every stage of the demo study (captions, VAE, teacher, LCM, LCM-AT, FID, adherence,
exports, compare, the study's own CLIP and CLIP scores, report) runs end to end with tiny budgets, and a rerun has nothing left to do."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_demo_study_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "scripts" / "repro_demo.py"), "--out", str(out), "--quick", "--jobs", "2",
               "--threads", "1"]
    subprocess.run(command, check=True, env=env, cwd=tmp_path)
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
    listing = subprocess.run(command[:-4] + ["--list"], check=True, env=env, capture_output=True, text=True).stdout
    assert all(line.startswith("done") for line in listing.splitlines())
