"""runtime/devices.py: the one --device parser (auto | cpu | cuda | cuda:N), what 'auto' resolves to per backend,
the error for a CUDA that cannot be reached, and every command's --device defaulting to auto."""
from __future__ import annotations

import subprocess
import sys

import click
import onnxruntime as ort
import pytest
import torch
import typer
from typer.testing import CliRunner

from atdiff.runtime.devices import DeviceError, DeviceSupport, gpu_index, parse_device, resolve_device

REFUSED = ["gpu", "GPU", "CUDA", "Cuda:0", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "cuda0", "cpu:0", "auto:0",
           " cpu", "cpu ", "", "mps", "tpu", "cuda,cpu"]
NO_GPU = DeviceSupport("fakebackend", cuda=False, missing="fakebackend 1.0 sees no CUDA GPU",
                       fix="install fakebackend-gpu")
TWO_GPUS = DeviceSupport("fakebackend", cuda=True, gpu_count=2)


@pytest.mark.parametrize("device, parsed", [("auto", ("auto", None)), ("cpu", ("cpu", None)),
                                            ("cuda", ("cuda", None)), ("cuda:0", ("cuda", 0)),
                                            ("cuda:12", ("cuda", 12))])
def test_accepted_forms(device, parsed):
    assert parse_device(device) == parsed


@pytest.mark.parametrize("device", REFUSED)
def test_refused_forms_name_the_value_and_the_accepted_forms(device):
    with pytest.raises(DeviceError) as caught:
        parse_device(device)
    assert str(caught.value) == f"unknown device '{device}'; use auto, cpu, cuda or cuda:N (N: a GPU index, e.g. cuda:0)"


def test_a_malformed_device_is_refused_before_anything_is_probed():
    def probe():
        raise AssertionError("probed")
    for device in REFUSED:
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(device, probe)
    assert resolve_device("cpu", probe) == "cpu"   # nor for the CPU, which is always there


def test_auto_is_cuda_exactly_when_the_backend_can_use_it():
    assert resolve_device("auto", lambda: TWO_GPUS) == "cuda"
    assert resolve_device("auto", lambda: NO_GPU) == "cpu"
    assert resolve_device("cuda", lambda: TWO_GPUS) == "cuda"
    assert resolve_device("cuda:1", lambda: TWO_GPUS) == "cuda:1"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_asked_for_cuda_without_one_is_an_error_with_the_fix(device):
    with pytest.raises(DeviceError) as caught:
        resolve_device(device, lambda: NO_GPU)   # never a silent CPU run
    message = str(caught.value)
    assert message.startswith(f"device '{device}' asked for, but fakebackend 1.0 sees no CUDA GPU; ")
    assert "install fakebackend-gpu" in message and "--device cpu" in message


def test_a_gpu_index_beyond_the_count_is_an_error():
    with pytest.raises(DeviceError, match=r"sees 2 GPU\(s\); use cuda:0 to cuda:1"):
        resolve_device("cuda:2", lambda: TWO_GPUS)


def test_work_on_two_backends_needs_cuda_on_both():
    other = DeviceSupport("other", cuda=False, missing="other has no CUDA provider", fix="install other-gpu")
    assert resolve_device("auto", lambda: TWO_GPUS.both(other)) == "cpu"
    assert resolve_device("auto", lambda: TWO_GPUS.both(TWO_GPUS)) == "cuda"
    with pytest.raises(DeviceError, match="other has no CUDA provider; install other-gpu"):
        resolve_device("cuda", lambda: TWO_GPUS.both(other))
    with pytest.raises(DeviceError, match="sees no CUDA GPU and other has no CUDA provider; "
                                          "install fakebackend-gpu and install other-gpu"):
        resolve_device("cuda", lambda: NO_GPU.both(other))


def test_gpu_index():
    assert (gpu_index("cpu"), gpu_index("cuda"), gpu_index("cuda:3")) == (None, 0, 3)
    with pytest.raises(DeviceError, match="resolve"):
        gpu_index("auto")


def test_each_backend_resolves_auto_by_what_it_can_reach():
    from atdiff.export.exporter import export_device
    from atdiff.runtime.backends.ort_backend import CUDA_EP, OrtBackend
    from atdiff.runtime.backends.torch_backend import TorchBackend
    torch_cuda, ort_cuda = torch.cuda.is_available(), CUDA_EP in ort.get_available_providers()
    assert TorchBackend.resolve_device("auto") == ("cuda" if torch_cuda else "cpu")
    assert OrtBackend.resolve_device("auto") == ("cuda" if ort_cuda else "cpu")
    assert export_device("auto") == ("cuda" if torch_cuda and ort_cuda else "cpu")
    assert export_device("auto", validate=False) == ("cuda" if torch_cuda else "cpu")
    for backend in (TorchBackend, OrtBackend):
        with pytest.raises(DeviceError, match="unknown device 'gpu'"):
            backend.resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when torch sees no GPU")
def test_torch_cuda_without_a_gpu_names_the_fix():
    from atdiff.runtime.backends.torch_backend import TorchBackend
    with pytest.raises(DeviceError, match="torch .* sees no CUDA GPU; install a CUDA build of torch"):
        TorchBackend.resolve_device("cuda:0")


def test_importing_the_parser_imports_neither_torch_nor_onnxruntime():
    code = ("import sys, atdiff.runtime, atdiff.runtime.devices, atdiff.runtime.backends.base\n"
            "heavy = sorted({'torch', 'onnxruntime'} & set(sys.modules))\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _device_defaults() -> dict[str, object]:
    from toolkit import app
    root = typer.main.get_command(app)
    found = {}

    def walk(command, path, ctx):
        if hasattr(command, "list_commands"):   # a group
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                walk(sub, [*path, name], click.Context(sub, parent=ctx))
        for param in command.params:
            if param.name == "device":
                found[" ".join(path)] = param.default
    walk(root, [], click.Context(root))
    return found


def test_every_command_with_a_device_defaults_to_auto():
    defaults = _device_defaults()
    expected = {"generate", "serve", "export run", "export validate", "eval fid", "eval stats", "eval clip",
                "eval sample-fid", "eval compare", "eval adherence", "eval exposure-bias", "bench ort", "bench serve",
                "bench adm-at"}
    assert expected <= set(defaults)
    assert {name: default for name, default in defaults.items() if default != "auto"} == {}


def test_generate_without_device_runs_on_auto_and_says_where(tiny_uncond_dir, tmp_path):
    from toolkit import app
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_uncond_dir), "--nfe", "1", "--dtype", "float32",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"on torch {torch.__version__} on {expected} (float32" in " ".join(result.output.split())  # rich wraps


def test_generate_with_a_bad_device_is_one_clear_error(tiny_uncond_dir, tmp_path):
    from toolkit import app
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_uncond_dir), "--device", "gpu",
                                      "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown device 'gpu'; use auto, cpu, cuda or cuda:N" in " ".join(result.output.split())
    assert not list(tmp_path.iterdir())
