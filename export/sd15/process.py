"""Run one command as a user types it and measure it: wall time, CPU time, peak RSS (GNU ``/usr/bin/time -v``, the
largest process of the run) and the peak RSS summed over its process tree (sampled from /proc every second), with a
memory ceiling: a run whose tree passes ``max_rss_gb`` is stopped and recorded as stopped, not as a result.

Linux only (/proc, GNU time): these are the benchmark machine's tools, not the toolkit's.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

GNU_TIME = "/usr/bin/time"
_FIELDS = {"user_s": r"User time \(seconds\): ([\d.]+)", "sys_s": r"System time \(seconds\): ([\d.]+)",
           "max_rss_kb": r"Maximum resident set size \(kbytes\): (\d+)",
           "wall": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)"}


@dataclasses.dataclass
class Measured:
    argv: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_gb: float        # GNU time: the largest single process
    peak_tree_rss_gb: float   # sampled: the whole process tree
    stopped: str | None       # why the run was stopped, if it was
    log: str


def parse_gnu_time(text: str) -> dict:
    found = {key: re.search(pattern, text) for key, pattern in _FIELDS.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise ValueError(f"GNU time output lacks {', '.join(missing)}")
    wall = 0.0
    for part in found["wall"].group(1).split(":"):
        wall = wall * 60 + float(part)
    return {"wall_s": wall, "user_s": float(found["user_s"].group(1)), "sys_s": float(found["sys_s"].group(1)),
            "max_rss_kb": int(found["max_rss_kb"].group(1))}


def tree_rss_kb(root: int) -> int:
    """VmRSS summed over ``root`` and its descendants (0 for processes that are gone)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))
        children.setdefault(ppid, []).append(int(entry.name))
        match = re.search(r"VmRSS:\s+(\d+)", status)
        rss[int(entry.name)] = int(match.group(1)) if match else 0
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class TreeWatch(threading.Thread):
    """Samples a process tree's RSS; over ``limit_kb`` it SIGTERMs the tree's process group."""

    def __init__(self, process: subprocess.Popen, limit_kb: int, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.process, self.limit_kb, self.interval_s = process, limit_kb, interval_s
        self.peak_kb, self.stopped = 0, None

    def run(self):
        while self.process.poll() is None:
            now = tree_rss_kb(self.process.pid)
            self.peak_kb = max(self.peak_kb, now)
            if now > self.limit_kb and self.stopped is None:
                self.stopped = (f"process tree RSS {now / 2**20:.1f} GB passed the "
                                f"{self.limit_kb / 2**20:g} GB ceiling")
                stop_children(self.process.pid)
            time.sleep(self.interval_s)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop_children(pid: int) -> None:
    """SIGTERM what GNU time runs (time itself must live on to write its numbers)."""
    for child in children(pid):
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass


def start(argv: list[str], log: Path, time_file: Path, env: dict | None = None) -> subprocess.Popen:
    """``argv`` under GNU time in a session of its own, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.Popen([GNU_TIME, "-v", "-o", str(time_file), *argv], stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def finish(process: subprocess.Popen, watch: TreeWatch, argv: list[str], log: Path, time_file: Path) -> Measured:
    process.wait()
    watch.join()
    timed = parse_gnu_time(time_file.read_text())
    return Measured(argv=argv, returncode=process.returncode, wall_s=timed["wall_s"], user_s=timed["user_s"],
                    sys_s=timed["sys_s"], peak_rss_gb=round(timed["max_rss_kb"] / 2**20, 2),
                    peak_tree_rss_gb=round(watch.peak_kb / 2**20, 2), stopped=watch.stopped, log=str(log))


def measure(argv: list[str], log: Path, max_rss_gb: float = 16.0) -> Measured:
    """Run ``argv`` to the end (or to the memory ceiling) and measure it."""
    time_file = log.with_suffix(".time")
    process = start(argv, log, time_file)
    watch = TreeWatch(process, int(max_rss_gb * 2**20))
    watch.start()
    return finish(process, watch, argv, log, time_file)
