"""Time an exported UNet under ONNX Runtime (CUDA EP with and without CUDA graphs) against torch eager.

    python -m export.bench_ort --out /tmp/bench --size sd --device cuda   # SD-1.5-size LCM UNet, fp16
    python -m export.bench_ort --out /tmp/bench --size tiny --device cpu  # the same plumbing on a CPU

Builds a random-weight model (timing does not depend on weight values), exports its UNet with
``toolkit export``'s code path (contracts, fp16, validation), then times one UNet call per backend the way
the pipeline makes it (numpy arrays: host latents in, host output back; torch arrays: latents stay on the
device) and writes ``bench.json``. Compare with the
anchors in ../shared/bench/README.md measured on the same card.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

# SD-1.5's UNet (diffusers' defaults are SD-1.5's) with LCM's guidance embedding, as LCM-Dreamshaper-v7.
SD_UNET = dict(sample_size=64, cross_attention_dim=768, time_cond_proj_dim=256)


def build_model(root: Path, size: str, seed: int = 0) -> Path:
    import torch
    from diffusers import UNet2DConditionModel
    from train.tiny_models import build_tiny_text_to_image
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
    from export.contracts import ExportContract
    from runtime.backends.ort_backend import OrtRunner, parse_device, providers_for, session_options
    from runtime.backends.ort_binding import make_arrays
    from runtime.export_manifest import read_manifest
    manifest = read_manifest(export_dir)
    entry = manifest.components["unet"]
    kind, device_id = parse_device(device)
    adapter = make_arrays(arrays, kind, device_id)
    bound = adapter if (device_id is not None or arrays == "torch") else None
    runner = OrtRunner(manifest.component_path("unet"), entry["contract"], session_options(),
                       providers_for(kind, device_id, cuda_graph), bound, cuda_graph)
    feed = ExportContract.from_dict(entry["contract"]).sample_inputs("opt", seed=seed)
    inputs = {k: v if k == "timestep" else adapter.from_numpy(v) for k, v in feed.items()}
    output = adapter.to_numpy(runner(inputs)["model_output"])

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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=("sd", "tiny"), default="sd")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and sample inputs")
    args = parser.parse_args(argv)
    from export.exporter import ExportSettings, run_export
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.out, args.size, args.seed)
    latent = SD_UNET["sample_size"] if args.size == "sd" else 16
    start = time.perf_counter()
    result = run_export(ExportSettings(model=str(model), out=args.out / "export", fp16=args.fp16, components=("unet",),
                                       height=latent * 4, width=latent * 4, device=args.device, seed=args.seed),
                        log=print)
    results = {"size": args.size, "device": args.device, "fp16": args.fp16, "latent": latent, "seed": args.seed,
               "iters": args.iters,
               "export_and_validate_s": round(time.perf_counter() - start, 1),
               "validation": result.report.to_dict(), "versions": result.manifest["versions"]}
    plain = time_ort(result.out, args.device, False, args.iters, seed=args.seed)
    torch_run = time_torch(model, args.device, plain["feed"], args.iters)
    results["torch_eager_ms"] = torch_run["ms"]
    results["ort_ms"] = plain["ms"]
    if args.device.startswith("cuda"):
        results["ort_cuda_graph_ms"] = time_ort(result.out, args.device, True, args.iters, seed=args.seed)["ms"]
        # latents kept on the GPU (the pipeline's default on CUDA when torch sees the GPU)
        for graph, key in ((False, "ort_torch_arrays_ms"), (True, "ort_torch_arrays_cuda_graph_ms")):
            results[key] = time_ort(result.out, args.device, graph, args.iters, "torch", args.seed)["ms"]
    ref = torch_run["output"]
    results["ort_rel_l2_vs_torch"] = float(np.linalg.norm(plain["output"] - ref) / np.linalg.norm(ref))
    tmp = args.out / "bench.json.tmp"   # written whole, then renamed: no half-written results
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(args.out / "bench.json")
    print(json.dumps({k: v for k, v in results.items() if k != "validation"}, indent=2))
    return results


if __name__ == "__main__":
    main()
