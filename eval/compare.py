"""``toolkit eval compare``: the deployment check.

Every model runs on every backend at every step count with the *same* seeds and prompts (sample i: seed
``seed + i``, prompt ``i mod P``), so differences between backends are deployment error, not sampling
luck. Each (model, backend, steps) cell gets FID against ``--ref`` (with a bootstrap std: the seed noise at
this N) and, for text-to-image models, CLIP score; the report (eval/compare_report.py) turns the cells
into a table, a plot, an image grid and a verdict.

Models are named: ``--model lcm=runs/lcm --model lcm-at=runs/lcm-at``. The torch backend runs the
diffusers directory; onnxruntime / tensorrt run an export directory: ``--export lcm=exports/lcm`` (or
the ``--model`` path itself when that is already an export dir).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from atdiff.eval.features import FeatureCache, chunked_measure
from atdiff.eval.fid import FeatureStats, ReferenceFID, fid_from_stats
from atdiff.eval.generate import SamplingPlan, sample_producer
from atdiff.eval.measure import check_comparable, check_extractor, model_identity
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.generation import GenerationOptions
from atdiff.runtime.model_source import MANIFEST

TORCH = "torch"


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    models: dict[str, str]                 # name -> diffusers dir or export dir (insertion order kept)
    exports: dict[str, str]                # name -> export dir, for non-torch backends
    backends: tuple[str, ...]
    steps: tuple[int, ...]
    num: int
    prompts: tuple[str, ...] | None = None
    sampler: str | None = None
    seed: int = 0
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    chunk_size: int = 500
    grid_count: int = 4
    bootstrap: int = 20
    baseline: str | None = None            # the model the others are compared against (default: first)
    cache_dir: Path | None = None
    backend_options: dict = dataclasses.field(default_factory=dict)  # backend -> {option: value}

    @property
    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.models))

    def record(self) -> dict:
        data = dataclasses.asdict(self)
        data["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        data["prompts"] = list(self.prompts) if self.prompts else None
        return data


def model_path_for(config: CompareConfig, name: str, backend: str) -> str:
    """Which directory runs ``name`` on ``backend`` (see the module docstring)."""
    path = config.models[name]
    is_export = (Path(path) / MANIFEST).is_file()
    if backend == TORCH:
        if is_export:
            raise ToolkitError(f"model '{name}' is an export dir ({path}); the torch backend runs the diffusers "
                               f"directory: pass --model {name}=DIFFUSERS_DIR --export {name}={path}")
        return path
    if name in config.exports:
        return config.exports[name]
    if is_export:
        return path
    raise ToolkitError(f"backend '{backend}' runs export directories and model '{name}' has none; export it "
                       f"with 'toolkit export {path} --out EXPORT_DIR' and pass --export {name}=EXPORT_DIR")


def validate(config: CompareConfig) -> None:
    """Everything checkable before any model loads."""
    if not config.models:
        raise ToolkitError("no models given; pass --model NAME=PATH (twice to compare two models)")
    if config.baseline_name not in config.models:
        raise ToolkitError(f"--baseline '{config.baseline}' is not one of the models: {', '.join(config.models)}")
    stray = set(config.backend_options) - set(config.backends)
    if stray:
        raise ToolkitError(f"--backend-option given for {sorted(stray)}, which is not among --backend "
                           f"{list(config.backends)}; use BACKEND:KEY=VALUE with a backend that runs")
    unknown = set(config.exports) - set(config.models)
    if unknown:
        raise ToolkitError(f"--export names {sorted(unknown)} match no --model; use the same NAME in both")
    if config.num < 2:
        raise ToolkitError(f"--num must be at least 2 (FID needs a covariance), got {config.num}")
    for name in config.models:
        for backend in config.backends:
            model_path_for(config, name, backend)


@dataclasses.dataclass
class CellMetrics:
    """What every cell measures: FID against ``ref`` (when given, with its bootstrap std) and CLIP score
    (text-to-image models, when a scorer is given)."""
    extractor: Any
    ref: FeatureStats | None
    clip: Any = None
    bootstrap: int = 20
    seed: int = 0

    def __post_init__(self):
        self.reference_fid = ReferenceFID(self.ref) if self.ref is not None else None

    def measure_fn(self, plan: SamplingPlan, use_clip: bool):
        def measure(images, start, stop):
            out = {"inception": self.extractor(images)} if self.ref is not None else {}
            if use_clip:
                out["clip"] = self.clip(list(images), plan.prompts_for(start, stop))
            return out or {"none": np.zeros(len(images))}
        return measure

    def cache_key(self, use_clip: bool) -> dict:
        return {"fid": self.extractor.describe() if self.ref is not None else None,
                "clip": self.clip.record if use_clip else None}

    def summarize(self, measured: dict) -> dict:
        return {**self._fid(measured.get("inception")), **_clip_cells(measured.get("clip"))}

    def _fid(self, feats) -> dict:
        if feats is None:
            return {"fid": None, "fid_std": None}
        stats = FeatureStats.from_features(feats, meta={"extractor": self.extractor.describe()})
        check_comparable(stats, self.ref)
        return {"fid": fid_from_stats(stats, self.ref),
                "fid_std": self.reference_fid.bootstrap_std(feats, rounds=self.bootstrap, seed=self.seed)}


def run_compare(config: CompareConfig, metrics: CellMetrics, *, progress=None, on_row=None) -> tuple[list[dict], dict]:
    """Rows (one per model x backend x steps) and grids {(model, backend, steps): uint8 [K, H, W, 3]}.
    ``progress(label, done, total)`` reports samples; ``on_row(row)`` sees each finished row."""
    from atdiff.runtime.pipeline import Pipeline
    validate(config)
    if metrics.ref is not None:
        check_extractor(metrics.extractor, metrics.ref)
    rows, grids = [], {}
    for name in config.models:
        for backend in config.backends:
            path = model_path_for(config, name, backend)
            with Pipeline.load(path, backend=backend, device=config.device, dtype=config.dtype,
                               **config.backend_options.get(backend, {})) as pipe:
                model_id = model_identity(pipe)   # recorded with every row, and the cache key
                for steps in config.steps:
                    label = f"{name} / {backend} / {steps} steps"
                    tick = (lambda done, label=label: progress(label, done, config.num)) if progress else None
                    row, grid = _run_cell(pipe, config, metrics, (name, model_id), steps, tick)
                    rows.append(row)
                    grids[(name, backend, steps)] = grid
                    if on_row:
                        on_row(row)
    return rows, grids


def _run_cell(pipe, config: CompareConfig, metrics: CellMetrics, model: tuple[str, dict], steps: int, tick):
    """One (model, backend, steps) cell; ``model`` is (name, atdiff.eval.measure.model_identity)."""
    (name, model_id), backend = model, pipe.backend.name
    plan = SamplingPlan(GenerationOptions(steps=steps, sampler=config.sampler, seed=config.seed,
                                          batch_size=config.batch_size, prompts=config.prompts))
    use_clip = metrics.clip is not None and pipe.spec.is_latent
    cache = None
    if config.cache_dir is not None:
        cache = FeatureCache(Path(config.cache_dir) / f"{name}-{backend}-{steps}",
                             {"model": model_id, "backend": pipe.backend.describe(),
                              "plan": plan.record(), "metrics": metrics.cache_key(use_clip),
                              "chunk_size": config.chunk_size})
    started = time.perf_counter()
    measured = chunked_measure(config.num, sample_producer(pipe, plan, on_progress=tick),
                               metrics.measure_fn(plan, use_clip), chunk_size=config.chunk_size, cache=cache)
    row = {"model": name, "backend": backend, "steps": steps, "num": config.num,
           "seconds": round(time.perf_counter() - started, 2), "runs_on": pipe.backend.describe(),
           "model_sha256": model_id["sha256"],
           **metrics.summarize(measured)}
    grid = sample_producer(pipe, plan)(0, min(config.grid_count, config.num))  # regenerated: chunks may be cached
    return row, grid


def _clip_cells(scores) -> dict:
    if scores is None:
        return {"clip": None, "clip_std": None}
    scores = np.asarray(scores, np.float64)
    # std of the mean over seeds: the seed noise of the CLIP score at this N
    sem = float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0
    return {"clip": float(scores.mean()), "clip_std": sem}
