"""The one progress display of generate, train and eval: rich bars on stderr (stdout stays for results)."""
from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def new_progress(*fields, transient: bool = True) -> Progress:
    """A rich Progress with the toolkit's columns (label, bar, done/total, elapsed, remaining); ``fields`` are
    extra columns shown before the times (e.g. training's loss and images/s)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *fields,
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient)


@contextlib.contextmanager
def progress_bars():
    """Yields ``tracker(label, total) -> update(done, total_now=None)``: one bar per label, made on first update."""
    with new_progress() as bar:
        tasks = {}

        def tracker(label: str, total: int | None):
            def update(done: float, total_now: int | None = None):
                size = total_now or total or None
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=size)
                bar.update(tasks[label], completed=done, total=size)
            return update
        yield tracker
