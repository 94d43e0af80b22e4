"""``toolkit export triton EXPORT_DIR --out REPO``: a Triton Inference Server model repository from an export.

One model per network (ONNX Runtime backend, the export's own ``model.onnx``), each ``config.pbtxt`` generated
from the export contract (names, dtypes, dims with -1 for dynamic axes, batching, instance group), plus the
``pipeline`` Python-backend model: the runtime's own sampling loop calling the networks through BLS
(runtime/triton_model.py). Written to a staging directory and moved into place whole; an existing --out is
replaced only when the marker says this command wrote it and lists every file there (runtime/staging.py).

Every config.pbtxt is Triton's ModelConfig message (tritonclient's generated module) printed by protobuf, so names
are escaped by protobuf itself; the manifest's component and tensor names are plain names anyway
(runtime/export_manifest.py), and every path written is checked to resolve inside the repository.

The UNet's contract has a timestep of shape [1] shared by the batch, so Triton cannot batch UNet requests itself
(every input would need the batch dimension first): the UNet gets ``max_batch_size: 0`` and full shapes, and the
networks whose every tensor is batched (text encoder, VAE decoder) get ``max_batch_size`` and dynamic batching.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

from atdiff.runtime.contracts import ExportContract
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.export_manifest import folder_files, read_manifest, verify_files
from atdiff.runtime.model_source import MANIFEST, TOKENIZER
from atdiff.runtime.model_spec import ModelFormatError
from atdiff.runtime.staging import staged_directory
from atdiff.runtime.tokenizer import vocabulary_file
from atdiff.runtime.triton_model import EXPORT_SUBDIR, NETWORK_MODELS_FILE

MARKER = "triton-repository.json"   # marks a repository this command wrote (so --out replaces only those)
FORMAT = "at-diffusion-toolkit/triton-repository"   # the marker's "format": a foreign file of that name is no marker
PIPELINE = "pipeline"
README = "README.md"
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
_MODEL_PY = ('"""Triton Python-backend entry point: the toolkit runtime\'s pipeline (runtime/triton_model.py)."""\n'
             "from atdiff.runtime.triton_model import TritonPythonModel  # noqa: F401\n")


def write_repository(export_dir: str | Path, out: str | Path, *, kind: str = "gpu", max_batch_size: int = 8) -> Path:
    """Write the repository for ``export_dir`` at ``out``; returns ``out``."""
    if kind not in KINDS:
        raise ToolkitError(f"--kind {kind}: choose gpu or cpu (where Triton runs the network models)")
    if max_batch_size < 1:
        raise ToolkitError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    manifest = read_manifest(export_dir)   # component and tensor names are plain names (no '/', '..', quotes)
    verify_files(manifest)   # never package a changed or half-copied export
    for component in manifest.components:
        if component in (PIPELINE, README, MARKER):
            raise ModelFormatError(f"export {manifest.root} has a component named '{component}', which the Triton "
                                   "repository needs for itself; re-run 'toolkit export'")
    tokenizer = folder_files(manifest, TOKENIZER)   # listed (so just verified) files only, never links out
    if manifest.spec.is_latent:
        vocabulary_file(manifest.root / TOKENIZER)   # the pipeline model would map every prompt to the same ids
    model_config_pb2()   # a missing tritonclient fails before anything is written
    out = Path(out)
    with staged_directory(out, MARKER, "existing Triton repository", FORMAT) as staging:
        names = {}
        for component in manifest.components:
            names[component] = component
            for rel in network_files(manifest, component):   # model.onnx [+ model.onnx.data]
                _copy(manifest.file(rel), _inside(staging, component, "1", rel.rsplit("/", 1)[1]))
            config = network_config(component, manifest.contract(component), kind=KINDS[kind],
                                    max_batch_size=max_batch_size)
            _inside(staging, component, "config.pbtxt").write_text(config)
        _write_pipeline(staging / PIPELINE, manifest, names, tokenizer)
        (staging / README).write_text(repository_readme(manifest.spec.is_latent))
        written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        (staging / MARKER).write_text(json.dumps({"format": FORMAT, "export": str(Path(export_dir).resolve()),
                                                  "kind": kind, "max_batch_size": max_batch_size,
                                                  "models": [*names, PIPELINE], "files": written}, indent=2))
    return out


def _inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, refused unless it resolves inside ``root`` (names were checked; this is the last word)."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ModelFormatError(f"{'/'.join(parts)} would be written outside the repository; re-run 'toolkit export'")
    return path


def network_files(manifest, component: str) -> list[str]:
    """The listed files of one network: its model.onnx and, for networks saved with ONNX external data, the
    model.onnx.data beside it (model.onnx names it by that relative location, so they travel together)."""
    onnx_file = manifest.data["components"][component]["file"]
    return [onnx_file, *(rel for rel in (onnx_file + ".data",) if rel in manifest.data["files"])]


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def _write_pipeline(root: Path, manifest, names: dict, tokenizer: list[str]) -> None:
    version = root / "1"
    (version / EXPORT_SUBDIR).mkdir(parents=True)
    shutil.copy2(manifest.root / MANIFEST, version / EXPORT_SUBDIR / MANIFEST)
    for rel in tokenizer:
        _copy(manifest.file(rel), _inside(version / EXPORT_SUBDIR, *rel.split("/")))
    (version / NETWORK_MODELS_FILE).write_text(json.dumps(names, indent=2))
    (version / "model.py").write_text(_MODEL_PY)
    (root / "config.pbtxt").write_text(pipeline_config())


@functools.cache
def model_config_pb2():
    """Triton's own ModelConfig protobuf module, from tritonclient (pyproject's [triton] extra): configs are built
    as messages and printed by protobuf, so a name can never inject config text and every field is Triton's.
    Loaded by file: importing tritonclient.grpc would import grpcio, which only its network client needs."""
    install = "pip install 'at-diffusion-toolkit[triton]'"
    found = importlib.util.find_spec("tritonclient")
    if found is None:
        raise ToolkitError(f"toolkit export triton writes config.pbtxt with Triton's ModelConfig protobuf from "
                           f"tritonclient, which is not installed: {install}")
    path = Path(found.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    try:
        from google.protobuf import runtime_version   # protobuf >= 5.26; the generated module checks its version
    except ImportError as exc:
        raise ToolkitError(f"Triton's ModelConfig protobuf needs a recent protobuf ({exc}); {install}") from None
    try:
        spec = importlib.util.spec_from_file_location("model_config_pb2", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError, runtime_version.VersionError) as exc:
        raise ToolkitError(f"cannot load Triton's ModelConfig protobuf {path} ({exc}); {install}") from None
    return module


def _text(config, comment: str = "") -> str:
    from google.protobuf import text_format
    return comment + text_format.MessageToString(config)


def network_config(name: str, contract: ExportContract, *, kind: str, max_batch_size: int) -> str:
    """config.pbtxt of one network: Triton batches it only when every tensor has the batch dimension first."""
    pb = model_config_pb2()
    tensors = contract.inputs + contract.outputs
    batched = all(t.shape and t.shape[0] == "batch" for t in tensors)
    config = pb.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size if batched else 0)
    for entries, declared in ((config.input, contract.inputs), (config.output, contract.outputs)):
        for tensor in declared:
            if tensor.dtype not in _TYPES:
                raise ModelFormatError(f"{name} tensor {tensor.name} has dtype {tensor.dtype!r}, which this command "
                                       f"does not map to Triton ({', '.join(_TYPES)}); re-run 'toolkit export'")
            dims = [d if isinstance(d, int) else -1 for d in (tensor.shape[1:] if batched else tensor.shape)]
            entries.add(name=tensor.name, data_type=pb.DataType.Value(_TYPES[tensor.dtype]), dims=dims)
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=1)
    if batched:
        config.dynamic_batching.SetInParent()
    return _text(config)


def pipeline_config() -> str:
    """config.pbtxt of the Python-backend pipeline (inputs/outputs: runtime/triton_model.py)."""
    pb = model_config_pb2()
    config = pb.ModelConfig(name=PIPELINE, backend="python", max_batch_size=0)
    for name, data_type, dims in (("PROMPT", "TYPE_STRING", [-1]), ("NUM_IMAGES", "TYPE_INT32", [1]),
                                  ("SEED", "TYPE_INT64", [1]), ("STEPS", "TYPE_INT32", [1]),
                                  ("GUIDANCE_SCALE", "TYPE_FP32", [1])):
        config.input.add(name=name, data_type=pb.DataType.Value(data_type), dims=dims, optional=True)
    config.output.add(name="IMAGES", data_type=pb.TYPE_UINT8, dims=[-1, -1, -1, 3])
    config.output.add(name="SEEDS", data_type=pb.TYPE_INT64, dims=[-1])
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)
    return _text(config, "# the sampling loop runs on the CPU; the network models it calls run where their "
                         "instance_group says\n")


def repository_readme(text_to_image: bool) -> str:
    ask = ('prompt = httpclient.InferInput("PROMPT", [1], "BYTES")\n'
           'prompt.set_data_from_numpy(np.array([b"a photo of a sneaker"], dtype=object))\n' if text_to_image else
           'prompt = httpclient.InferInput("NUM_IMAGES", [1], "INT32")\n'
           'prompt.set_data_from_numpy(np.array([4], dtype=np.int32))\n')
    return f"""# Triton model repository (written by `toolkit export triton`)

Models: one per exported network (ONNX Runtime backend) and `pipeline` (Python backend: the toolkit runtime's
sampling loop, calling the networks through BLS; its images equal `toolkit generate`'s for the same seed).

```bash
# Triton's Python environment needs the toolkit's core install (no torch): pip install at-diffusion-toolkit
tritonserver --model-repository=$PWD
```

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
{ask}seed = httpclient.InferInput("SEED", [1], "INT64")
seed.set_data_from_numpy(np.array([0], dtype=np.int64))
result = client.infer("pipeline", [prompt, seed])
images = result.as_numpy("IMAGES")      # uint8 [N, H, W, 3]
```
"""
