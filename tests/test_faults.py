"""Fault injection (issue 12): training and export killed with SIGKILL at named points (runtime/faults.py), in
subprocesses, then checked: what was saved before is intact and readable, a resume / rerun gives exactly what an
uninterrupted run gives, and nothing the killed run left behind stays. Plus one table of bad inputs across the CLI,
each answered by one `error:` line and exit 2. docs/robustness.md reports the counts.

Only the runs that are killed are subprocesses (the kill would take pytest with it); the uninterrupted runs, the
resumes and the reruns go through the same CLI in this process (typer's CliRunner)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from atdiff.runtime import faults

ROOT = Path(__file__).resolve().parent.parent


def killed_toolkit(*args, fault: str) -> subprocess.CompletedProcess:
    """``toolkit ARGS`` in a child that SIGKILLs itself at ``fault``: a real process, since the point of the test is
    what a kill -9 leaves behind (no finally, no atexit, no cleanup), and the kill would end pytest in-process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOOLKIT_FAULT=fault)
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def toolkit(*args) -> Result:
    """``toolkit ARGS`` run to the end in this process, with no fault point armed."""
    from toolkit import app
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(faults.ENV, raising=False)   # read at each fault point: a stray one would kill pytest
        return CliRunner().invoke(app, list(map(str, args)))


def succeeded(result: Result) -> bool:
    return result.exit_code == 0 and result.exception is None


def why(result: Result) -> str:
    return f"{result.exception!r}\n{result.output[-2000:]}"


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    return path


def train_args(toy_npz, out, *extra) -> list:
    return ["train", "adm-at", "--data", toy_npz, "--preset", "tiny", "--out", out, "--max-steps", 4,
            "--batch-size", 4, "--save-every", 1, "--log-every", 1, "--device", "cpu", "--adv-steps", 2, *extra]


@pytest.fixture(scope="module")
def uninterrupted(toy_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    result = toolkit(*train_args(toy_npz, out))
    assert succeeded(result), why(result)
    return out


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(next(model_dir.rglob("*.safetensors"))))


def assert_same_model(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.rglob(".*") if p.name.endswith(".tmp") or p.name in (".lock",))


@pytest.mark.parametrize("fault, survivor", [
    ("train:after-checkpoint@2", "step-2"),      # between steps, after a checkpoint landed
    ("train:checkpoint-staged@3", "step-2"),     # a checkpoint fully written but not yet renamed into place
    ("train:model-staged", "step-4"),            # the final model written but not yet moved into place
])
def test_killed_training_resumes_exactly_and_leaves_nothing(toy_npz, tmp_path, uninterrupted, fault, survivor):
    run = tmp_path / "run"
    assert killed(killed_toolkit(*train_args(toy_npz, run), fault=fault))
    state = json.loads((run / "checkpoints" / survivor / "trainer_state.json").read_text())  # intact, readable
    assert state["step"] == int(survivor.split("-")[1])
    resumed = toolkit(*train_args(toy_npz, run, "--resume"))
    assert succeeded(resumed), why(resumed)
    assert_same_model(run / "model", uninterrupted / "model")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert leftovers(run) == []


@pytest.fixture(scope="module")
def first_export(tiny_uncond_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "exp"
    result = toolkit("export", tiny_uncond_dir, "--out", out, "--no-validate")
    assert succeeded(result), why(result)
    return out


@pytest.mark.parametrize("fault", ["export:network-written", "swap:moved-aside"])
def test_killed_export_keeps_the_previous_export_and_the_rerun_cleans_up(tiny_uncond_dir, first_export, tmp_path,
                                                                         fault):
    import shutil

    from atdiff.runtime.export_manifest import read_manifest
    out = tmp_path / "exp"
    shutil.copytree(first_export, out)
    before = (out / "manifest.json").read_text()
    assert killed(killed_toolkit("export", tiny_uncond_dir, "--out", out, "--no-validate", fault=fault))
    stale = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exp."))
    assert stale  # the kill left a partial or a moved-aside previous export
    if out.exists():   # killed mid-export: the previous export is untouched and loads (hashes checked)
        assert (out / "manifest.json").read_text() == before
        read_manifest(out)
    rerun = toolkit("export", tiny_uncond_dir, "--out", out, "--no-validate")
    assert succeeded(rerun), why(rerun)
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]   # nothing left beside it


# ---- bad input across the CLI: one `error:` line, exit 2 ---------------------------------------------------

BAD_INPUTS = [
    # paths and files
    ("generate x --model {missing}", "does not exist"),
    ("generate x --model {tmp}/not-a-model", "not-a-model has no model_index.json: pass a diffusers pipeline"),
    ("generate x --model {lcm} --out {file}", "is a file"),
    ("generate x --model {lcm} --out /proc/toolkit-test", "cannot write"),
    ("export {missing}", "does not exist"),
    ("export {lcm} --out {file}", "not an export directory"),
    ("train adm --data {missing} --preset tiny --out {tmp}/r", "does not exist"),
    ("train adm --data {file} --preset tiny --out {tmp}/r", "data"),
    ("train teacher --data {missing} --vae {tmp} --out {tmp}/t", "does not exist"),
    ("eval fid {missing} {missing}", "not an image folder"),
    ("eval sample-fid {uncond} --ref {missing}.npz --nfe 1 --num 2 --device cpu", "does not exist"),
    ("eval stats fashion-mnist:validation --out {tmp}/s.npz", "unknown split"),
    # numbers
    ("generate x --model {lcm} --steps 0", "at least 1"),
    ("generate x --model {lcm} --num-images 0", "at least 1"),
    ("generate x --model {lcm} --height 30", "multiple of"),
    ("generate x --model {lcm} --seed -3", "non-negative"),
    ("generate x --model {lcm} --guidance-scale -1", "guidance"),
    ("generate --model {uncond} --eps-scale 0", "positive"),
    ("train adm --data {npz} --preset tiny --out {tmp}/r --batch-size 0", "must be >= 1"),
    ("train adm-at --data {npz} --preset tiny --out {tmp}/r --adv-steps 0", "adv-steps"),
    ("train adm-ip --data {npz} --preset tiny --out {tmp}/r --ip-gamma -1", "ip-gamma"),
    ("eval sample-fid {uncond} --ref {tmp}/r.npz --nfe 0", "positive integers"),
    ("eval sample-fid {uncond} --ref {tmp}/r.npz --num 1", "at least 2"),
    # names and types
    ("generate x --model {lcm} --sampler euler", "unknown sampler"),
    ("generate x --model {lcm} --backend tensorflow", "unknown backend"),
    ("generate x --model {lcm} --device tpu", "device"),
    ("train adm --data {npz} --preset huge --out {tmp}/r", "unknown --preset"),
    ("train adm-at --data {npz} --preset tiny --out {tmp}/r --adv-target-grad half", "adv-target-grad"),
    ("eval stats fashion-mnist --features lenet --out {tmp}/s.npz", "unknown --features"),
    ("eval fid {tmp} {tmp} --inception-engine tensorrt", "unknown Inception engine"),
    # prompts and conditioning
    ("generate --model {lcm}", "no prompt given"),
    ("generate x --model {uncond}", "unconditional"),
    ("generate x --model {lcm} --class-label 3", "class labels"),
]


@pytest.fixture(scope="module")
def paths(tiny_lcm_dir, tiny_uncond_dir, toy_npz, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "afile.txt").write_text("not a directory")
    (tmp / "not-a-model").mkdir()   # a directory, but no model in it
    return dict(tmp=tmp, missing=tmp / "no-such-thing", file=tmp / "afile.txt", lcm=tiny_lcm_dir,
                uncond=tiny_uncond_dir, npz=toy_npz)


@pytest.mark.parametrize("command, message", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(paths, command, message):
    from toolkit import app
    args = command.format(**{k: str(v) for k, v in paths.items()}).split()
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, (args, result.output)
    assert len(errors) == 1 and message in errors[0], (args, result.stderr)
    assert "Traceback" not in result.output + result.stderr
