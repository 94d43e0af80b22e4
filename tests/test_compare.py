"""The eval CLI end to end on tiny models: stats / fid / clip / sample-fid, and the compare report on two
backends (torch and onnxruntime on exported tiny models). A tiny TorchScript feature network stands in for
the Inception (``--inception`` takes any TorchScript image -> features network) to keep this fast; the
real Inception is tested in test_eval.py."""
from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from atdiff.eval.verdict import build_verdict
from atdiff.runtime.provenance import tree_fingerprint
from tolerance import fid_rounding_bound

runner = CliRunner()
HAS_ORT_EXPORT = all(importlib.util.find_spec(m) is not None
                     for m in ("onnxruntime", "atdiff.export.exporter", "atdiff.runtime.backends.ort_backend"))


def _invoke(*args):
    from toolkit import app
    result = runner.invoke(app, ["eval", *map(str, args)])
    return result


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """A tiny random TorchScript 'feature extractor' (pool to 4x4, linear to 32 features)."""
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 32))
    path = tmp_path_factory.mktemp("featnet") / "features.pt"
    _script(net).save(str(path))
    return path


def _script(module):
    import warnings

    import torch
    with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; --inception takes TorchScript files
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def _tiny_clip_config(path):
    """An open_clip model config small enough to build in milliseconds (random weights: --clip-pretrained '')."""
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16,
                                                                "head_width": 8, "patch_size": 16},
                                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16,
                                             "heads": 2, "layers": 1}}))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def ref_stats(tmp_path_factory, image_folder, feature_net):
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    result = _invoke("stats", image_folder, "--out", out, "--inception", feature_net, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_stats_writes_mu_and_sigma_and_fid_against_itself_is_zero(ref_stats, image_folder, feature_net):
    with np.load(ref_stats) as data:
        assert data["mu"].shape == (32,) and data["sigma"].shape == (32, 32)
    result = _invoke("fid", image_folder, ref_stats, "--inception", feature_net, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with np.load(ref_stats) as data:   # 6 images, 32 features: a singular covariance, sqrtm good to ~sqrt(EPS64)
        bound = fid_rounding_bound(data["mu"], data["sigma"], data["mu"], data["sigma"])
    assert abs(json.loads(result.stdout)["fid"]) <= bound


def test_fid_of_stats_made_with_another_network_is_refused(ref_stats, image_folder, tmp_path):
    import torch
    other = tmp_path / "other.pt"
    _script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(48, 32))).save(str(other))
    result = _invoke("fid", image_folder, ref_stats, "--inception", other, "--device", "cpu")
    assert result.exit_code == 2
    assert "differ in 'weights_sha1'" in result.output


def test_missing_source_is_one_line_with_exit_2(feature_net):
    result = _invoke("fid", "no/such/folder", "fashion-mnist-typo", "--inception", feature_net)
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output


def test_negative_seed_is_refused(image_folder, feature_net):
    # numpy's generators take non-negative seeds: KID's subsets failed with a ValueError traceback
    result = _invoke("fid", image_folder, image_folder, "--kid", "--seed", "-1", "--inception", feature_net)
    assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output


def test_clip_command_reads_prompts_file(image_folder, tmp_path):
    config = _tiny_clip_config(tmp_path / "tiny-clip-cli.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(6)))
    result = _invoke("clip", image_folder, "--prompts", prompts, "--clip-model", config, "--clip-pretrained", "",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num"] == 6 and 0 <= data["clip_score"] <= 100
    prompts.write_text("only one prompt")
    bad = _invoke("clip", image_folder, "--prompts", prompts, "--clip-model", config, "--clip-pretrained", "")
    assert bad.exit_code == 2 and "1 prompts for 6 images" in bad.output


def test_sample_fid_scores_each_nfe_without_writing_images(tiny_uncond_dir, ref_stats, feature_net, tmp_path):
    out = tmp_path / "run" / "sample_fid.json"
    result = _invoke("sample-fid", tiny_uncond_dir, "--ref", ref_stats, "--nfe", "1,2", "--num", "5",
                     "--batch-size", "3", "--chunk-size", "3", "--inception", feature_net, "--device", "cpu",
                     "--cache", tmp_path / "cache", "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [r["nfe"] for r in rows] == [1, 2] and all(np.isfinite(r["fid"]) for r in rows)
    assert {r["model_sha256"] for r in rows} == {tree_fingerprint(tiny_uncond_dir)["sha256"]}  # what was measured
    assert [p.name for p in out.parent.iterdir()] == ["sample_fid.json"]  # no PNGs
    # a rerun resumes from the cache and gives the same numbers
    again = _invoke("sample-fid", tiny_uncond_dir, "--ref", ref_stats, "--nfe", "1,2", "--num", "5",
                    "--batch-size", "3", "--chunk-size", "3", "--inception", feature_net, "--device", "cpu",
                    "--cache", tmp_path / "cache", "--out", out)
    assert again.exit_code == 0, again.output
    assert [r["fid"] for r in json.loads(out.read_text())["results"]] == [r["fid"] for r in rows]


def test_sample_fid_eps_scale_is_the_es_sampler_and_keys_the_cache(tiny_uncond_dir, ref_stats, feature_net, tmp_path):
    common = ("--ref", ref_stats, "--nfe", "2", "--num", "4", "--sampler", "ddim", "--inception", feature_net,
              "--device", "cpu")
    plain = _invoke("sample-fid", tiny_uncond_dir, *common, "--cache", tmp_path / "c1", "--out", tmp_path / "plain.json")
    scaled = _invoke("sample-fid", tiny_uncond_dir, *common, "--eps-scale", "1.5", "--cache", tmp_path / "c2",
                     "--out", tmp_path / "es.json")
    assert plain.exit_code == 0 and scaled.exit_code == 0, plain.output + scaled.output
    fids = [json.loads((tmp_path / f).read_text())["results"][0]["fid"] for f in ("plain.json", "es.json")]
    assert fids[0] != fids[1]
    assert json.loads((tmp_path / "es.json").read_text())["config"]["eps_scale"] == 1.5
    # the plain run's cached features are never reused for an ES run
    mixed = _invoke("sample-fid", tiny_uncond_dir, *common, "--eps-scale", "1.5", "--cache", tmp_path / "c1")
    assert mixed.exit_code == 2 and "was made for" in mixed.output


def test_sample_fid_sampler_options_reach_the_sampler_and_key_the_cache(tiny_uncond_dir, ref_stats, feature_net,
                                                                       tmp_path):
    common = ("--ref", ref_stats, "--nfe", "2", "--num", "4", "--sampler", "ddim", "--inception", feature_net,
              "--device", "cpu")
    plain = _invoke("sample-fid", tiny_uncond_dir, *common, "--cache", tmp_path / "c1", "--out", tmp_path / "plain.json")
    gd = _invoke("sample-fid", tiny_uncond_dir, *common, "--sampler-option", "use_clipped_model_output=true",
                 "--cache", tmp_path / "c2", "--out", tmp_path / "gd.json")
    assert plain.exit_code == 0 and gd.exit_code == 0, plain.output + gd.output
    records = [json.loads((tmp_path / f).read_text()) for f in ("plain.json", "gd.json")]
    # the random tiny UNet's x0 leaves [-1, 1], so re-deriving eps from the clipped x0 changes the samples
    assert records[0]["results"][0]["fid"] != records[1]["results"][0]["fid"]
    assert records[1]["config"]["sampler_options"] == {"use_clipped_model_output": True}
    mixed = _invoke("sample-fid", tiny_uncond_dir, *common, "--sampler-option", "use_clipped_model_output=true",
                    "--cache", tmp_path / "c1")
    assert mixed.exit_code == 2 and "was made for" in mixed.output
    unknown = _invoke("sample-fid", tiny_uncond_dir, *common, "--sampler-option", "warp=9")
    assert unknown.exit_code == 2 and "has no option(s) ['warp']" in unknown.output
    malformed = _invoke("sample-fid", tiny_uncond_dir, *common, "--sampler-option", "warp")
    assert malformed.exit_code == 2 and "--sampler-option 'warp' is not KEY=VALUE" in malformed.output


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 2 samples of 32 features: FID itself is not checked
def test_sample_fid_cache_of_a_retrained_model_is_refused(ref_stats, feature_net, tmp_path):
    # the cache used to be keyed on the model's path alone: features of the old weights were reused
    from atdiff.train.core.tiny_models import build_tiny_unconditional
    model = build_tiny_unconditional(tmp_path / "model", seed=0)
    args = ("sample-fid", model, "--ref", ref_stats, "--steps", "1", "--num", "2", "--inception", feature_net,
            "--device", "cpu", "--cache", tmp_path / "cache")
    assert _invoke(*args).exit_code == 0
    build_tiny_unconditional(tmp_path / "model", seed=1)   # retrained into the same directory
    again = _invoke(*args)
    assert again.exit_code == 2 and "was made for" in again.output


# ---- compare ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models_with_exports(tmp_path_factory):
    if not HAS_ORT_EXPORT:
        pytest.skip("export/ or the onnxruntime backend is not available")
    from atdiff.export.exporter import ExportSettings, run_export
    from atdiff.train.core.tiny_models import build_tiny_unconditional
    root = tmp_path_factory.mktemp("compare-models")
    paths = {}
    for name, seed in (("base", 0), ("at", 1)):
        model = build_tiny_unconditional(root / name, seed=seed)
        run_export(ExportSettings(model=str(model), out=root / f"{name}-onnx", batch_sizes=(1, 4), validate=False),
                   log=lambda message: None)
        paths[name] = (model, root / f"{name}-onnx")
    return paths


def _parse_markdown_table(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_compare_report_on_two_backends_and_its_table_parses(two_models_with_exports, ref_stats, feature_net,
                                                             tmp_path):
    (base, base_onnx), (at, at_onnx) = two_models_with_exports["base"], two_models_with_exports["at"]
    out = tmp_path / "report"
    result = _invoke("compare", "--model", f"base={base}", "--model", f"at={at}", "--export", f"base={base_onnx}",
                     "--export", f"at={at_onnx}", "--backend", "torch", "--backend", "onnxruntime",
                     "--steps", "1,2", "--num", "4", "--batch-size", "4", "--ref", ref_stats,
                     "--inception", feature_net, "--device", "cpu", "--out", out, "--bootstrap", "5", "--grid", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "plot.png", "record.json", "report.md", "results.csv"]
    table = _parse_markdown_table((out / "report.md").read_text())
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model"], r["backend"], r["steps"]) for r in table] == \
        [(m, b, s) for m in ("base", "at") for b in ("torch", "onnxruntime") for s in ("1", "2")]
    for md, row in zip(table, rows):
        assert float(md["fid"]) == pytest.approx(float(row["fid"]), abs=1e-3)   # the table prints .3f (off <= 5e-4)
    hashes = {(r["model"], r["backend"]): r["model_sha256"] for r in rows}
    assert hashes[("base", "torch")] == tree_fingerprint(base)["sha256"]
    assert hashes[("base", "onnxruntime")] == tree_fingerprint(base_onnx)["sha256"]
    fid = {(r["model"], r["backend"], r["steps"]): float(r["fid"]) for r in rows}
    fid_std = {(r["model"], r["backend"], r["steps"]): float(r["fid_std"]) for r in rows}
    for model in ("base", "at"):  # same seeds, same exported weights: ORT matches torch far inside seed noise
        for steps in ("1", "2"):  # (float32 differences move a uint8 pixel only next to a .5: a tenth of it)
            seed_noise = fid_std[(model, "torch", steps)]
            assert fid[(model, "onnxruntime", steps)] == pytest.approx(fid[(model, "torch", steps)], abs=seed_noise / 10)
    assert "every backend within seed noise of torch" in (out / "report.md").read_text()


def test_compare_names_the_missing_export(tiny_uncond_dir, ref_stats, feature_net, tmp_path):
    result = _invoke("compare", "--model", f"base={tiny_uncond_dir}", "--backend", "onnxruntime", "--ref", ref_stats,
                     "--inception", feature_net, "--out", tmp_path / "r", "--num", "4")
    assert result.exit_code == 2
    assert "--export base=EXPORT_DIR" in result.output


def test_training_runs_are_named_after_the_run_and_no_clip_is_explained(tmp_path):
    # `--model runs/a/model --model runs/b/model` used to be refused as the name 'model' given twice
    from atdiff.eval.cli_runs import parse_pairs
    for run in ("a", "b"):
        (tmp_path / run / "model").mkdir(parents=True)
        (tmp_path / run / "model" / "training.json").write_text("{}")
    assert list(parse_pairs([str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")], "model")) == ["a", "b"]
    (tmp_path / "p.txt").write_text("a prompt\n")
    result = _invoke("compare", "--model", f"x={tmp_path / 'a' / 'model'}", "--prompts", tmp_path / "p.txt",
                     "--no-clip", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--no-clip turns CLIP score off" in result.output


def test_compare_never_replaces_a_folder_that_is_not_a_report(tiny_uncond_dir, ref_stats, feature_net, tmp_path):
    out = tmp_path / "my-results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _invoke("compare", "--model", f"base={tiny_uncond_dir}", "--ref", ref_stats, "--inception", feature_net,
                     "--device", "cpu", "--out", out, "--num", "2", "--steps", "1")
    assert result.exit_code == 2 and "not an eval compare report directory" in result.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_feature_cache_of_other_prompts_is_refused(tmp_path):
    from atdiff.eval.features import FeatureCache
    from atdiff.eval.generate import SamplingPlan
    from atdiff.runtime.errors import ToolkitError
    from atdiff.runtime.generation import GenerationOptions
    plan = lambda prompts: SamplingPlan(GenerationOptions(steps=1, prompts=prompts))  # noqa: E731
    FeatureCache(tmp_path, {"plan": plan(("a red cat", "a dog")).record()})
    with pytest.raises(ToolkitError, match="was made for"):  # same number of prompts, other text
        FeatureCache(tmp_path, {"plan": plan(("a red cat", "a cow")).record()})


def _row(model, backend, steps, fid, std=0.1):
    return {"model": model, "backend": backend, "steps": steps, "fid": fid, "fid_std": std, "clip": None,
            "clip_std": None}


def test_verdict_flags_a_backend_that_loses_the_at_advantage():
    rows = [_row("lcm", "torch", 1, 20.0), _row("lcm-at", "torch", 1, 15.0),
            _row("lcm", "onnxruntime", 1, 20.05), _row("lcm-at", "onnxruntime", 1, 21.0)]
    verdict = build_verdict(rows, baseline="lcm")
    assert "advantage lost: lcm-at on onnxruntime (FID)" in verdict["summary"]
    agreement = {(a["model"], a["backend"]): a["within"] for a in verdict["agreement"]}
    assert agreement == {("lcm", "onnxruntime"): True, ("lcm-at", "onnxruntime"): False}


def test_verdict_keeps_an_advantage_reproduced_within_tolerance():
    rows = [_row("lcm", "torch", 1, 20.0), _row("lcm-at", "torch", 1, 15.0),
            _row("lcm", "onnxruntime", 1, 20.1), _row("lcm-at", "onnxruntime", 1, 15.1)]
    summary = build_verdict(rows, baseline="lcm")["summary"]
    assert "every backend within seed noise of torch" in summary
    assert "kept on every backend" in summary


def test_verdict_says_worse_where_the_model_trails_beyond_seed_noise():
    rows = [_row("lcm", "torch", 1, 20.0), _row("lcm-at", "torch", 1, 25.0),     # 5.0 worse, tolerance 0.28
            _row("lcm", "torch", 2, 10.0), _row("lcm-at", "torch", 2, 8.0),      # 2.0 better
            _row("lcm", "torch", 4, 6.0), _row("lcm-at", "torch", 4, 6.1)]       # within
    verdict = build_verdict(rows, baseline="lcm")
    assert verdict["summary"] == ("lcm-at beats lcm on FID on torch at steps 2 and is worse than lcm on FID on torch "
                                  "at steps 1")
    (advantage,) = verdict["advantage"]
    assert advantage["significant_on_reference"] == [2] and advantage["worse_on_reference"] == [1]
    rows = [_row("lcm", "torch", 1, 20.0), _row("lcm-at", "torch", 1, 20.2)]
    assert build_verdict(rows, baseline="lcm")["summary"] == "lcm-at is within seed noise of lcm on FID on torch at this N"


def test_compare_scores_clip_for_text_to_image_models_without_a_fid_reference(tiny_lcm_dir, tmp_path):
    config = _tiny_clip_config(tmp_path / "tiny-clip-compare.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nastronaut in a jungle\n")
    out = tmp_path / "report"
    result = _invoke("compare", "--model", f"lcm={tiny_lcm_dir}", "--steps", "1", "--num", "3", "--prompts", prompts,
                     "--clip-model", config, "--clip-pretrained", "", "--device", "cpu", "--out", out, "--grid", "2")
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["fid"] == "" and 0 <= float(row["clip"]) <= 100 and float(row["clip_std"]) >= 0


def test_backend_options_are_per_backend_and_must_name_a_running_one(tiny_uncond_dir):
    from atdiff.eval.cli_runs import per_backend_options
    from atdiff.eval.compare import CompareConfig, validate
    from atdiff.runtime.errors import ToolkitError
    options = per_backend_options(["onnxruntime:cuda_graph=true",
                                   "onnxruntime:intra_op_threads=4",
                                   "torch:compile=false"])
    assert options == {"onnxruntime": {"cuda_graph": True, "intra_op_threads": 4}, "torch": {"compile": False}}
    config = CompareConfig(models={"a": str(tiny_uncond_dir)}, exports={}, backends=("torch",), steps=(1,), num=4,
                           backend_options={"onnxruntime": {"cuda_graph": True}})
    with pytest.raises(ToolkitError, match="not among --backend"):
        validate(config)
    with pytest.raises(ToolkitError, match="BACKEND:KEY=VALUE"):
        per_backend_options(["cuda_graph=true"])
