"""``toolkit eval sample-fid``: generate N samples per NFE and score them against reference statistics,
batch by batch in memory (no PNGs), with the per-chunk feature cache so an interrupted run resumes."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from atdiff.eval.features import FeatureCache, chunked_measure
from atdiff.eval.fid import FeatureStats, fid_from_stats
from atdiff.eval.generate import SamplingPlan, sample_producer
from atdiff.eval.measure import cache_subdir, check_comparable, check_extractor, model_identity
from atdiff.runtime.generation import GenerationOptions


@dataclasses.dataclass(frozen=True)
class SampleFIDConfig:
    model: str
    nfes: tuple[int, ...]
    num: int
    sampler: str | None = None
    backend: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int | None = None
    chunk_size: int = 500
    prompts: tuple[str, ...] | None = None
    guidance_scale: float | None = None
    eps_scale: float | None = None
    sampler_options: dict = dataclasses.field(default_factory=dict)
    cache_dir: Path | None = None
    backend_options: dict = dataclasses.field(default_factory=dict)


def generated_features(pipe, plan: SamplingPlan, extractor, num: int, *, chunk_size: int,
                       cache_dir: Path | None, model_id: dict | None, progress=None):
    """Features (``extractor``: atdiff.eval.measure.make_extractor) of ``num`` samples of ``pipe`` under ``plan``
    (cached per chunk when asked)."""
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, {"model": model_id, "backend": pipe.backend.describe(), "plan": plan.record(),
                                         "extractor": extractor.describe(), "chunk_size": chunk_size})
    produce = sample_producer(pipe, plan, on_progress=progress)
    return chunked_measure(num, produce, lambda images, *_: {"inception": extractor(images)}, chunk_size=chunk_size,
                           cache=cache)["inception"]


def run_sample_fid(config: SampleFIDConfig, ref: FeatureStats, extractor,
                   progress_for=None) -> list[dict]:
    """One row per NFE: {nfe, fid, num, seconds, backend, model_sha256}. ``progress_for(nfe)`` returns a callback
    taking the number of samples done."""
    from atdiff.runtime.pipeline import Pipeline
    rows = []
    check_extractor(extractor, ref)
    with Pipeline.load(config.model, backend=config.backend, device=config.device, dtype=config.dtype,
                       **config.backend_options) as pipe:
        model_id = model_identity(pipe)   # recorded with every row, and the cache key
        for nfe in config.nfes:
            plan = SamplingPlan(GenerationOptions(
                steps=nfe, sampler=config.sampler, seed=config.seed, batch_size=config.batch_size,
                prompts=config.prompts, guidance_scale=config.guidance_scale, eps_scale=config.eps_scale,
                sampler_options=config.sampler_options))
            started = time.perf_counter()
            feats = generated_features(pipe, plan, extractor, config.num, chunk_size=config.chunk_size,
                                       cache_dir=cache_subdir(config.cache_dir, f"nfe-{nfe}"), model_id=model_id,
                                       progress=progress_for(nfe) if progress_for else None)
            stats = FeatureStats.from_features(feats, meta={"extractor": extractor.describe()})
            check_comparable(stats, ref)
            rows.append({"nfe": nfe, "fid": fid_from_stats(stats, ref), "num": config.num,
                         "seconds": round(time.perf_counter() - started, 2), "backend": pipe.backend.describe(),
                         "model_sha256": model_id["sha256"]})
    return rows
