"""Rerun the offline text-to-image demo study (docs/results.md, part II), resumably, on a CPU.

    python -m studies.repro_demo --out /work/study/demo             # the real budgets: a few CPU hours
    python -m studies.repro_demo --out /tmp/demo-quick --quick      # every stage with tiny budgets (minutes)
    python -m studies.repro_demo --out DIR --list                   # the jobs and whether each is done

Stages (each a resumable job, run by studies/study_runner.py):
1. data: captioned Fashion-MNIST shards (32x32 RGB, train split) and the class-prompt file (``--quick``: the
   captioned subset the repository ships, models/demo-data, so the quick study needs no dataset installed);
2. the pipeline: ``toolkit train vae`` (32x32 -> 8x8x4), ``toolkit train teacher`` (UNet + CLIP text encoder,
   jointly, caption dropout for CFG);
3. distillation from that teacher with equal optimizer-step budgets and the same seed: ``toolkit train lcm`` and
   ``toolkit train lcm-at`` (free AT makes K optimizer steps per batch, so its run takes 1/K of the batches);
4. evaluation at 1/2/4/8 steps (teacher: its DDIM at 25 steps): prompt adherence, classifier FID (3 seeds; the
   teacher, a reference row, seed 0 only) and the Inception FID (seed 0), then fp16 exports of both students and
   ``toolkit eval compare`` torch vs ONNX Runtime; a small CLIP trained on the same captions (``toolkit train
   clip``: no pretrained CLIP offline) and each model's CLIP score (seed 0); 5. the report (results.json / csv,
   table.md, plots, grids).
"""
from __future__ import annotations

import sys
from pathlib import Path

from studies.demo_study import (CLF, DATASET, MODELS, STUDENTS, adherence_path, clip_path,
                                config_for, fid_path, model_dir, ref_path, reference_images, run_dir, train_shard)
from studies.study_runner import Job, module, study_main, toolkit


def data_job(out: Path, cfg: dict, quick: bool) -> Job:
    """The captioned training shard: ``toolkit train captions`` from the dataset, or the bundled shard split into the
    first ``captions`` training images and the reference images (demo_study_stages.split_bundled_shard)."""
    if cfg["data"] == DATASET:
        num = ["--num", cfg["captions"]] if cfg["captions"] else []
        command = toolkit("train", "captions", "--out", train_shard(out).parent, "--split", "train", *num)
    else:
        command = this_script("_data", "--out", out, *(["--quick"] if quick else []))
    return Job("captions", lambda: command, train_shard(out))


def training_jobs(out: Path, cfg: dict, quick: bool) -> list[Job]:
    data = train_shard(out).parent
    every = ["--save-every", cfg["save_every"], "--resume"]
    v, t = cfg["vae"], cfg["teacher"]
    jobs = [data_job(out, cfg, quick),
            Job("train-vae", lambda: toolkit("train", "vae", "--data", data, "--out", run_dir(out, "vae"),
                                             "--max-steps", v["steps"], "--batch-size", v["batch"], "--lr", v["lr"],
                                             "--seed", 0, *every),
                model_dir(out, "vae") / "training.json", ("captions",)),
            Job("train-teacher", lambda: toolkit("train", "teacher", "--data", data, "--vae", model_dir(out, "vae"),
                                                 "--out", run_dir(out, "teacher"), "--max-steps", t["steps"],
                                                 "--batch-size", t["batch"], "--lr", t["lr"], "--ema-decay", t["ema"],
                                                 "--seed", 0, *every),
                model_dir(out, "teacher") / "training.json", ("train-vae",))]
    return jobs + [Job(f"train-{name}", lambda n=name: distill_command(out, n, cfg),
                       model_dir(out, name) / "training.json", ("train-teacher",)) for name in STUDENTS]


def distill_command(out: Path, name: str, cfg: dict) -> list[str]:
    """LCM and LCM-AT from the same teacher, data and seed, with the same number of optimizer steps."""
    d, a = cfg["distill"], cfg["adv"]
    adv = ["--adv-steps", a["steps"], "--adv-lr", a["lr"], "--adv-max-norm", a["max_norm"]] if name == "lcm-at" else []
    batches = d["opt_steps"] // (a["steps"] if adv else 1)
    return toolkit("train", name, "--teacher", model_dir(out, "teacher"), "--data", out / "data" / "train",
                   "--out", run_dir(out, name), "--max-steps", batches, "--batch-size", d["batch"], "--lr", d["lr"],
                   "--w-min", d["w_min"], "--w-max", d["w_max"], "--ema-decay", d["ema"], "--seed", 1,
                   "--save-every", cfg["save_every"], "--resume", "--log-every", 10, *adv)


def this_script(*args) -> list[str]:
    return module("studies.repro_demo", *args)


def evaluation_jobs(out: Path, cfg: dict, quick: bool) -> list[Job]:
    """Reference statistics (the Fashion-MNIST test split, or the bundled images not trained on); per model classifier
    FID and adherence for each seed, the fp16 exports and the torch-vs-ONNX-Runtime comparison after the first seed;
    the Inception FID (first seed) last."""
    q, num = ["--quick"] if quick else [], ["--num", cfg["ref_num"]] if cfg["ref_num"] else []
    ref_images, ref_deps = (f"{DATASET}:test", ()) if cfg["data"] == DATASET else (reference_images(out), ("captions",))
    jobs = [Job(f"ref-{feat}", lambda f=feat: toolkit("eval", "stats", ref_images, "--features", f, "--device", "cpu",
                                                       "--out", ref_path(out, f), "--cache", out / "cache" / f"ref-{f}",
                                                       *num), ref_path(out, feat), ref_deps)
            for feat in (CLF, "inception")]
    first, *others = cfg["seeds"]
    fid = lambda feat, m, s: Job(f"fid-{feat}-{m}-seed{s}", lambda: this_script(  # noqa: E731
        "_fid", "--out", out, "--model", m, "--features", feat, "--seed", s, *q), fid_path(out, feat, m, s),
        (f"train-{m}", f"ref-{feat}"))
    adherence = lambda m, s: Job(f"adherence-{m}-seed{s}", lambda: this_script(  # noqa: E731
        "_adherence", "--out", out, "--model", m, "--seed", s, *q), adherence_path(out, m, s), (f"train-{m}",))
    # cheapest complete picture first: seed 0 of the fast metrics, the export check, the other seeds, then Inception
    jobs += [job for m in MODELS for job in (fid(CLF, m, first), adherence(m, first))]
    jobs += deployment_jobs(out, cfg)
    # the teacher is the reference row, not the question: its 25-step cells cost ~3x a student's, so it gets the
    # first seed only (the report marks its cells as 1 seed)
    jobs += [job for s in others for m in STUDENTS for job in (fid(CLF, m, s), adherence(m, s))]
    jobs += clip_jobs(out, cfg, first, q)
    return jobs + [fid("inception", m, first) for m in MODELS]


def clip_jobs(out: Path, cfg: dict, seed: int, q: list) -> list[Job]:
    """A small CLIP trained on the same captions (no pretrained CLIP offline), then the CLIP score of each model's
    class-prompt images (the adherence images: per_class per prompt, seeds seed+i)."""
    c, data = cfg["clip"], out / "data" / "train"
    train = Job("train-clip", lambda: toolkit("train", "clip", "--data", data, "--out", run_dir(out, "clip"),
                                              "--max-steps", c["steps"], "--batch-size", c["batch"], "--lr", c["lr"],
                                              "--seed", 1, "--save-every", cfg["save_every"] or 1000, "--resume"),
                model_dir(out, "clip") / "toolkit-clip.json", ("captions",))
    return [train] + [Job(f"clip-{m}-seed{seed}", lambda m=m: this_script("_clip", "--out", out, "--model", m,
                                                                         "--seed", seed, *q),
                          clip_path(out, m, seed), (f"train-{m}", "train-clip")) for m in MODELS]


def deployment_jobs(out: Path, cfg: dict) -> list[Job]:
    """fp16 ONNX exports of both students, and ``toolkit eval compare`` torch vs ONNX Runtime at every step count."""
    jobs = [Job(f"export-{m}", lambda m=m: toolkit("export", model_dir(out, m), "--fp16", "--out", out / "exports" / m),
                out / "exports" / m / "manifest.json", (f"train-{m}",)) for m in STUDENTS]
    prompts = out / "data" / "class-prompts.txt"
    pairs = [(flag, f"{m.upper()}={where}") for m in STUDENTS
             for flag, where in (("--model", model_dir(out, m)), ("--export", out / "exports" / m))]
    command = toolkit("eval", "compare", *[x for pair in pairs for x in pair], "--backend", "torch", "--backend",
                      "onnxruntime", "--steps", ",".join(map(str, cfg["steps"])), "--num", cfg["compare"]["num"],
                      "--prompts", prompts, "--ref", ref_path(out, CLF), "--features", CLF, "--no-clip", "--device",
                      "cpu", "--cache", out / "cache" / "compare", "--out", out / "compare")
    return jobs + [Job("compare", lambda: command, out / "compare" / "record.json",
                       (*(f"export-{m}" for m in STUDENTS), f"ref-{CLF}"))]


def build_jobs(out: Path, quick: bool) -> list[Job]:
    cfg = config_for(quick)
    jobs = training_jobs(out, cfg, quick) + evaluation_jobs(out, cfg, quick)
    return jobs + [Job("report", lambda: this_script("_report", "--out", out, *(["--quick"] if quick else [])),
                       out / "report" / "results.json", tuple(j.name for j in jobs), refresh=True)]


def write_prompts(out: Path) -> None:
    from atdiff.eval.fashion_prompts import class_prompts
    path = out / "data" / "class-prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(class_prompts()) + "\n")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # internal stages, run by the jobs
        from studies import demo_study_stages
        return demo_study_stages.main(sys.argv[1:])

    def jobs(out: Path, quick: bool) -> list[Job]:
        write_prompts(out)
        return build_jobs(out, quick)
    return study_main(argv, __doc__.splitlines()[0], jobs, config_for)


if __name__ == "__main__":
    sys.exit(main())
