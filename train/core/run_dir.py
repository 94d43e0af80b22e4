"""Which run directory the trainer may write into: new, empty, or a run this toolkit made (its marker
``toolkit-run.json``, train/core/run_lock.py), so a mistyped --out never loses someone's config.json, model/ or
metrics.jsonl. Split from train/core/trainer.py, which re-exports these names."""
from __future__ import annotations

import json
from pathlib import Path

from atdiff.runtime.errors import ToolkitError
from atdiff.train.core.run_lock import RUN_MARKER, adopt_run_dir, create_run_dir, read_run_marker

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
# TrainerConfig fields every trainer version wrote to config.json: how a run made before run markers is known
_LEGACY_CONFIG_KEYS = {"run_dir", "max_steps", "batch_size", "lr", "grad_accum", "seed", "save_every", "resume"}


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(step, path) of the newest complete checkpoint in ``run_dir``, or None."""
    found = []
    for path in (Path(run_dir) / CHECKPOINTS).glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return max(found) if found else None


def _is_legacy_run(run_dir: Path) -> bool:
    """A run made before toolkit-run.json existed: its config.json is this trainer's TrainerConfig record."""
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(saved, dict) and _LEGACY_CONFIG_KEYS <= saved.keys()


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a ``--out`` the trainer must not write into (nothing is written here):

    - new or empty: a fresh run; a run this trainer made (its marker): continued with ``resume``, restarted
      without it unless it has a checkpoint (a new run would mix with the old one's metrics and checkpoints);
    - a run made before the marker existed (its config.json is a TrainerConfig record): only with ``resume``.
      Accepted so that runs of earlier versions (a study's, half way) stay resumable; --resume says the user means
      this directory, and it rewrites only the trainer's own files (config.json, metrics.jsonl, checkpoints/,
      model/). Without --resume it is refused, as any run with a checkpoint is;
    - anything else (a file, a folder of someone's files) is refused, naming what it holds."""
    run_dir = Path(run_dir)
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    if not run_dir.is_dir():
        raise ToolkitError(f"--out {run_dir} is a file, not a run directory; choose a new --out")
    marked, legacy = read_run_marker(run_dir) is not None, _is_legacy_run(run_dir)
    found = latest_checkpoint(run_dir)
    if (marked or legacy) and found is not None and not resume:
        raise ToolkitError(f"{run_dir} already holds a training run (checkpoint step {found[0]}); "
                           "pass --resume to continue it, or choose a new --out (or delete that directory)")
    if marked or (legacy and resume):
        return
    first = sorted(p.name for p in run_dir.iterdir())[0]
    hint = " or pass --resume to continue it (a run of an earlier version)" if legacy else ""
    raise ToolkitError(f"--out {run_dir} is not empty and is not a run directory this toolkit made (no {RUN_MARKER}; "
                       f"it holds {first}); nothing was written: choose a new or empty --out{hint}")


def claim_run_dir(run_dir: Path, resume: bool) -> None:
    """``check_run_dir``, then make ``run_dir`` a marked run directory (created with only its marker, or an
    accepted run of an earlier version marked); call before writing anything into it. Idempotent."""
    check_run_dir(run_dir, resume)
    run_dir = Path(run_dir)
    if read_run_marker(run_dir) is not None:
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        adopt_run_dir(run_dir)   # check_run_dir accepted it as a run of an earlier version (with --resume)
    else:
        create_run_dir(run_dir)
