"""What a training run shows and records: a rich progress bar (loss, images/s), metrics as JSON lines
in ``run_dir/metrics.jsonl`` (plus TensorBoard scalars when tensorboard is installed), and the versions
and file hashes that every exported model's ``training.json`` carries."""
from __future__ import annotations

import importlib.util
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines logged after ``step`` (a resumed run repeats the steps after its checkpoint,
    which would otherwise appear twice). Rewritten atomically."""
    from atdiff.runtime.staging import atomic_file
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with atomic_file(path, "w") as handle:
            handle.write("".join(line + "\n" for line in kept))


class MetricsLog:
    """Averages an objective's per-step metrics between flushes; appends one JSON line per flush
    (appending, so a resumed run continues the same file)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._tb = None
        if enabled and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._sums[key] += float(value)
        self._count += 1

    def flush(self, step: int, reduce: Callable[[dict[str, float]], dict[str, float]], **extra) -> None:
        """``reduce`` averages the means over processes (it is collective: call on every process)."""
        means = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        means = reduce(means)
        self._sums.clear()
        self._count = 0
        if not self.enabled:
            return
        record = {"step": step, **means, **extra, "time": time.time()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in {**means, **extra}.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class StepProgress:
    """A rich progress bar over steps with the latest loss and a smoothed images/s."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.start, self.total, self.enabled = start, total, enabled
        self.images_per_s = 0.0
        self._last = time.perf_counter()
        self._progress = None

    def __enter__(self) -> "StepProgress":
        if self.enabled:
            from rich.progress import TextColumn

            from atdiff.runtime.progress import new_progress
            self._progress = new_progress(TextColumn("loss {task.fields[loss]}"),
                                          TextColumn("{task.fields[ips]:.1f} img/s"), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start,
                                                 loss="-", ips=0.0)
        return self

    def advance(self, loss: float | None, images: int) -> None:
        now = time.perf_counter()
        rate = images / max(now - self._last, 1e-9)
        self._last = now
        # Exponential smoothing: one slow step (a checkpoint save) should not swing the display.
        self.images_per_s = rate if self.images_per_s == 0.0 else 0.9 * self.images_per_s + 0.1 * rate
        if self._progress is not None:
            shown = "-" if loss is None else f"{loss:.4f}"
            self._progress.update(self._task, advance=1, loss=shown, ips=self.images_per_s)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def write_generation_defaults(out: Path, *, guidance_scale: float) -> None:
    """``toolkit.json``: the defaults the runtime samples this model with (runtime/model_spec.py reads it)."""
    (Path(out) / "toolkit.json").write_text(json.dumps({"generation": {"guidance_scale": guidance_scale}}, indent=2))
