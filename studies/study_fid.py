"""FID of one model's samples for the study scripts (repro_adm, repro_demo): the shared call into
``atdiff.eval.sample_fid`` with the batch and chunk sizes measured best on this CPU."""
from __future__ import annotations

from pathlib import Path


def fid_rows(model: Path, ref, extractor, *, nfes, num: int, seed: int, cache: Path, **plan) -> list[dict]:
    """One row per NFE (atdiff.eval.sample_fid.run_sample_fid); ``plan``: sampler, sampler_options, eps_scale, prompts,
    guidance_scale."""
    from atdiff.eval.sample_fid import SampleFIDConfig, run_sample_fid
    # batches of 100: the small UNets run ~30% faster per image than at 500 on one CPU thread (cache-bound)
    config = SampleFIDConfig(model=str(model), nfes=tuple(nfes), num=num, device="cpu", seed=seed, cache_dir=cache,
                             chunk_size=500, batch_size=100, **plan)
    return run_sample_fid(config, ref, extractor)


def extractor(features: str):
    from atdiff.eval.measure import make_extractor
    return make_extractor(features, device="cpu")
