"""`toolkit bench`: the benchmarks run end to end on tiny models and write their results (timings are
recorded, never asserted: speed is judged from the files, on the machine that matters)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from tolerance import TINY_TEXT_UNET_LAYERS, network_rel
from toolkit import app

runner = CliRunner()


def test_bench_adm_at_writes_its_ratios(tmp_path):
    out = tmp_path / "adm-at.json"
    result = runner.invoke(app, ["bench", "adm-at", "--preset", "tiny", "--batch-size", "4", "--outer-steps", "1",
                                 "--rounds", "1", "--adv-steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["K"] == 2 and record["plain_steps"] == 2 and record["at_outer_steps"] == 1
    assert record["ratio_wall"] > 0 and "torch" in record["versions"]


def test_bench_ort_exports_validates_and_times(tmp_path):
    result = runner.invoke(app, ["bench", "ort", "--out", str(tmp_path), "--size", "tiny", "--device", "cpu",
                                 "--no-fp16", "--iters", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["ort_ms"] > 0 and record["torch_eager_ms"] > 0
    # what was timed computes the same thing: one tiny UNet evaluation whose layers may each round differently
    assert record["ort_rel_l2_vs_torch"] <= network_rel(TINY_TEXT_UNET_LAYERS)
    assert "ort_cuda_graph_ms" not in record              # CUDA variants only run on CUDA


def test_bench_ort_unknown_size_is_one_line(tmp_path):
    result = runner.invoke(app, ["bench", "ort", "--out", str(tmp_path), "--size", "xl", "--device", "cpu"])
    assert result.exit_code == 2 and "unknown --size 'xl'" in result.stderr
