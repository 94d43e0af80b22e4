"""``toolkit export triton``: every config.pbtxt parses with Triton's own ModelConfig protobuf and matches its ONNX
file; the ``pipeline`` Python model, run in-process against a stand-in for ``triton_python_backend_utils``
(tests/stubs: BLS requests go to onnxruntime sessions on the repository's ONNX files), gives the images
``toolkit generate`` gives on the export (within runtime/noise.py's BATCHED_PIXEL_TOLERANCE). No Triton server
can be installed here (docs/serving.md)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from PIL import Image
from typer.testing import CliRunner

from conftest import requires_tritonclient
from tolerance import assert_same_seed_images

STUBS = Path(__file__).parent / "stubs"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                  onnx.TensorProto.INT64: "TYPE_INT64"}


def model_config_module():
    """Triton's ModelConfig protobuf as ``toolkit export triton`` loads it (one copy in protobuf's descriptor
    pool); present: the callers are marked requires_tritonclient."""
    from atdiff.export.triton import model_config_pb2
    return model_config_pb2()


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(model_dir: Path, pb):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())


@pytest.fixture(scope="module")
def repo(tiny_lcm_export, tmp_path_factory):
    from atdiff.export.triton import write_repository
    return write_repository(tiny_lcm_export, tmp_path_factory.mktemp("triton") / "repo", kind="cpu", max_batch_size=4)


def onnx_dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


@requires_tritonclient
def test_every_network_config_parses_and_matches_its_onnx_file(repo):
    pb = model_config_module()
    networks = sorted(p for p in repo.iterdir() if (p / "1" / "model.onnx").exists())
    assert [p.name for p in networks] == ["text_encoder", "unet", "vae_decoder"]
    for model_dir in networks:
        config = parse(model_dir, pb)
        graph = onnx.load(model_dir / "1" / "model.onnx").graph
        assert config.name == model_dir.name and config.backend == "onnxruntime"
        assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
        for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [t.name for t in actual]
            for tensor, value_info in zip(declared, actual):
                dims = onnx_dims(value_info)
                if config.max_batch_size:          # Triton adds the batch dimension itself
                    assert dims[0] == -1
                    dims = dims[1:]
                # as Triton's onnxruntime backend checks: a fixed model dim must be the config's; -1 takes any
                assert len(tensor.dims) == len(dims), (model_dir.name, tensor.name)
                assert all(m in (-1, c) for c, m in zip(tensor.dims, dims)), (model_dir.name, tensor.name, dims)
                assert pb.DataType.Name(tensor.data_type) == ONNX_TO_TRITON[value_info.type.tensor_type.elem_type]
    unet, text = parse(repo / "unet", pb), parse(repo / "text_encoder", pb)
    assert unet.max_batch_size == 0 and not unet.HasField("dynamic_batching")   # timestep [1] has no batch dim
    assert text.max_batch_size == 4 and text.HasField("dynamic_batching")


@requires_tritonclient
def test_pipeline_config_parses(repo):
    pb = model_config_module()
    config = parse(repo / "pipeline", pb)
    assert config.backend == "python" and [i.name for i in config.input][:2] == ["PROMPT", "NUM_IMAGES"]
    assert all(i.optional for i in config.input) and [o.name for o in config.output] == ["IMAGES", "SEEDS"]


@requires_tritonclient   # writing the repository needs it too (config.pbtxt is printed from the ModelConfig proto)
def test_pipeline_model_gives_the_images_of_toolkit_generate(repo, tiny_lcm_export, tmp_path, monkeypatch):
    from toolkit import app
    monkeypatch.syspath_prepend(str(STUBS))
    import triton_python_backend_utils as pb_utils   # the stand-in
    pb_utils.reset(repo)
    model = load_file(repo / "pipeline" / "1" / "model.py", "triton_pipeline_model").TritonPythonModel()
    model.initialize({"model_repository": str(repo / "pipeline"), "model_version": "1"})
    prompts = ["astronaut in a jungle", "a red dress"]
    good = pb_utils._Request(PROMPT=np.array([p.encode() for p in prompts], dtype=object),
                             SEED=np.array([3], dtype=np.int64), STEPS=np.array([2], dtype=np.int32))
    bad = pb_utils._Request(STEPS=np.array([2], dtype=np.int32))      # no prompt for a text-to-image model
    answered, refused = model.execute([good, bad])
    model.finalize()
    assert not answered.has_error()
    images = pb_utils.get_output_tensor_by_name(answered, "IMAGES").as_numpy()
    assert pb_utils.get_output_tensor_by_name(answered, "SEEDS").as_numpy().tolist() == [3, 4]
    assert refused.has_error() and "no prompt given" in refused.error().message()

    result = CliRunner().invoke(app, ["generate", *prompts, "--model", str(tiny_lcm_export), "--backend",
                                      "onnxruntime", "--device", "cpu", "--seed", "3", "--steps", "2",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = [np.asarray(Image.open(tmp_path / name).convert("RGB"))
               for name in ("astronaut-in-a-jungle-seed3.png", "a-red-dress-seed4.png")]
    assert_same_seed_images(images, np.stack(written), "Triton vs toolkit generate")


@requires_tritonclient
def test_cli_writes_replaces_its_own_repository_and_refuses_a_foreign_folder(tiny_lcm_export, tmp_path):
    from toolkit import app
    out = tmp_path / "repo"
    for _ in range(2):   # the second run replaces the repository it wrote
        result = CliRunner().invoke(app, ["export", "triton", str(tiny_lcm_export), "--out", str(out), "--kind", "cpu"])
        assert result.exit_code == 0, result.output
    assert (out / "README.md").exists() and (out / "pipeline" / "1" / "export" / "manifest.json").exists()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    result = CliRunner().invoke(app, ["export", "triton", str(tiny_lcm_export), "--out", str(foreign)])
    assert result.exit_code == 2 and "is not an existing Triton repository directory" in result.output
    assert (foreign / "holiday.jpg").read_bytes() == b"not ours"
