"""Rerun the ADM-AT study on Fashion-MNIST (docs/results.md), resumably, on a CPU.

    python -m studies.repro_adm --out /work/study/adm               # the real budgets: many CPU hours
    python -m studies.repro_adm --out /tmp/adm-quick --quick        # every stage with tiny budgets (minutes)
    python -m studies.repro_adm --out DIR --list                    # the jobs and whether each is done

Stages (each a job; a rerun of the same command skips finished jobs and resumes the others):
1. reference statistics: classifier features of the test split (the grid's reference) and of the train split
   (the held-out reference for picking the ES factor), Inception features of the test split;
2. one base ADM from scratch (``toolkit train adm --preset fmnist``), then four fine-tunes from its EMA weights
   with the same number of optimizer steps: plain (``adm``), ADM-IP, ADM-AT full and ADM-AT detach (free AT makes
   K=3 optimizer steps per batch, so its runs take a third of the batches);
3. ES: the factor per model and DDIM variant, the best classifier FID at NFE 10 on held-out seeds against the
   train split;
4. the grid: DDIM (guided-diffusion's: eps re-derived from the clipped x0), DPM-Solver++(2M), IDDPM and ES on that
   DDIM, plus diffusers' default DDIM (x0 clipped, eps kept) and ES on it, at every NFE, 3 sampling seeds,
   classifier FID; the NFE-10 column again with the Inception FID;
5. deployment: fp16 ONNX exports of the plain fine-tune and ADM-AT, ``toolkit eval compare`` torch vs ONNX Runtime;
6. the report: results.json / results.csv, table.md, fid_vs_nfe.png, sample grids.
"""
from __future__ import annotations

import sys
from pathlib import Path

from studies.adm_study import (CLF, ES_OF, ES_SAMPLERS, MODELS, SAMPLERS, cell_path, config_for,
                               es_path, model_dir, ref_path)
from studies.study_runner import Job, module, study_main, toolkit


def this_script(*args) -> list[str]:
    return module("studies.repro_adm", *args)


def train_command(out: Path, name: str, cfg: dict) -> list[str]:
    """The training command of one row; fine-tunes share the optimizer-step budget."""
    if name == "base":
        b = cfg["base"]
        return toolkit("train", "adm", "--data", "fashion-mnist", "--preset", "fmnist", "--out", out / "runs/base",
                       "--max-steps", b["steps"], "--batch-size", b["batch"], "--lr", b["lr"], "--ema-decay", b["ema"],
                       "--seed", 0, "--save-every", cfg["save_every"], "--log-every", 50, "--resume")
    f = cfg["finetune"]
    kind, extra = {"ft": ("adm", []), "ip": ("adm-ip", []),
                   "at": ("adm-at", ["--adv-target-grad", "full", "--adv-steps", cfg["adv_steps"]]),
                   "at-detach": ("adm-at", ["--adv-target-grad", "detach", "--adv-steps", cfg["adv_steps"]])}[name]
    batches = f["opt_steps"] // (cfg["adv_steps"] if kind == "adm-at" else 1)
    return toolkit("train", kind, "--data", "fashion-mnist", "--init", model_dir(out, "base"), "--out",
                   out / "runs" / name, "--max-steps", batches, "--batch-size", f["batch"], "--lr", f["lr"],
                   "--ema-decay", f["ema"], "--no-ema-warmup", "--seed", 1, "--save-every", cfg["save_every"],
                   "--log-every", 10, "--resume", *extra)


def stats_command(out: Path, cfg: dict, split: str, features: str) -> list[str]:
    num = ["--num", cfg["ref_num"]] if cfg["ref_num"] else []
    return toolkit("eval", "stats", f"fashion-mnist:{split}", "--features", features, "--device", "cpu",
                   "--out", ref_path(out, split, features), "--cache", out / "cache" / f"ref-{features}-{split}", *num)


def grid_job(out: Path, cfg: dict, features: str, model: str, seed: int, nfes: tuple[int, ...], quick: bool) -> Job:
    ref = "ref-inception-test" if features == "inception" else "ref-fmnist-classifier-test"
    args = ["_grid", "--out", out, "--model", model, "--features", features, "--seed", seed,
            "--nfes", ",".join(map(str, nfes))] + (["--quick"] if quick else [])
    return Job(f"grid-{features}-{model}-seed{seed}-nfe{'-'.join(map(str, nfes))}", lambda: this_script(*args),
               cell_path(out, features, model, SAMPLERS[-1], seed, nfes[-1]),
               (*(es_name(model, base) for base in ES_OF.values()), ref))


def es_name(model: str, sampler: str) -> str:
    return f"es-{model}" if sampler == "ddim" else f"es-{sampler}-{model}"


def es_job(out: Path, model: str, sampler: str, q: list[str]) -> Job:
    """ES factor of ``model`` under ``sampler`` (each DDIM's feeds an ES column; DPM-Solver's is only reported)."""
    return Job(es_name(model, sampler), lambda: this_script("_es", "--out", out, "--model", model, "--sampler", sampler, *q),
               es_path(out, model, sampler), (f"train-{model}", "ref-fmnist-classifier-train"))


def build_jobs(out: Path, quick: bool) -> list[Job]:
    """Every job, in the order they are started when ready: the first complete table (one seed, every model and
    sampler) comes before the Inception column, the deployment check, the base's NFE 50 and the other seeds."""
    cfg = config_for(quick)
    q = ["--quick"] if quick else []
    fixed = lambda cmd: (lambda: cmd)  # noqa: E731
    jobs = [Job(f"ref-{feat}-{split}", fixed(stats_command(out, cfg, split, feat)), ref_path(out, split, feat))
            for feat, split in (("fmnist-classifier", "test"), ("fmnist-classifier", "train"), ("inception", "test"))]
    for name in MODELS:
        jobs.append(Job(f"train-{name}", fixed(train_command(out, name, cfg)), model_dir(out, name) / "training.json",
                        () if name == "base" else ("train-base",)))
    grid_es = tuple(dict.fromkeys(ES_OF.values()))
    jobs += [es_job(out, name, sampler, q) for sampler in grid_es for name in MODELS]
    first, *others = cfg["seeds"]
    jobs += [grid_job(out, cfg, CLF, name, first, cfg["nfes"], quick) for name in MODELS]
    jobs += [es_job(out, name, sampler, q) for sampler in ES_SAMPLERS if sampler not in grid_es for name in MODELS]
    jobs += [grid_job(out, cfg, "inception", name, first, (cfg["inception"]["nfe"],), quick) for name in MODELS]
    jobs += deployment_jobs(out, cfg)
    # the base's NFE-50 cells at the first seed only: one 10k-sample cell at NFE 50 is ~40 core-minutes on the 2-core
    # box, and they show where the base's curve flattens, not the AT comparison; the longest single job, so it starts
    # before the other seeds' grids and both cores stay busy
    jobs.append(grid_job(out, cfg, CLF, "base", first, cfg["base_nfes"], quick))
    jobs += [grid_job(out, cfg, CLF, name, seed, cfg["nfes"], quick) for seed in others for name in MODELS]
    jobs.append(Job("report", fixed(this_script("_report", "--out", out, *q)), out / "report" / "results.json",
                    tuple(j.name for j in jobs), refresh=True))
    return jobs


def deployment_jobs(out: Path, cfg: dict) -> list[Job]:
    jobs = []
    for name in ("ft", "at"):
        jobs.append(Job(f"export-{name}", lambda n=name: toolkit("export", model_dir(out, n), "--fp16", "--out",
                                                                 out / "exports" / n),
                        out / "exports" / name / "manifest.json", (f"train-{name}",)))
    c = cfg["compare"]
    command = toolkit("eval", "compare", "--model", f"ADM-FT={model_dir(out, 'ft')}", "--model",
                      f"ADM-AT={model_dir(out, 'at')}", "--export", f"ADM-FT={out / 'exports/ft'}", "--export",
                      f"ADM-AT={out / 'exports/at'}", "--backend", "torch", "--backend", "onnxruntime",
                      "--steps", c["nfe"], "--num", c["num"],
                      "--sampler", "ddim", "--ref", ref_path(out, "test", "fmnist-classifier"), "--features",
                      "fmnist-classifier", "--no-clip", "--device", "cpu", "--cache", out / "cache/compare",
                      "--out", out / "compare")
    jobs.append(Job("compare", lambda: command, out / "compare" / "record.json",
                    ("export-ft", "export-at", "ref-fmnist-classifier-test")))
    return jobs


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # internal stages, run by the jobs
        from studies import adm_study_stages
        return adm_study_stages.main(sys.argv[1:])
    return study_main(argv, __doc__.splitlines()[0], build_jobs, config_for)


if __name__ == "__main__":
    sys.exit(main())
