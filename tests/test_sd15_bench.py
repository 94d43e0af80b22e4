"""`toolkit bench sd15`'s measuring (export/sd15/process.py, report.py) on real child processes: GNU time's numbers,
the memory ceiling that stops a run, and the table `--table` prints from results.json. The full-size run itself is
the documented benchmark (docs/performance.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atdiff.export.sd15.process import GNU_TIME, measure
from atdiff.export.sd15.measure import machine
from toolkit import app

pytestmark = pytest.mark.skipif(not Path(GNU_TIME).exists(),
                                reason="GNU time (/usr/bin/time, Debian package 'time') is not installed")
# a child that holds MB of touched memory, for at most SECONDS (so a broken ceiling cannot hang the test)
HOLD = ("import sys, time\n"
        "block = bytearray(int(sys.argv[1]) * 2**20)\n"
        "block[::4096] = b'x' * len(range(0, len(block), 4096))\n"
        "end = time.monotonic() + float(sys.argv[2])\n"
        "while time.monotonic() < end:\n"
        "    block[0] = 1\n")


def test_measure_reports_the_childs_peak_memory_and_cpu(tmp_path):
    run = measure([sys.executable, "-c", HOLD, "300", "0.5"], tmp_path / "logs" / "hold.log")
    assert run.returncode == 0 and run.stopped is None
    assert 0.29 <= run.peak_rss_gb < 1.0            # 300 MB held, from GNU time
    assert run.user_s + run.sys_s >= 0.3 and run.wall_s >= 0.5   # it spun for 0.5 s


def test_a_run_over_the_memory_ceiling_is_stopped_and_says_so(tmp_path):
    run = measure([sys.executable, "-c", HOLD, "400", "60"], tmp_path / "hold.log", max_rss_gb=0.2)
    assert run.stopped and "0.2 GB ceiling" in run.stopped
    assert run.wall_s < 30 and run.peak_tree_rss_gb >= 0.2


def test_table_prints_each_recorded_step(tmp_path):
    run = measure([sys.executable, "-c", "pass"], tmp_path / "logs" / "export.log")
    results = {"machine": machine(), "steps": {"export": {**run.__dict__, "step": "export", "written_bytes": 3 * 2**20}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    result = CliRunner().invoke(app, ["bench", "sd15", "--work", str(tmp_path), "--table"])
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.output.splitlines() if line.startswith("| export |")]
    assert "| ok |" in row and "wrote 3.0 MB" in row and sys.executable in row


def test_running_steps_needs_the_fixture_directory(tmp_path):
    result = CliRunner().invoke(app, ["bench", "sd15", "--work", str(tmp_path)])
    assert result.exit_code != 0 and "--pipe is needed" in result.output
