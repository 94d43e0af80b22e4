"""A small resumable job graph for long studies on a few CPU cores (studies/repro_adm.py).

Each job is a command line with the jobs it waits for and the file that proves it finished. A rerun skips
finished jobs, and every command resumes by itself (trainers with --resume, FID runs from their per-chunk
caches), so a study killed at any point continues where it stopped. Up to ``jobs`` commands run at once,
each with ``threads`` torch threads (2 cores: two 1-thread jobs beat one 2-thread job on these small nets);
``threads=0`` gives a job started alone all the cores and jobs started beside others one core each.
Hand-written because it is ~80 lines over subprocess; make/snakemake would add a dependency and still need
the same commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass
class Job:
    name: str
    command: Callable[[], list[str]]   # built when the job starts (it may read what its deps wrote)
    done: Path                         # exists once the job has finished
    deps: tuple[str, ...] = ()
    # a summary (the report) made while its deps were still running is stale once one of them finishes later:
    # with refresh, the job is done only while ``done`` is at least as new as every dep's ``done``
    refresh: bool = False


def is_done(job: Job, by_name: dict[str, Job]) -> bool:
    if not job.done.exists():
        return False
    made = job.done.stat().st_mtime
    return not job.refresh or all(not by_name[d].done.exists() or by_name[d].done.stat().st_mtime <= made
                                  for d in job.deps)


def run_jobs(jobs: list[Job], log_dir: Path, *, parallel: int = 2, threads: int = 0, verbose: bool = True) -> dict:
    """Run ``jobs`` in dependency order; returns {"report": {name: {"seconds", "threads", "returncode"}} for the
    jobs run now (also appended to ``log_dir/jobs.jsonl``), "failed": [names], "pending": [names]}. A failing job
    is not retried in this run and the jobs that need it do not start; every other job still runs (an
    unattended multi-hour study should not stop at one bad cell)."""
    by_name = {job.name: job for job in jobs}
    unknown = {d for job in jobs for d in job.deps if d not in by_name}
    if unknown:
        raise ValueError(f"jobs depend on unknown jobs {sorted(unknown)}")
    log_dir.mkdir(parents=True, exist_ok=True)
    finished = {job.name for job in jobs if is_done(job, by_name)}
    running: dict[str, tuple[subprocess.Popen, float, int]] = {}
    report, failed = {}, []
    while True:
        for name, (proc, started, n) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            entry = {"job": name, "seconds": round(time.time() - started, 1), "threads": n, "returncode": proc.returncode}
            report[name] = entry
            with open(log_dir / "jobs.jsonl", "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            if proc.returncode != 0 or not by_name[name].done.exists():
                failed.append(name)
            else:
                finished.add(name)
            if verbose:
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {'ok' if name in finished else 'FAILED'} "
                      f"({entry['seconds']} s)", flush=True)
        ready = [job for job in jobs if job.name not in finished and job.name not in running
                 and job.name not in failed and all(d in finished for d in job.deps)]
        starting = ready[:max(0, parallel - len(running))]
        for job in starting:
            n = threads or ((os.cpu_count() or 1) if len(running) + len(starting) == 1 else 1)
            env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n), PYTHONUNBUFFERED="1")
            command = job.command()
            if verbose:
                print(f"[{time.strftime('%H:%M:%S')}] start {job.name} ({n} thread(s)): {' '.join(command)}",
                      flush=True)
            log = open(log_dir / f"{job.name}.log", "a")
            running[job.name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), n)
        if not running:
            break
        time.sleep(0.5)
    for name in failed:
        print(f"job {name} failed; see {log_dir / (name + '.log')}; rerun the same command to retry it",
              file=sys.stderr)
    return {"report": report, "failed": failed, "pending": [j.name for j in jobs if j.name not in finished]}


def module(name: str, *args) -> list[str]:
    """``python -m name args`` with this interpreter: how a study runs its own stages (``studies.repro_adm _grid``),
    found from the checkout's root the study was started in (studies/ is not installed)."""
    return [sys.executable, "-m", name, *map(str, args)]


def toolkit(*args) -> list[str]:
    """A ``toolkit`` command line run by this interpreter (the study's venv), arguments as strings."""
    return [sys.executable, "-m", "toolkit", *map(str, args)]


def study_main(argv: list[str] | None, description: str, build_jobs: Callable[[Path, bool | str], list[Job]],
               config_for: Callable[[bool | str], dict], scales: tuple[str, ...] = (),
               epilog: str | None = None) -> int:
    """The command line every study script shares: --out, --quick, --jobs, --threads, --list; with ``scales``
    also --scale NAME (the first the default; --quick stays the quick one), passed on instead of the flag."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    parser.add_argument("--out", type=Path, required=True, help="Study directory (runs, caches, report).")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets: every stage, in minutes.")
    if scales:
        parser.add_argument("--scale", choices=scales, default=scales[0], help="The study's budgets by name.")
    parser.add_argument("--jobs", type=int, default=2, help="Commands run at once.")
    parser.add_argument("--threads", type=int, default=0,
                        help="Torch threads per command (0: all cores for a job that runs alone, else one).")
    parser.add_argument("--list", action="store_true", help="List the jobs and whether each is done.")
    args = parser.parse_args(argv)
    scale = "quick" if scales and args.quick else getattr(args, "scale", args.quick)
    jobs = build_jobs(args.out.resolve(), scale)
    if args.list:
        by_name = {job.name: job for job in jobs}
        for job in jobs:
            print(f"{'done' if is_done(job, by_name) else '    '}  {job.name}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps({"quick": args.quick, "scale": scale, "config": config_for(scale)},
                                                    indent=2))
    result = run_jobs(jobs, args.out / "logs", parallel=args.jobs, threads=args.threads)
    return 1 if result["failed"] else 0
