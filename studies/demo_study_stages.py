"""The in-process stages of studies/repro_demo.py: --quick's data from the bundled shard, one model's FID over its
step counts for one seed, its prompt adherence, and the report. Each writes one file when finished (the job's
proof); FID runs resume from the per-chunk feature caches of ``toolkit eval sample-fid``."""
from __future__ import annotations

import argparse
from pathlib import Path

from atdiff.runtime.errors import ToolkitError
from studies import demo_study as study
from studies.study_fid import extractor, fid_rows

ROOT = Path(__file__).resolve().parent.parent


def split_bundled_shard(shard: Path, out: Path, num_train: int) -> None:
    """The first ``num_train`` samples of ``shard`` (``000000.png`` + ``000000.txt`` ..., as
    train/demo/fashion_captions.py writes them) go unchanged to the study's training shard; the other samples' PNGs
    to the reference folder, images the models never train on (the test split's stand-in). The training shard is
    written last: it marks the job done."""
    import tarfile
    with tarfile.open(shard) as source:
        members = [m for m in source.getmembers() if m.isfile()]
        index = {m: int(Path(m.name).stem) for m in members}
        samples = len(set(index.values()))
        if not 0 < num_train < samples:
            raise ToolkitError(f"{shard} has {samples} samples; the quick study trains on {num_train} of them and "
                               "needs the others as its reference")
        reference = study.reference_images(out)
        reference.mkdir(parents=True, exist_ok=True)
        for member in members:
            if index[member] >= num_train and member.name.endswith(".png"):
                (reference / Path(member.name).name).write_bytes(source.extractfile(member).read())
        target = study.train_shard(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tar.tmp")
        with tarfile.open(partial, "w") as train:
            for member in members:
                if index[member] < num_train:
                    train.addfile(member, source.extractfile(member))
        partial.replace(target)


def model_steps(model: str, cfg: dict) -> tuple[int, ...]:
    return tuple(cfg["teacher_steps"]) if model == "teacher" else tuple(cfg["steps"])


def run_fid(out: Path, model: str, features: str, seed: int, cfg: dict) -> None:
    """FID of ``model`` at each of its step counts, class prompts in turn (sample i: prompt i mod 10)."""
    from atdiff.eval.fashion_prompts import class_prompts
    from atdiff.eval.fid import load_stats
    from atdiff.runtime.staging import write_json
    num = cfg["inception"]["num"] if features == "inception" else cfg["num"]
    rows = fid_rows(study.model_dir(out, model), load_stats(study.ref_path(out, features)), extractor(features),
                    nfes=model_steps(model, cfg), num=num, seed=seed, prompts=tuple(class_prompts()),
                    cache=out / "cache" / features / f"{model}-seed{seed}")
    write_json(study.fid_path(out, features, model, seed), {"model": model, "features": features, "seed": seed,
                                                            "num": num, "rows": rows})


def run_adherence(out: Path, model: str, seed: int, cfg: dict) -> None:
    from atdiff.eval.adherence import AdherenceConfig
    from atdiff.eval.adherence import run_adherence as measure
    from atdiff.eval.classifier import FashionClassifierFeatures
    from atdiff.runtime.staging import write_json
    config = AdherenceConfig(model=str(study.model_dir(out, model)), steps=model_steps(model, cfg),
                             per_class=cfg["per_class"], seed=seed, device="cpu")
    rows = measure(config, FashionClassifierFeatures(device="cpu"))
    write_json(study.adherence_path(out, model, seed), {"model": model, "seed": seed, "rows": rows})


def run_clip(out: Path, model: str, seed: int, cfg: dict) -> None:
    """CLIP score (the study's own CLIP, runs/clip) of per_class images per class prompt at each step count."""
    import time

    import numpy as np

    from atdiff.eval.clip_score import ClipScorer
    from atdiff.eval.fashion_prompts import class_prompts
    from atdiff.runtime.pipeline import Pipeline
    from atdiff.runtime.staging import write_json
    scorer = ClipScorer(str(study.model_dir(out, "clip")), None, device="cpu")
    rows, n = [], cfg["per_class"]
    with Pipeline.load(str(study.model_dir(out, model)), backend="torch", device="cpu") as pipe:
        for steps in model_steps(model, cfg):
            started = time.perf_counter()
            scores = np.concatenate([scorer(pipe([p], num_images=n, steps=steps, seed=seed, batch_size=50).arrays,
                                            [p] * n) for p in class_prompts()])
            rows.append({"steps": steps, "clip_score": float(scores.mean()),
                         "clip_score_sem": float(scores.std(ddof=1) / np.sqrt(scores.size)) if scores.size > 1 else None,
                         "num": int(scores.size), "seconds": round(time.perf_counter() - started, 2)})
    write_json(study.clip_path(out, model, seed), {"model": model, "metric": "clip", "seed": seed,
                                                    "clip": scorer.record, "rows": rows})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["_data", "_fid", "_adherence", "_clip", "_report"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model")
    parser.add_argument("--features", default=study.CLF)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg, out = study.config_for(args.quick), args.out.resolve()
    if args.stage == "_data":
        split_bundled_shard(ROOT / cfg["data"], out, cfg["captions"])
    elif args.stage == "_fid":
        run_fid(out, args.model, args.features, args.seed, cfg)
    elif args.stage == "_adherence":
        run_adherence(out, args.model, args.seed, cfg)
    elif args.stage == "_clip":
        run_clip(out, args.model, args.seed, cfg)
    else:
        from studies.demo_study_report import write_report
        write_report(out, cfg)
    return 0
