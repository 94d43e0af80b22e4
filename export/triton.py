"""``toolkit export triton EXPORT_DIR --out REPO``: a Triton Inference Server model repository from an export.

One model per network (ONNX Runtime backend, the export's own ``model.onnx``), each ``config.pbtxt`` generated
from the export contract (names, dtypes, dims with -1 for dynamic axes, batching, instance group), plus the
``pipeline`` Python-backend model: the runtime's own sampling loop calling the networks through BLS
(runtime/triton_model.py). Written to a staging directory and moved into place whole.

The UNet's contract has a timestep of shape [1] shared by the batch, so Triton cannot batch UNet requests itself
(every input would need the batch dimension first): the UNet gets ``max_batch_size: 0`` and full shapes, and the
networks whose every tensor is batched (text encoder, VAE decoder) get ``max_batch_size`` and dynamic batching.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from runtime.contracts import ExportContract
from runtime.errors import ToolkitError
from runtime.export_manifest import read_manifest, verify_files
from runtime.model_source import MANIFEST
from runtime.staging import staged_directory
from runtime.triton_model import EXPORT_SUBDIR, NETWORK_MODELS_FILE

MARKER = "triton-repository.json"   # marks a repository this command wrote (so --out replaces only those)
PIPELINE = "pipeline"
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
_MODEL_PY = ('"""Triton Python-backend entry point: the toolkit runtime\'s pipeline (runtime/triton_model.py)."""\n'
             "from runtime.triton_model import TritonPythonModel  # noqa: F401\n")


def write_repository(export_dir: str | Path, out: str | Path, *, kind: str = "gpu", max_batch_size: int = 8) -> Path:
    """Write the repository for ``export_dir`` at ``out``; returns ``out``."""
    if kind not in KINDS:
        raise ToolkitError(f"--kind {kind}: choose gpu or cpu (where Triton runs the network models)")
    if max_batch_size < 1:
        raise ToolkitError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    manifest = read_manifest(export_dir)
    verify_files(manifest)   # never package a changed or half-copied export
    out = Path(out)
    with staged_directory(out, MARKER, "existing Triton repository") as staging:
        names = {}
        for component in manifest.components:
            names[component] = component
            (staging / component / "1").mkdir(parents=True)
            shutil.copy2(manifest.component_path(component), staging / component / "1" / "model.onnx")
            (staging / component / "config.pbtxt").write_text(
                network_config(component, manifest.contract(component), kind=KINDS[kind], max_batch_size=max_batch_size))
        _write_pipeline(staging / PIPELINE, manifest, names)
        (staging / "README.md").write_text(repository_readme(manifest.spec.is_latent))
        (staging / MARKER).write_text(json.dumps({"export": str(Path(export_dir).resolve()), "kind": kind,
                                                  "max_batch_size": max_batch_size, "models": [*names, PIPELINE]},
                                                 indent=2))
    return out


def _write_pipeline(root: Path, manifest, names: dict) -> None:
    version = root / "1"
    (version / EXPORT_SUBDIR).mkdir(parents=True)
    shutil.copy2(manifest.root / MANIFEST, version / EXPORT_SUBDIR / MANIFEST)
    if (manifest.root / "tokenizer").is_dir():
        shutil.copytree(manifest.root / "tokenizer", version / EXPORT_SUBDIR / "tokenizer")
    (version / NETWORK_MODELS_FILE).write_text(json.dumps(names, indent=2))
    (version / "model.py").write_text(_MODEL_PY)
    (root / "config.pbtxt").write_text(pipeline_config())


def network_config(name: str, contract: ExportContract, *, kind: str, max_batch_size: int) -> str:
    """config.pbtxt of one network: Triton batches it only when every tensor has the batch dimension first."""
    tensors = contract.inputs + contract.outputs
    batched = all(t.shape and t.shape[0] == "batch" for t in tensors)

    def entry(tensor) -> str:
        dims = [d if isinstance(d, int) else -1 for d in (tensor.shape[1:] if batched else tensor.shape)]
        return f'  {{ name: "{tensor.name}" data_type: {_TYPES[tensor.dtype]} dims: [ {", ".join(map(str, dims))} ] }}'
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size if batched else 0}",
             "input [", ",\n".join(map(entry, contract.inputs)), "]",
             "output [", ",\n".join(map(entry, contract.outputs)), "]",
             f"instance_group [ {{ kind: {kind} count: 1 }} ]"]
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def pipeline_config() -> str:
    """config.pbtxt of the Python-backend pipeline (inputs/outputs: runtime/triton_model.py)."""
    inputs = [("PROMPT", "TYPE_STRING", "-1"), ("NUM_IMAGES", "TYPE_INT32", "1"), ("SEED", "TYPE_INT64", "1"),
              ("STEPS", "TYPE_INT32", "1"), ("GUIDANCE_SCALE", "TYPE_FP32", "1")]
    body = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] optional: true }}' for n, t, d in inputs)
    return (f'name: "{PIPELINE}"\nbackend: "python"\nmax_batch_size: 0\ninput [\n{body}\n]\noutput [\n'
            '  { name: "IMAGES" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] },\n'
            '  { name: "SEEDS" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
            "# the sampling loop runs on the CPU; the network models it calls run where their instance_group says\n"
            "instance_group [ { kind: KIND_CPU count: 1 } ]\n")


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
