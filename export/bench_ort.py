"""Time an exported UNet under ONNX Runtime (CUDA EP with and without CUDA graphs) against torch eager.

    toolkit bench ort --out bench/ort-sd --size sd --device cuda      # SD-1.5-size LCM UNet, fp16 (default: auto)
    toolkit bench ort --out /tmp/bench --size tiny --device cpu --no-fp16   # the same plumbing on a CPU

Builds a random-weight model (timing does not depend on weight values), exports its UNet with
``toolkit export``'s code path (contracts, fp16, validation), then times one UNet call per backend the way
the pipeline makes it (numpy arrays: host latents in, host output back; torch arrays: latents stay on the
device) and writes ``bench.json``. Compare with the
anchors in ../shared/bench/README.md measured on the same card.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import typer

from atdiff.runtime.errors import ToolkitError, handles_errors
from atdiff.runtime.staging import write_json

# SD-1.5's UNet (diffusers' defaults are SD-1.5's) with LCM's guidance embedding, as LCM-Dreamshaper-v7.
SD_UNET = dict(sample_size=64, cross_attention_dim=768, time_cond_proj_dim=256)
SIZES = ("sd", "tiny")


def build_model(root: Path, size: str, seed: int = 0) -> Path:
    import torch
    from diffusers import UNet2DConditionModel
    from atdiff.train.core.tiny_models import build_tiny_text_to_image
    model = build_tiny_text_to_image(root / f"{size}-lcm", seed=seed, lcm=True)
    if size == "sd":  # swap in an SD-size UNet; text encoder / VAE stay tiny (only the UNet is exported)
        torch.manual_seed(seed)
        UNet2DConditionModel(**SD_UNET).save_pretrained(model / "unet")
    return model


def median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def time_ort(export_dir: Path, device: str, cuda_graph: bool, iters: int, arrays: str = "numpy",
             seed: int = 0) -> dict:
    """One UNet call as the pipeline makes it: numpy arrays go host -> device -> host every call; torch
    arrays stay on the device (only the timestep is copied in)."""
    from atdiff.runtime.backends.ort_backend import OrtRunner, ort_device
    from atdiff.runtime.backends.ort_binding import make_arrays
    from atdiff.runtime.export_manifest import read_manifest
    manifest = read_manifest(export_dir)
    kind, device_id = ort_device(device)
    adapter = make_arrays(arrays, kind, device_id)
    bound = adapter if (device_id is not None or arrays == "torch") else None
    with OrtRunner.for_component(manifest, "unet", device, arrays=bound, cuda_graph=cuda_graph) as runner:
        feed = runner.contract.sample_inputs("opt", seed=seed)
        inputs = {k: v if k == "timestep" else adapter.from_numpy(v) for k, v in feed.items()}
        output = adapter.to_numpy(runner(inputs)[runner.output])

        def call():
            runner(inputs)
            adapter.synchronize()   # the float32 copy of a torch output is queued asynchronously
        return {"ms": median_ms(call, iters), "output": output, "feed": feed}


def time_torch(model: Path, device: str, feed: dict, iters: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=dtype).to(device).eval()
    # same input values as ORT saw; the UNet runs in its own dtype, the timestep stays float32
    args = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
    args = {k: v.to(dtype) if k != "timestep" else v for k, v in args.items()}

    def call():
        with torch.inference_mode():
            out = unet(**args, return_dict=False)[0].float().cpu()   # host output, as the ORT timing
        return out
    reference = call().numpy()
    return {"ms": median_ms(call, iters), "output": reference}


def run(out: Path, size: str = "sd", device: str = "auto", iters: int = 30, fp16: bool = True, seed: int = 0) -> dict:
    """Export, validate and time; writes ``out/bench.json`` and returns the results. ``device``: auto (CUDA
    when torch and ONNX Runtime can both use a GPU) | cpu | cuda | cuda:N; the device used is printed."""
    from atdiff.export.exporter import ExportSettings, export_device, run_export
    if size not in SIZES:
        raise ToolkitError(f"unknown --size '{size}'; choose one of {', '.join(SIZES)}")
    device = export_device(device)
    print(f"benchmarking on {device} (--device)")
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(out, size, seed)
    latent = SD_UNET["sample_size"] if size == "sd" else 16
    start = time.perf_counter()
    result = run_export(ExportSettings(model=str(model), out=out / "export", fp16=fp16, components=("unet",),
                                       height=latent * 4, width=latent * 4, device=device, seed=seed),
                        log=print)
    results = {"size": size, "device": device, "fp16": fp16, "latent": latent, "seed": seed, "iters": iters,
               "export_and_validate_s": round(time.perf_counter() - start, 1),
               "validation": result.report.to_dict(), "versions": result.manifest["versions"]}
    plain = time_ort(result.out, device, False, iters, seed=seed)
    torch_run = time_torch(model, device, plain["feed"], iters)
    results["torch_eager_ms"] = torch_run["ms"]
    results["ort_ms"] = plain["ms"]
    if device.startswith("cuda"):
        results["ort_cuda_graph_ms"] = time_ort(result.out, device, True, iters, seed=seed)["ms"]
        # latents kept on the GPU (the pipeline's default on CUDA when torch sees the GPU)
        for graph, key in ((False, "ort_torch_arrays_ms"), (True, "ort_torch_arrays_cuda_graph_ms")):
            results[key] = time_ort(result.out, device, graph, iters, "torch", seed)["ms"]
    ref = torch_run["output"]
    results["ort_rel_l2_vs_torch"] = float(np.linalg.norm(plain["output"] - ref) / np.linalg.norm(ref))
    write_json(out / "bench.json", results)
    return results


def command(out: Path = typer.Option(..., help="Directory for the model, its export and bench.json."),
            size: str = typer.Option("sd", help="sd (SD-1.5-size LCM UNet) | tiny (the plumbing, in seconds)."),
            device: str = typer.Option("auto", help="auto (CUDA when torch and ONNX Runtime can both use a GPU, "
                                       "else CPU; printed) | cpu | cuda | cuda:N."),
            iters: int = typer.Option(30, min=1, help="Timed calls per variant (median reported)."),
            fp16: bool = typer.Option(True, help="Export the UNet in fp16 (needs a GPU for torch eager)."),
            seed: int = typer.Option(0, min=0, help="Seed of the random weights and sample inputs.")) -> None:
    """Time an exported UNet: torch eager vs ONNX Runtime (plain, CUDA graphs, device-resident latents)."""
    results = run(out, size, device, iters, fp16, seed)
    print(json.dumps({k: v for k, v in results.items() if k != "validation"}, indent=2))


if __name__ == "__main__":
    typer.run(handles_errors(command))
