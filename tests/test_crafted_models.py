"""Crafted configs (docs/robustness.md): diffusers model folders and exports whose config.json, model_index.json,
scheduler_config.json, tokenizer files, toolkit.json or manifest.json miss keys, have wrong types, absurd sizes or
bogus names, or are not JSON at all (truncated, non-UTF-8, nested 100k deep). Each is one ``error:`` line naming the
file (and the key), exit 2 and no traceback, from ``toolkit generate --model``, ``toolkit export`` and ``toolkit
export triton``.

Every command runs under a memory limit, so a size that is not bounded before it is allocated fails the test instead
of taking the machine's memory: one child process runs all of them (torch is imported once), first the unmodified
models (to measure the address space a valid run takes: a CUDA build of torch reserves ~4 GB even on CPU), then sets
RLIMIT_AS to that plus HEADROOM and runs the valid models again, an unchecked allocation (it must fail) and every
crafted case, writing each result as it finishes (a case that kills the child is named by the missing result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import requires_tritonclient
from test_model_dir_escapes import assert_one_error, craft_export, craft_model

HEADROOM = 2 ** 30            # what a crafted case may take beyond a valid run's peak (a blow-up takes gigabytes)
BLOW_UP = 500_000_000         # the crafted num_train_timesteps that passed 4 GB RSS before sizes were bounded
DELETE = object()             # set_json's value meaning: remove the key


class Raw(str):
    """A value written into the JSON text as is (NaN, a 5000-digit integer): json.dumps cannot write those."""


# ---- edits: each returns an edit(model_or_export, outside) writing one crafted file --------------------------------

def set_json(rel: str, **changes):
    """Set (or DELETE) dotted keys of the JSON file ``rel``: set_json("unet/config.json", sample_size="big")."""
    def edit(root: Path, outside: Path | None = None):
        data, raws = json.loads((root / rel).read_text()), {}
        for dotted, value in changes.items():
            *parents, key = dotted.split("__")
            target = data
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target[part]
            if value is DELETE:
                del target[key]
                continue
            if isinstance(value, Raw):
                raws[f"@raw{len(raws)}@"], value = value, f"@raw{len(raws)}@"
            target[int(key) if isinstance(target, list) else key] = value
        text = json.dumps(data, indent=2)
        for marker, raw in raws.items():
            text = text.replace(json.dumps(marker), raw)
        (root / rel).write_text(text)
    return edit


def write_bytes(rel: str, data: bytes | None = None, *, truncate: bool = False):
    def edit(root: Path, outside: Path | None = None):
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if truncate else data)
    return edit


def both(*edits):
    def edit(root: Path, outside: Path | None = None):
        for one in edits:
            one(root, outside)
    return edit


DEEP = b"[" * 100_000
NOT_UTF8 = b'{"sample_size": "\xff\xfe"}'
UNET, SCHED, VAE, TEXT = "unet/config.json", "scheduler/scheduler_config.json", "vae/config.json", \
    "text_encoder/config.json"
TOK_CFG, INDEX, DEFAULTS = "tokenizer/tokenizer_config.json", "model_index.json", "toolkit.json"
RANGE = "expected an integer in"

# (case, base model, edit, commands, what the one error line says). Bases: "lcm" (text-to-image, LCM), "uncond"
# (pixel DDPM); commands: "generate" (toolkit generate --model) and "export" (toolkit export MODEL).
BOTH = ("generate", "export")
MODEL_CASES = [
    ("unet-missing-in_channels", "lcm", set_json(UNET, in_channels=DELETE), BOTH,
     "unet/config.json: 'in_channels' is missing"),
    ("unet-sample_size-string", "lcm", set_json(UNET, sample_size="big"), BOTH, "'sample_size' is 'big'"),
    ("unet-sample_size-true", "lcm", set_json(UNET, sample_size=True), BOTH, "'sample_size' is True"),
    ("unet-sample_size-1e9", "lcm", set_json(UNET, sample_size=1e9), BOTH, "'sample_size' is 1000000000.0"),
    ("unet-sample_size-negative", "lcm", set_json(UNET, sample_size=-16), BOTH, "'sample_size' is -16"),
    ("unet-sample_size-NaN-string", "lcm", set_json(UNET, sample_size="NaN"), BOTH, "'sample_size' is 'NaN'"),
    ("unet-sample_size-5000-digits", "lcm", set_json(UNET, sample_size=Raw("9" * 5000)), BOTH,
     "unet/config.json is not valid JSON (Exceeds the limit"),
    ("unet-sample_size-non-square", "lcm", set_json(UNET, sample_size=[16, 32]), BOTH, "non-square sample_size"),
    ("unet-in_channels-absurd", "lcm", set_json(UNET, in_channels=10 ** 9), BOTH,
     f"'in_channels' is 1000000000; {RANGE}"),
    ("unet-block_out_channels-empty", "lcm", set_json(UNET, block_out_channels=[]), BOTH, "'block_out_channels' is []"),
    ("unet-layers_per_block-absurd", "lcm", set_json(UNET, layers_per_block=10 ** 9), BOTH, "'layers_per_block' is"),
    ("unet-cross_attention_dim-true", "lcm", set_json(UNET, cross_attention_dim=True), BOTH,
     "'cross_attention_dim' is True"),
    ("unet-time_cond_proj_dim-absurd", "lcm", set_json(UNET, time_cond_proj_dim=10 ** 9), BOTH,
     "'time_cond_proj_dim' is 1000000000"),
    ("unet-down_block_types-bogus", "lcm", set_json(UNET, down_block_types=["Bogus", "DownBlock2D"]), BOTH,
     "UNet2DConditionModel could not be built from"),
    ("unet-config-deep", "lcm", write_bytes(UNET, DEEP), BOTH, "unet/config.json is nested deeper"),
    ("unet-config-deep-in-a-key", "lcm", set_json(UNET, extra=Raw("[" * 40 + "]" * 40)), BOTH, "is nested deeper"),
    ("unet-config-non-utf8", "lcm", write_bytes(UNET, NOT_UTF8), BOTH, "unet/config.json is not UTF-8 text"),
    ("unet-config-truncated", "lcm", write_bytes(UNET, truncate=True), BOTH, "unet/config.json is not valid JSON"),
    ("unet-config-a-list", "lcm", write_bytes(UNET, b"[4, 4, 16]"), BOTH, "holds a JSON array, not an object"),
    ("unet-config-17MB", "lcm", write_bytes(UNET, b"{" + b" " * (17 * 2 ** 20) + b"}"), BOTH,
     "more than a config may be"),
    ("scheduler-timesteps-absurd", "lcm", set_json(SCHED, num_train_timesteps=BLOW_UP), BOTH,
     f"'num_train_timesteps' is {BLOW_UP}; {RANGE} 1..100000"),
    ("scheduler-timesteps-string", "lcm", set_json(SCHED, num_train_timesteps="1000"), BOTH,
     "'num_train_timesteps' is '1000'"),
    ("scheduler-beta_start-NaN", "lcm", set_json(SCHED, beta_start=Raw("NaN")), BOTH,
     "scheduler_config.json holds NaN"),
    ("scheduler-beta_schedule-bogus", "lcm", set_json(SCHED, beta_schedule="bogus"), BOTH,
     "'beta_schedule' is 'bogus'; expected one of linear"),
    ("scheduler-trained_betas-strings", "lcm", set_json(SCHED, trained_betas=["NaN", "x"]), BOTH,
     "'trained_betas' is ['NaN', 'x']"),
    ("scheduler-steps_offset-negative", "lcm", set_json(SCHED, steps_offset=-1), BOTH, "'steps_offset' is -1"),
    ("scheduler-config-truncated", "lcm", write_bytes(SCHED, truncate=True), BOTH,
     "scheduler_config.json is not valid JSON"),
    ("vae-missing-latent_channels", "lcm", set_json(VAE, latent_channels=DELETE), BOTH,
     "vae/config.json: 'latent_channels' is missing"),
    ("vae-scaling_factor-string", "lcm", set_json(VAE, scaling_factor="big"), BOTH, "'scaling_factor' is 'big'"),
    ("vae-20-blocks", "lcm", set_json(VAE, block_out_channels=[16] * 20), BOTH, "a list of 1 to 8 integers"),
    ("text-max_position_embeddings-absurd", "lcm",
     both(set_json(TOK_CFG, model_max_length=DELETE), set_json(TEXT, max_position_embeddings=10 ** 9)), BOTH,
     f"text_encoder/config.json: 'max_position_embeddings' is 1000000000; {RANGE} 1..4096"),
    ("text-hidden_size-string", "lcm", set_json(TEXT, hidden_size="32"), BOTH, "'hidden_size' is '32'"),
    ("tokenizer-model_max_length-5000", "lcm", set_json(TOK_CFG, model_max_length=5000), BOTH,
     "tokenizer_config.json: 'model_max_length' is 5000"),
    ("tokenizer-json-truncated", "lcm", write_bytes("tokenizer/tokenizer.json", truncate=True), ("generate",),
     "tokenizer.json cannot be read"),
    ("model_index-deep", "lcm", write_bytes(INDEX, DEEP), BOTH, "model_index.json is nested deeper"),
    ("model_index-a-list", "lcm", write_bytes(INDEX, b'["unet", "scheduler"]'), BOTH,
     "model_index.json holds a JSON array"),
    ("model_index-truncated", "lcm", write_bytes(INDEX, truncate=True), BOTH, "model_index.json is not valid JSON"),
    ("toolkit-json-guidance-NaN-string", "lcm", write_bytes(DEFAULTS, b'{"generation": {"guidance_scale": "NaN"}}'),
     BOTH, "toolkit.json: 'generation.guidance_scale' is 'NaN'"),
    ("toolkit-json-generation-a-number", "lcm", write_bytes(DEFAULTS, b'{"generation": 3}'), BOTH,
     "'generation' is 3; expected a JSON object"),
    ("uncond-missing-out_channels", "uncond", set_json(UNET, out_channels=DELETE), BOTH, "'out_channels' is missing"),
    ("uncond-num_class_embeds-string", "uncond", set_json(UNET, num_class_embeds="ten"), BOTH,
     "'num_class_embeds' is 'ten'"),
    ("uncond-sample_size-5000", "uncond", set_json(UNET, sample_size=5000), BOTH, f"'sample_size' is 5000; {RANGE}"),
]

# Crafted exports: manifest.json edited (keys joined by "__": spec__kind is data["spec"]["kind"]), or rewritten.
MANIFEST = "manifest.json"
UNET_CONTRACT = "components__unet__contract"
EXPORT_CASES = [
    ("spec-kind-bogus", set_json(MANIFEST, spec__kind="bogus"),
     "manifest.json: 'spec.kind' is 'bogus'; expected one of text-to-image, unconditional"),
    ("spec-tokenizer_max_length-absurd", set_json(MANIFEST, spec__tokenizer_max_length=10 ** 9),
     f"'spec.tokenizer_max_length' is 1000000000; {RANGE} 1..4096"),
    ("spec-scheduler-timesteps-absurd", set_json(MANIFEST, spec__scheduler_config__num_train_timesteps=BLOW_UP),
     f"'spec.scheduler_config.num_train_timesteps' is {BLOW_UP}"),
    ("spec-sample_size-string", set_json(MANIFEST, spec__sample_size="big"), "'spec.sample_size' is 'big'"),
    ("spec-missing-unet_in_channels", set_json(MANIFEST, spec__unet_in_channels=DELETE),
     "'spec.unet_in_channels' is missing"),
    ("spec-vae_scale_factor-true", set_json(MANIFEST, spec__vae_scale_factor=True), "'spec.vae_scale_factor' is True"),
    ("spec-a-list", set_json(MANIFEST, spec=[]), "'spec' is a JSON array, not an object"),
    ("spec-beta_start-NaN-string", set_json(MANIFEST, spec__scheduler_config__beta_start="NaN"),
     "'spec.scheduler_config.beta_start' is 'NaN'"),
    ("spec-default-resolution-absurd", set_json(MANIFEST, spec__sample_size=4096, spec__vae_scale_factor=64),
     "default image side"),
    ("contract-batch-absurd", set_json(MANIFEST, **{f"{UNET_CONTRACT}__dims__batch": [1, 1, 10 ** 9]}),
     "'components.unet.contract.dims.batch' is [1, 1, 1000000000]"),
    ("contract-batch-float", set_json(MANIFEST, **{f"{UNET_CONTRACT}__dims__batch": [1, 1, 1e9]}),
     "'components.unet.contract.dims.batch' is [1, 1, 1000000000.0]"),
    ("contract-tensor-2^31-elements", set_json(MANIFEST, **{f"{UNET_CONTRACT}__dims__latent_height": [8192] * 3,
                                                            f"{UNET_CONTRACT}__dims__latent_width": [8192] * 3,
                                                            f"{UNET_CONTRACT}__dims__batch": [1, 1, 8]}),
     "elements at the profile's max"),
    ("contract-shape-unbound-symbol", set_json(MANIFEST, **{f"{UNET_CONTRACT}__inputs__0__shape": ["bogus", 4]}),
     "'components.unet.contract.inputs[0].shape' is ['bogus', 4]"),
    ("contract-missing-dims", set_json(MANIFEST, **{f"{UNET_CONTRACT}__dims": DELETE}),
     "'components.unet.contract.dims' is missing"),
    ("contract-atol-NaN-string", set_json(MANIFEST, **{f"{UNET_CONTRACT}__tolerances__float32__atol": "NaN"}),
     "'components.unet.contract.tolerances.float32.atol' is 'NaN'"),
    ("component-precision-float8", set_json(MANIFEST, components__unet__precision="float8"),
     "'components.unet.precision' is 'float8'"),
    ("precision-float64", set_json(MANIFEST, precision="float64"), "'precision' is 'float64'"),
    ("files-bytes-negative", set_json(MANIFEST, **{"files__unet/model.onnx__bytes": -1}),
     "'files.unet/model.onnx.bytes' is -1"),
    ("files-sha256-true", set_json(MANIFEST, **{"files__unet/model.onnx__sha256": True}),
     "'files.unet/model.onnx.sha256' is True"),
    ("format_version-string", set_json(MANIFEST, format_version="1"), "'format_version' is '1'"),
    ("manifest-NaN", set_json(MANIFEST, spec__vae_scaling_factor=Raw("NaN")), "manifest.json holds NaN"),
    ("manifest-deep", write_bytes(MANIFEST, DEEP), "manifest.json is nested deeper"),
    ("manifest-non-utf8", write_bytes(MANIFEST, b'{"format": "\xc3\x28"}'), "manifest.json is not UTF-8 text"),
    ("manifest-truncated", write_bytes(MANIFEST, truncate=True), "manifest.json is not valid JSON"),
    ("manifest-a-list", write_bytes(MANIFEST, b"[]"), "manifest.json holds a JSON array"),
]


def _export_args(command: str, export: Path, out: Path) -> list[str]:
    if command == "triton":
        return ["export", "triton", str(export), "--out", str(out / "repo"), "--kind", "cpu"]
    return ["generate", "a red dress", "--model", str(export), "--backend", "onnxruntime", "--device", "cpu",
            "--steps", "1", "--out", str(out / "images")]


def _model_args(command: str, model: Path, out: Path, base: str) -> list[str]:
    if command == "export":
        return ["export", str(model), "--out", str(out / "export"), "--no-validate"]
    prompt = ["a red dress"] if base == "lcm" else []
    return ["generate", *prompt, "--model", str(model), "--device", "cpu", "--steps", "1", "--out", str(out / "images")]


def _has_triton() -> bool:
    import importlib.util
    return importlib.util.find_spec("tritonclient") is not None


def _plan(bases: dict[str, Path], export: Path, tmp: Path) -> dict:
    """Every run's CLI arguments: the controls (unmodified models) and each crafted case x command."""
    export_commands = ("generate", "triton") if _has_triton() else ("generate",)
    controls = {f"{base}:{command}": _model_args(command, bases[base], tmp / "controls" / base / command, base)
                for base in bases for command in BOTH}
    controls.update({f"export:{command}": _export_args(command, export, tmp / "controls" / "export" / command)
                     for command in export_commands})
    cases = {}
    for case, base, edit, commands, _ in MODEL_CASES:
        model = craft_model(bases[base], tmp / case, edit)
        cases.update({f"{case}:{command}": _model_args(command, model, tmp / case / command, base)
                      for command in commands})
    for case, edit, _ in EXPORT_CASES:
        crafted, _ = craft_export(export, tmp / case, lambda root, manifest, outside: None)
        edit(crafted)
        cases.update({f"{case}:{command}": _export_args(command, crafted, tmp / case / command)
                      for command in export_commands})
    return {"controls": controls, "cases": cases, "headroom": HEADROOM, "blow_up": BLOW_UP}


@pytest.fixture(scope="module")
def results(tiny_lcm_dir, tiny_uncond_dir, tiny_lcm_export, tmp_path_factory) -> dict:
    """Every run's result, from one child process under the memory limit (module docstring)."""
    tmp = tmp_path_factory.mktemp("crafted")
    plan_file, results_file = tmp / "plan.json", tmp / "results.json"
    plan_file.write_text(json.dumps(_plan({"lcm": tiny_lcm_dir, "uncond": tiny_uncond_dir}, tiny_lcm_export, tmp)))
    tests = Path(__file__).resolve().parent    # the child imports this checkout, as pytest did (not an installed one)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]),
           "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}   # fewer thread arenas to reserve
    child = subprocess.run([sys.executable, __file__, str(plan_file), str(results_file)], capture_output=True,
                           text=True, env=env, timeout=900, cwd=tests)
    found = json.loads(results_file.read_text()) if results_file.exists() else {}
    found["_child"] = {"returncode": child.returncode, "stderr": child.stderr[-3000:]}
    return found


def _result(results: dict, key: str) -> SimpleNamespace:
    if key not in results:
        pytest.fail(f"the child process died before finishing {key}: {results['_child']}")
    return SimpleNamespace(**results[key])


def test_valid_models_run_under_the_memory_limit(results):
    limit = _result(results, "_limit")
    assert limit.bytes > limit.peak >= 2 ** 20, limit
    for key in [k for k in results if k.startswith("limited:")]:
        assert _result(results, key).exit_code == 0, (key, results[key])
    assert len([k for k in results if k.startswith("limited:")]) >= 5


def test_the_memory_limit_stops_an_unchecked_allocation(results):
    """What a crafted num_train_timesteps made before the checks (np.linspace of 5e8 float64) fails under it."""
    assert _result(results, "_blow_up").memory_error is True


MODEL_IDS = [(case, command, message) for case, _, _, commands, message in MODEL_CASES for command in commands]


@pytest.mark.parametrize("case, command, message", MODEL_IDS, ids=[f"{c}:{m}" for c, m, _ in MODEL_IDS])
def test_a_crafted_model_folder_is_one_error_line(results, case, command, message):
    assert_one_error(_result(results, f"{case}:{command}"), message)


@pytest.mark.parametrize("case, message", [(c, m) for c, _, m in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_a_crafted_export_is_one_error_line_from_generate(results, case, message):
    assert_one_error(_result(results, f"{case}:generate"), message)


@requires_tritonclient
@pytest.mark.parametrize("case, message", [(c, m) for c, _, m in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_a_crafted_export_is_one_error_line_from_export_triton(results, case, message):
    assert_one_error(_result(results, f"{case}:triton"), message)


# ---- the child process --------------------------------------------------------------------------------------------

def _vm_peak() -> int:
    """This process's peak address space in bytes (/proc/self/status VmPeak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmPeak in /proc/self/status")


def _child(plan_file: str, results_file: str) -> None:
    import resource

    import numpy as np
    from test_model_dir_escapes import run_cli
    plan, found = json.loads(Path(plan_file).read_text()), {}

    def record(key: str, value: dict) -> None:
        found[key] = value
        Path(results_file).write_text(json.dumps(found))

    def run(key: str, args: list[str]) -> None:
        result = run_cli(*args)
        record(key, {"exit_code": result.exit_code, "stderr": result.stderr, "output": result.output,
                     "exception": None if result.exception is None else repr(result.exception)[:500]})

    for key, args in plan["controls"].items():   # unlimited: how much address space a valid run takes here
        run(f"control:{key}", args)
    peak = _vm_peak()
    limit = peak + plan["headroom"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    record("_limit", {"peak": peak, "bytes": limit})
    for key, args in plan["controls"].items():
        run(f"limited:{key}", [a.replace("/controls/", "/controls-limited/") for a in args])
    try:
        np.linspace(0.0, 1.0, plan["blow_up"])
        record("_blow_up", {"memory_error": False})
    except MemoryError:
        record("_blow_up", {"memory_error": True})
    for key, args in plan["cases"].items():
        run(key, args)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
