"""The sample-fid and compare commands: argument parsing into configs, progress bars, outputs."""
from __future__ import annotations

from pathlib import Path

from atdiff.eval.clip_score import ClipScorer, read_prompts
from atdiff.eval.compare import CellMetrics, CompareConfig, run_compare, validate
from atdiff.eval.compare_report import FORMAT as REPORT_FORMAT, RECORD, write_report
from atdiff.eval.generate import as_tuple, parse_int_list
from atdiff.eval.measure import make_extractor, source_stats
from atdiff.eval.sample_fid import SampleFIDConfig, run_sample_fid
from atdiff.runtime.cli_generate import parse_options, sampler_options
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.model_spec import model_name
from atdiff.runtime.progress import console, progress_bars
from atdiff.runtime.provenance import versions
from atdiff.runtime.staging import check_target, check_writable, write_json


def parse_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """['a=path', 'path2'] -> {'a': 'path', '<name of path2>': 'path2'} (order kept, names unique; a training
    run's runs/NAME/model is called NAME, as everywhere)."""
    pairs = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name, path = (name, path) if sep else (model_name(Path(value)), value)
        if not name or not path:
            raise ToolkitError(f"--{option} '{value}' is not NAME=PATH")
        if name in pairs:
            raise ToolkitError(f"--{option} name '{name}' is given twice; give each a distinct NAME=")
        pairs[name] = path
    return pairs


def per_backend_options(values: list[str] | None) -> dict[str, dict]:
    """['onnxruntime:cuda_graph=true'] -> {'onnxruntime': {'cuda_graph': True}}."""
    options: dict[str, dict] = {}
    for value in values or []:
        backend, sep, pair = value.partition(":")
        if not sep or "=" not in pair:
            raise ToolkitError(f"--backend-option '{value}' is not BACKEND:KEY=VALUE, e.g. onnxruntime:cuda_graph=true")
        options.setdefault(backend, {}).update(parse_options([pair]))
    return options


def _reference(ref: str, extractor, cache, chunk_size):
    with progress_bars() as tracker:
        return source_stats(ref, extractor, cache_dir=None if cache is None else Path(cache) / "ref",
                            chunk_size=chunk_size, progress=tracker("reference features", 0))


def sample_fid_command(*, model, ref, steps, num, sampler, sampler_option, backend, backend_option, dtype, batch_size,
                       prompts, guidance_scale, eps_scale, resize, inception, features, inception_engine, device, cache,
                       chunk_size, seed, out) -> list[dict]:
    if num < 2:
        raise ToolkitError(f"--num must be at least 2 (FID needs a covariance), got {num}")
    if out is not None:
        check_writable(out, parent=True)
    extractor = make_extractor(features, inception=inception, device=device, resize=resize, engine=inception_engine)
    config = SampleFIDConfig(model=model, nfes=tuple(parse_int_list(steps, "steps/--nfe")), num=num, sampler=sampler,
                             backend=backend, device=device, dtype=dtype, seed=seed, batch_size=batch_size,
                             chunk_size=chunk_size, prompts=as_tuple(read_prompts(prompts)) if prompts else None,
                             guidance_scale=guidance_scale, eps_scale=eps_scale,
                             sampler_options=sampler_options(sampler_option) or {}, cache_dir=cache,
                             backend_options=parse_options(backend_option or []))
    ref_stats = _reference(ref, extractor, cache, chunk_size)
    with progress_bars() as tracker:
        rows = run_sample_fid(config, ref_stats, extractor, progress_for=lambda n: tracker(f"nfe {n}", num))
    for row in rows:
        console.print(f"NFE {row['nfe']:>4}: FID {row['fid']:.3f}  ({row['num']} samples, {row['seconds']} s, "
                      f"{row['backend']})")
    if out is not None:
        write_json(out, {"results": rows, "config": {**config.__dict__, "ref": ref}, "extractor": extractor.describe(),
                         "versions": versions("eval")})
    return rows


def compare_command(*, model, export, backend, backend_option, steps, num, ref, prompts, out, baseline, sampler,
                    clip_model, clip_pretrained, no_clip, grid, bootstrap, dtype, batch_size, resize, inception,
                    features, inception_engine, device, cache, chunk_size, seed) -> Path:
    config = CompareConfig(models=parse_pairs(model, "model"), exports=parse_pairs(export, "export"),
                           backends=tuple(dict.fromkeys(backend)), steps=tuple(parse_int_list(steps, "steps")),
                           num=num, prompts=as_tuple(read_prompts(prompts)) if prompts else None, sampler=sampler,
                           seed=seed, batch_size=batch_size, device=device, dtype=dtype, chunk_size=chunk_size,
                           grid_count=grid, bootstrap=bootstrap, baseline=baseline, cache_dir=cache,
                           backend_options=per_backend_options(backend_option))
    validate(config)  # before the slow parts: a missing export or a bad --out fails at once
    check_target(out, RECORD, "eval compare report", REPORT_FORMAT)
    check_writable(out, parent=True)
    if ref is None and (no_clip or not config.prompts):
        raise ToolkitError("nothing to measure: pass --ref for FID" + (" (--no-clip turns CLIP score off)" if no_clip
                                                                      else ", and/or --prompts for CLIP score"))
    extractor = (make_extractor(features, inception=inception, device=device, resize=resize, engine=inception_engine)
                 if ref is not None else None)
    ref_stats = _reference(ref, extractor, cache, chunk_size) if ref is not None else None
    clip = None
    if config.prompts and not no_clip:
        clip = ClipScorer(clip_model, clip_pretrained or None, device=device, seed=seed)
    with progress_bars() as tracker:
        metrics = CellMetrics(extractor, ref_stats, clip, bootstrap=bootstrap, seed=seed)
        rows, grids = run_compare(config, metrics, progress=lambda label, done, total: tracker(label, total)(done),
                                  on_row=lambda r: console.print(_row_line(r)))
    record = {"config": config.record(), "ref": ref, "ref_meta": ref_stats.meta if ref_stats else None,
              "extractor": extractor.describe() if extractor else None,
              "clip": clip.record if clip else None, "versions": versions("eval")}
    path = write_report(out, rows, grids, baseline=config.baseline_name, record=record)
    console.print(f"report: {path / 'report.md'}")
    return path


def _row_line(row: dict) -> str:
    parts = [f"{row['model']} / {row['backend']} / {row['steps']} steps:"]
    if row.get("fid") is not None:
        parts.append(f"FID {row['fid']:.3f} ± {row['fid_std']:.3f}")
    if row.get("clip") is not None:
        parts.append(f"CLIP {row['clip']:.2f} ± {row['clip_std']:.2f}")
    return " ".join(parts) + f" ({row['seconds']} s)"
