"""The in-process stages of studies/repro_adm.py: picking the ES factor, the FID grid of one model, the report.

Each runs as its own job (``python -m studies.repro_adm _grid --out DIR --model at ...``) so one model's
grid never waits for another's, and writes one JSON per finished cell: a rerun skips finished cells, and
``toolkit eval sample-fid``'s per-chunk caches resume a cell cut off half way.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from studies import adm_study as study
from studies.adm_study import CLF
from studies.study_fid import extractor as _extractor
from studies.study_fid import fid_rows as _fid_rows


def pick_es(out: Path, model: str, cfg: dict, sampler: str = "ddim") -> dict:
    """ES factor of ``model`` under ``sampler``: the lowest classifier FID at NFE es.nfe over es.lambdas, on seeds
    the grid never uses, against the train split (the grid's reference is the test split)."""
    from atdiff.eval.fid import load_stats
    from atdiff.runtime.staging import write_json
    es = cfg["es"]
    ref, extractor = load_stats(study.ref_path(out, "train", CLF)), _extractor(CLF)
    fids = {}
    for lam in es["lambdas"]:
        rows = _fid_rows(study.model_dir(out, model), ref, extractor, nfes=(es["nfe"],), num=es["num"],
                         **run_plan(sampler), seed=es["seed"], eps_scale=None if lam == 1.0 else lam,
                         cache=out / "cache" / "es" / study.es_path(out, model, sampler).stem / f"lambda-{lam}")
        fids[str(lam)] = rows[0]["fid"]
    chosen = float(min(fids, key=fids.get))
    record = {"model": model, "fid_by_lambda": fids, "chosen": chosen, "nfe": es["nfe"], "num": es["num"],
              "seed": es["seed"], "sampler": sampler, "ref": "fashion-mnist train split (classifier features)"}
    write_json(study.es_path(out, model, sampler), record)
    return record


def run_grid(out: Path, model: str, features: str, seed: int, nfes: tuple[int, ...], cfg: dict) -> None:
    """One model's cells for one sampling seed: every sampler at every NFE in ``nfes`` (the Inception column
    uses fewer samples). One JSON per (sampler, NFE); finished ones are skipped."""
    from atdiff.eval.fid import load_stats
    from atdiff.runtime.staging import write_json
    chosen = {base: json.loads(study.es_path(out, model, base).read_text())["chosen"] for base in study.ES_OF.values()}
    ref, extractor = load_stats(study.ref_path(out, "test", features)), _extractor(features)
    num = cfg["inception"]["num"] if features == "inception" else cfg["num"]
    for sampler in study.SAMPLERS:
        for nfe in nfes:
            path = study.cell_path(out, features, model, sampler, seed, nfe)
            if path.exists():
                continue
            base = study.ES_OF.get(sampler)
            eps_scale = chosen[base] if base else None
            if eps_scale == 1.0:  # ES picked no scaling: the DDIM cell is the ES cell
                rows = json.loads(study.cell_path(out, features, model, base, seed, nfe).read_text())["rows"]
            else:
                rows = _fid_rows(study.model_dir(out, model), ref, extractor, nfes=(nfe,), num=num, seed=seed,
                                 **run_plan(sampler), eps_scale=eps_scale,
                                 cache=study.cache_path(out, features, model, sampler, seed, nfe))
            write_json(path, {"model": model, "sampler": sampler, "eps_scale": eps_scale, "seed": seed, "num": num,
                              "features": features, "rows": rows})


def run_plan(sampler: str) -> dict:
    """The toolkit sampler and options of one of the study's samplers (study.SAMPLER_RUNS)."""
    name, options = study.SAMPLER_RUNS[sampler]
    return {"sampler": name, "sampler_options": options}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["_es", "_grid", "_report"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model")
    parser.add_argument("--features", default=CLF)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nfes", default="")
    parser.add_argument("--sampler", default="ddim", choices=study.ES_SAMPLERS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg, out = study.config_for(args.quick), args.out.resolve()
    if args.stage == "_es":
        pick_es(out, args.model, cfg, args.sampler)
    elif args.stage == "_grid":
        run_grid(out, args.model, args.features, args.seed, tuple(int(n) for n in args.nfes.split(",")), cfg)
    else:
        from studies.adm_study_report import write_report
        write_report(out, cfg)
    return 0
