"""``toolkit eval exposure-bias``: load a pixel diffusion model and its reference data, run the meter
(eval/exposure_bias.py), print the per-step table and write ``exposure_bias.json`` + ``exposure_bias.png``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from atdiff.eval.exposure_bias import MeterConfig, measure
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.model_spec import model_name
from atdiff.runtime.progress import console, progress_bars
from atdiff.runtime.provenance import versions
from atdiff.runtime.staging import check_target, check_writable, staged_directory, write_json

RESULT = "exposure_bias.json"   # also what marks --out as this command's: only such a directory is replaced
PLOT = "exposure_bias.png"
DATASETS = ("fashion-mnist", "mnist")   # the offline datasets eval/sources.py reads, with their :train/:test splits


def exposure_bias_command(*, model: str, sampler: str, steps: int, num: int, data: str, batch_size: int | None,
                          device: str, seed: int, out: Path | None) -> Path:
    from atdiff.eval.measure import model_identity
    from atdiff.runtime.pipeline import Pipeline

    config = MeterConfig(sampler=sampler, nfe=steps, num=num, seed=seed, batch_size=batch_size)
    config.check()
    out = Path(out) if out is not None else default_out(model, sampler, steps)
    check_target(out, RESULT, "exposure-bias")   # a foreign --out or an unwritable place fails before the slow part
    check_writable(out, parent=True)
    with Pipeline.load(model, backend="torch", device=device, dtype="float32") as pipe:
        spec = pipe.spec
        if spec.is_latent:
            raise ToolkitError(f"model '{spec.name}' is text-to-image (latent); the exposure-bias meter supports "
                               "pixel models (toolkit train adm / adm-at / adm-ip) only so far: its reference "
                               "E||x0||^2 would need the data's VAE latents")
        dataset = reference_dataset(data, spec)
        x0, labels = data_subset(dataset, num, seed, class_cond=bool(spec.num_class_embeds))
        with pipe.backend.session(), progress_bars() as tracker:
            result = measure(bind_denoiser(pipe), pipe.schedule, x0, config, data_labels=labels,
                             num_classes=spec.num_class_embeds, arrays=pipe.backend,
                             progress=tracker("exposure-bias (network calls)", None))
        record = {"command": "toolkit eval exposure-bias",
                  "config": {**dataclasses.asdict(config), "model": model, "data": data, "device": device,
                             "out": str(out)},
                  "model": model_identity(pipe), "backend": pipe.backend.describe(),
                  "scheduler_config": spec.scheduler_config, "data": dataset.info.to_json(),
                  "versions": versions("eval"), "summary": summary(result["rows"]), **result}
    with staged_directory(out, RESULT, "exposure-bias") as staging:   # both files appear together, or neither
        write_json(staging / RESULT, record)
        plot(record, staging / PLOT)
    print_table(result["rows"])
    console.print(f"wrote {out / RESULT} and {out / PLOT}")
    return out


def default_out(model: str, sampler: str, nfe: int) -> Path:
    path = Path(model)
    name = model_name(path) if path.is_dir() else model.rstrip("/").split("/")[-1]
    return Path("exposure-bias") / f"{name}-{sampler}-nfe{nfe}"


def reference_dataset(data: str, spec):
    """``--data`` read and preprocessed exactly as ``toolkit train adm`` does (train/core/image_data.py), at the
    model's resolution: a dataset name with an optional :train/:test split, or anything ``--data`` of training
    takes (image folder, .npy/.npz, IDX file, CIFAR-10 batches)."""
    from atdiff.eval.sources import dataset_labels, dataset_source
    from atdiff.train.core.image_data import ArrayDataset, load_image_dataset
    class_cond, resolution = bool(spec.num_class_embeds), spec.default_resolution
    name, _, split = data.partition(":")
    if name in DATASETS:
        images = dataset_source(name, split or "train").images
        labels = dataset_labels(name, split or "train")
        dataset = ArrayDataset(images[..., None] if images.ndim == 3 else images, labels,
                               dict(source=f"{name}:{split or 'train'}", kind=name), resolution, class_cond)
    else:
        dataset = load_image_dataset(data, resolution, class_cond)
    if dataset.info.channels != spec.unet_in_channels:
        raise ToolkitError(f"--data {data} has {dataset.info.channels}-channel images and model '{spec.name}' takes "
                           f"{spec.unet_in_channels}; pass the kind of data it was trained on")
    return dataset


def data_subset(dataset, num: int, seed: int, class_cond: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``num`` images (all if fewer) drawn without replacement with ``seed``: float32 [N, C, H, W] in [-1, 1], and
    their labels for a class-conditional model."""
    count = len(dataset)
    index = np.sort(np.random.default_rng(seed).choice(count, size=min(num, count), replace=False))
    x0 = np.stack([dataset[int(i)]["x"].numpy() for i in index]).astype(np.float32)
    return x0, (np.asarray(dataset.labels)[index].astype(np.int64) if class_cond else None)


def bind_denoiser(pipe):
    """labels -> model(x, t): the pipeline's own conditioning (class labels for class-conditional models)."""
    from atdiff.runtime.conditioning import Conditioning
    backend = pipe.backend

    def bind(labels):
        labels = None if labels is None else backend.from_numpy(np.asarray(labels, dtype=np.int64))
        return Conditioning(class_labels=labels).model_fn(backend, pipe.schedule)
    return bind


def summary(rows: list[dict]) -> dict:
    """The step where the sampler's ||x_t||^2/d is furthest from q's."""
    worst = max(rows, key=lambda r: abs(r["sq_norm_diff"]))
    return {"max_abs_sq_norm_diff": abs(worst["sq_norm_diff"]), "at_step": worst["step"], "at_t": worst["t"],
            "sq_norm_ratio_there": worst["sq_norm_ratio"]}


def print_table(rows: list[dict]) -> None:
    print(f"{'step':>4} {'t':>4} {'abar':>8} {'|x_t|^2/d':>10} {'q':>8} {'ratio':>7} {'diff':>9}  "
          f"{'eps consist.':>12} {'q eps err':>10}")
    for r in rows:
        print(f"{r['step']:>4} {r['t']:>4} {r['alpha_bar']:>8.5f} {r['sampler_sq_norm']:>10.5f} {r['q_sq_norm']:>8.5f} "
              f"{r['sq_norm_ratio']:>7.4f} {r['sq_norm_diff']:>+9.5f}  {r['sampler_eps_consistency']:>12.5f} "
              f"{r['q_eps_error']:>10.5f}")


def plot(record: dict, path: Path) -> None:
    """Left: the sampler's E||x_t||^2/d over q's (1 = no mismatch; bars: 2 standard errors). Right: the network's
    eps error on q-noised data and its eps consistency on the sampler's trajectory. Sampling runs left to right."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    rows = record["rows"]
    t = [r["t"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.errorbar(t, [r["sq_norm_ratio"] for r in rows], marker="o", capsize=3, label="sampler / q",
                  yerr=[2 * r["sq_norm_diff_sem"] / r["q_sq_norm"] for r in rows])
    left.axhline(1.0, color="gray", linestyle="--", label="no mismatch")
    left.set_ylabel("E||x_t||^2/d: sampler over q(x_t)")
    for key, label in (("q_eps_error", "q side: ||eps_theta(q x_t) - eps||^2/d"),
                       ("sampler_eps_consistency", "sampler side: eps consistency")):
        right.errorbar(t, [r[key] for r in rows], yerr=[2 * r[f"{key}_sem"] for r in rows], marker="o", capsize=3,
                       label=label)
    right.set_yscale("log")
    right.set_ylabel("eps error per dimension")
    for ax in (left, right):
        ax.set_xlabel("timestep t (sampling goes left to right)")
        ax.set_xlim(max(t) + 0.5 + 0.03 * max(t), min(t) - 0.5 - 0.03 * max(t))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = record["config"]
    fig.suptitle(f"exposure bias: {record['model']['name']}, {cfg['sampler']} at {cfg['nfe']} NFE, "
                 f"{cfg['num']} samples, seed {cfg['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
