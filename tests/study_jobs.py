"""A study's jobs run in this process, for the tests of whole quick studies (tests/test_repro_demo.py, ...).

studies/study_runner.run_jobs starts each job's command line as a child (``python -m toolkit train ...``,
``python -m studies.repro_demo _fid ...``): some thirty fresh interpreters per quick study, each importing torch.
``run_jobs_in_process`` has run_jobs' signature and contract and runs the same command lines here instead, one at a
time in dependency order: ``toolkit`` through typer's CliRunner, ``studies.X`` through that module's main() with
the sys.argv the child would have had (how each study dispatches its own stages). A test patches it in for
study_runner.run_jobs and calls the study's main(), so everything but the executor is the study's own code; the
runner's subprocess rules have their own tests (tests/test_repro_adm.py) and each study test keeps one real run.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studies import study_runner
from studies.study_runner import Job, is_done


def run_quick_study(main, module: str, args: list[str], cwd: Path, monkeypatch, *, env: dict | None = None,
                    timeout: int = 1800) -> None:
    """A quick study as a test runs it: the study's own ``main(args)`` with every job but the report in this
    process, then ``python -m MODULE ARGS`` by the real runner, the study's subprocess smoke test: it finds the
    others done and runs the one job left, the report, as a child (the timeout guards a hung job; no speed check)."""
    with monkeypatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(study_runner, "run_jobs", functools.partial(run_jobs_in_process, skip=("report",)))
        assert main(args) == 0
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.findall(r"\] start (\S+)", done.stdout) == ["report"], done.stdout


def run_jobs_in_process(jobs: list[Job], log_dir: Path, *, parallel: int = 2, threads: int = 0,
                        verbose: bool = True, skip: tuple[str, ...] = ()) -> dict:
    """run_jobs in this process; the jobs named in ``skip`` (and any waiting on them) are left pending for a real
    runner. A failing job fails the test at once, with its output."""
    by_name = {job.name: job for job in jobs}
    finished = {job.name for job in jobs if is_done(job, by_name)}
    todo = [job for job in jobs if job.name not in finished and job.name not in skip]
    log_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    while ready := [job for job in todo if all(d in finished for d in job.deps)]:
        job, started = ready[0], time.time()
        run_command(job.name, job.command())
        assert job.done.exists(), f"job {job.name} finished without writing {job.done}"
        report[job.name] = {"job": job.name, "seconds": round(time.time() - started, 1), "threads": 1,
                            "returncode": 0}
        with open(log_dir / "jobs.jsonl", "a") as handle:   # as run_jobs logs it (a study report may read it)
            handle.write(json.dumps(report[job.name]) + "\n")
        finished.add(job.name)
        todo.remove(job)
    return {"report": report, "failed": [], "pending": [job.name for job in jobs if job.name not in finished]}


def run_command(name: str, command: list[str]) -> None:
    """One job's ``[sys.executable, "-m", MODULE, *args]`` (study_runner.toolkit / module), in this process."""
    python, flag, module, *args = command
    assert (python, flag) == (sys.executable, "-m"), (name, command)
    if module == "toolkit":
        from typer.testing import CliRunner

        from toolkit import app
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and result.exception is None, \
            f"job {name} ({' '.join(args)}): {result.exception!r}\n{result.output[-3000:]}"
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [module, *args])   # `python -m MODULE ARGS`: main() reads its stage from argv
        code = importlib.import_module(module).main()
    assert code == 0, f"job {name} ({' '.join(command)}) returned {code}"
