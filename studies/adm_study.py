"""The ADM-AT study on Fashion-MNIST (docs/results.md, part I) as data: its rows, samplers, budgets and where each
result lives under the study directory. studies/repro_adm.py turns it into jobs; adm_study_stages.py and
adm_study_report.py read and write the files named here."""
from __future__ import annotations

from pathlib import Path

CLF = "fmnist-classifier"

MODELS = ("base", "ft", "ip", "at", "at-detach")
LABELS = {"base": "ADM (base)", "ft": "ADM-FT", "ip": "ADM-IP", "at": "ADM-AT (full)", "at-detach": "ADM-AT (detach)"}
# How each of the study's samplers runs: the toolkit sampler and its options. "ddim_gd" is guided-diffusion's DDIM
# (the seed paper's): with clip_sample on, eps is re-derived from the clipped x0. Plain "ddim" is diffusers'
# DDIMScheduler default, which clips x0 but keeps the network's eps: on these models that costs ~7 classifier FID at
# NFE 20 and gets worse with more steps, so it is kept as a measured side table, not as the table's DDIM.
SAMPLER_RUNS = {"ddim": ("ddim", {}), "dpmpp_2m": ("dpmpp_2m", {}), "iddpm": ("iddpm", {}),
                "ddim_gd": ("ddim", {"use_clipped_model_output": True})}
ES_OF = {"es_ddim": "ddim", "es_ddim_gd": "ddim_gd"}   # ES column -> the sampler it runs on eps / lambda
SAMPLER_RUNS.update({es: SAMPLER_RUNS[base] for es, base in ES_OF.items()})
TABLE_SAMPLERS = ("ddim_gd", "dpmpp_2m", "iddpm", "es_ddim_gd")   # the seed paper's columns
X0_CLIP_SAMPLERS = ("ddim", "es_ddim")                             # diffusers' default DDIM: the side table
# the order a grid job runs its cells in; its last cell marks the job done
SAMPLERS = ("ddim", "dpmpp_2m", "iddpm", "es_ddim", "ddim_gd", "es_ddim_gd")
# ES's lambda is picked for each DDIM (for the ES columns) and, to see whether ES would help it, for DPM-Solver++(2M)
ES_SAMPLERS = ("ddim", "dpmpp_2m", "ddim_gd")

FULL = dict(
    base=dict(steps=8000, batch=64, lr=2e-4, ema=0.9995), finetune=dict(opt_steps=3000, batch=64, lr=1e-4, ema=0.999),
    adv_steps=3, nfes=(5, 10, 20), base_nfes=(50,), seeds=(0, 1_000_000, 2_000_000), num=10000,
    inception=dict(nfe=10, num=5000), es=dict(lambdas=(1.0, 1.005, 1.01, 1.015, 1.02, 1.03), num=2000, nfe=10,
                                             seed=9_000_000),
    compare=dict(nfe=10, num=10000), grid=dict(nfes=(5, 10), count=64), save_every=250, ref_num=None)
QUICK = dict(
    base=dict(steps=24, batch=16, lr=2e-4, ema=0.99), finetune=dict(opt_steps=6, batch=16, lr=1e-4, ema=0.9),
    adv_steps=3, nfes=(2, 4), base_nfes=(6,), seeds=(0, 1000, 2000), num=64,
    inception=dict(nfe=4, num=8), es=dict(lambdas=(1.0, 1.02), num=32, nfe=4, seed=9000),
    compare=dict(nfe=4, num=32), grid=dict(nfes=(2, 4), count=16), save_every=0, ref_num=200)


def model_dir(out: Path, name: str) -> Path:
    return out / "runs" / name / "model"


def ref_path(out: Path, split: str, features: str) -> Path:
    return out / "refs" / f"{features}-{split}.npz"


def cell_path(out: Path, features: str, model: str, sampler: str, seed: int, nfe: int) -> Path:
    return out / "cells" / features / model / f"{sampler}-seed{seed}-nfe{nfe}.json"


def cache_path(out: Path, features: str, model: str, sampler: str, seed: int, nfe: int) -> Path:
    """The per-chunk feature cache of one cell (eval/sample_fid.py adds ``nfe-<N>/`` under it)."""
    return out / "cache" / features / model / f"{sampler}-seed{seed}-nfe{nfe}"


def es_path(out: Path, model: str, sampler: str = "ddim") -> Path:
    return out / "es" / (f"{model}.json" if sampler == "ddim" else f"{model}-{sampler}.json")


def config_for(quick: bool) -> dict:
    return QUICK if quick else FULL
