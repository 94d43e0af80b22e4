"""What each ``toolkit eval`` command does, behind the typer signatures in eval/cli.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from atdiff.eval.clip_score import ClipScorer, read_prompts
from atdiff.eval.fid import FeatureStats, fid_from_stats, save_stats
from atdiff.eval.inception import InceptionFeatures
from atdiff.eval.kid import kernel_inception_distance
from atdiff.eval.measure import cache_subdir, check_comparable, source_features, source_stats
from atdiff.eval.sources import FolderSource, resolve_source, take
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.progress import console, progress_bars
from atdiff.runtime.provenance import versions
from atdiff.runtime.staging import write_json


def run_fid(gen: str, ref: str, *, extractor: InceptionFeatures, kid: bool, seed: int, cache: Path | None,
            chunk_size: int, out: Path | None, num: int | None = None) -> dict:
    with progress_bars() as tracker:
        sides = {}
        for name, arg in (("gen", gen), ("ref", ref)):
            source = resolve_source(arg)
            if isinstance(source, FeatureStats):
                if kid:
                    raise ToolkitError(f"KID needs features, and '{arg}' is a stats file; pass image folders or "
                                       "dataset names for both sides, or drop --kid")
                sides[name] = (source, None)
                continue
            source = take(source, num)
            feats = source_features(source, extractor, cache_dir=cache_subdir(cache, name), chunk_size=chunk_size,
                                    progress=tracker(f"features {name}", source.num))
            sides[name] = (FeatureStats.from_features(feats, meta={"source": source.describe(),
                                                                   "extractor": extractor.describe()}), feats)
    (gen_stats, gen_feats), (ref_stats, ref_feats) = sides["gen"], sides["ref"]
    notes = check_comparable(gen_stats, ref_stats)
    result = {"fid": fid_from_stats(gen_stats, ref_stats), "num_gen": gen_stats.num, "num_ref": ref_stats.num,
              "extractor": extractor.describe(), "notes": notes}
    if kid:
        k = kernel_inception_distance(gen_feats, ref_feats, seed=seed)
        result.update(kid=k.mean, kid_std=k.std, kid_subsets=k.subsets, kid_subset_size=k.subset_size)
    _finish(result, out, {"command": "fid", "gen": gen, "ref": ref, "seed": seed})
    return result


def run_stats(data: str, *, out: Path, extractor: InceptionFeatures, cache: Path | None, chunk_size: int,
              num: int | None = None) -> FeatureStats:
    if isinstance(resolve_source(data), FeatureStats):
        raise ToolkitError(f"'{data}' is already a stats file; pass an image folder or dataset name")
    with progress_bars() as tracker:
        stats = source_stats(data, extractor, cache_dir=cache, chunk_size=chunk_size,
                             progress=tracker("features", 0), num=num)
    stats = FeatureStats(stats.mu, stats.sigma, stats.num, {**stats.meta, "versions": versions("eval")})
    save_stats(stats, out)
    console.print(f"wrote {out}: mu/sigma of {stats.num} images ({extractor.describe()['resize']} resize)")
    return stats


def run_clip(images: Path, *, prompts_file: Path | None, scorer: ClipScorer, out: Path | None) -> dict:
    source = resolve_source(images)
    if not isinstance(source, FolderSource):
        raise ToolkitError(f"'{images}' is not an image folder; CLIP score needs generated images and their prompts")
    prompts = read_prompts(prompts_file) if prompts_file else [_png_prompt(p) for p in source.files]
    if len(prompts) != source.num:
        raise ToolkitError(f"{prompts_file} has {len(prompts)} prompts for {source.num} images in {images}; "
                           "write one prompt per image, in the images' sorted filename order")
    scores = []
    with progress_bars() as tracker:
        update = tracker("clip", source.num)
        for lo in range(0, source.num, scorer.batch_size):
            hi = min(lo + scorer.batch_size, source.num)
            scores.append(scorer(source.load(lo, hi), prompts[lo:hi]))
            update(hi)
    scores = np.concatenate(scores)
    result = {"clip_score": float(scores.mean()), "clip_score_sem": float(scores.std(ddof=1) / np.sqrt(len(scores)))
              if len(scores) > 1 else 0.0, "num": int(len(scores)), **scorer.record}
    _finish(result, out, {"command": "clip", "images": str(images),
                          "prompts": str(prompts_file) if prompts_file else "PNG metadata"})
    return result


def _png_prompt(path: Path) -> str:
    """The prompt 'toolkit generate' stored in the PNG's text chunk."""
    from PIL import Image
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("at-diffusion-toolkit")
    prompt = json.loads(text).get("prompt") if text else None
    if not prompt:
        why = "an unconditional sample" if text else "not made by 'toolkit generate'"
        raise ToolkitError(f"{path} carries no prompt in its metadata ({why}); "
                           "pass --prompts FILE with one prompt per image")
    return prompt


def _finish(result: dict, out: Path | None, config: dict) -> None:
    """Print the result as JSON on stdout; with ``out``, also write it (plus config and versions) atomically."""
    print(json.dumps(result, indent=2, default=str))
    if out is not None:
        write_json(out, {**result, "config": config, "versions": versions("eval")})
