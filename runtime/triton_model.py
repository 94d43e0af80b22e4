"""The ``pipeline`` model of a Triton repository (``toolkit export triton``): Triton's Python backend runs this
class; it is the runtime's own Pipeline (tokenizer, seeds-per-sample noise, conditioning, samplers, decoding)
over a backend whose networks are the repository's ONNX models, called through Triton's BLS API. So Triton's
images equal ``toolkit generate``'s for the same seed. The repository's ``pipeline/1/model.py`` only imports it;
Triton's Python environment needs the toolkit's core install (no torch, no onnxruntime).

Inputs (all but PROMPT/NUM_IMAGES optional): PROMPT (BYTES [-1], one image per prompt), NUM_IMAGES (INT32 [1],
unconditional models), SEED (INT64 [1]; image i gets SEED + i), STEPS (INT32 [1]), GUIDANCE_SCALE (FP32 [1]).
Outputs: IMAGES (UINT8 [-1, H, W, 3]), SEEDS (INT64 [-1]).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from atdiff.runtime.backends.base import Backend, BackendError
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.export_manifest import read_manifest
from atdiff.runtime.generation import GenerationOptions
from atdiff.runtime.model_source import open_model
from atdiff.runtime.pipeline import Pipeline

EXPORT_SUBDIR = "export"          # pipeline/1/export: manifest.json and tokenizer/ (the networks are models)
NETWORK_MODELS_FILE = "networks.json"   # component -> Triton model name


class TritonBLSBackend(Backend):
    """The networks as Triton models: each call is one BLS request, fed exactly as the export contract says."""

    name = "triton-bls"

    def __init__(self, spec, manifest, pb_utils, model_names: dict[str, str]):
        super().__init__(spec, "triton", manifest.precision)
        self.pb, self.model_names = pb_utils, model_names
        self.contracts = {name: manifest.contract(name) for name in model_names}

    @classmethod
    def load(cls, source_dir, spec, *, device: str = "triton", dtype: str = "auto", pb_utils=None,
             model_names: dict | None = None) -> "TritonBLSBackend":
        if pb_utils is None:
            raise BackendError("the triton-bls backend runs inside Triton's Python backend only")
        return cls(spec, read_manifest(source_dir), pb_utils, model_names or {})

    def from_numpy(self, array: np.ndarray):
        return array

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(array)

    def encode_text(self, input_ids: np.ndarray):
        return self._call("text_encoder", input_ids=input_ids)

    def denoise(self, sample, timestep: int, *, encoder_hidden_states=None, timestep_cond=None, class_labels=None):
        return self._call("unet", sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          timestep_cond=timestep_cond, class_labels=class_labels)

    def decode(self, latents):
        return self._call("vae_decoder", latent=latents)

    def _call(self, component: str, **given) -> np.ndarray:
        contract = self.contracts[component]
        output = contract.output_names()[0]
        request = self.pb.InferenceRequest(
            model_name=self.model_names[component], requested_output_names=[output],
            inputs=[self.pb.Tensor(name, array) for name, array in contract.feed(given, cast=True).items()])
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model '{self.model_names[component]}' failed: {response.error().message()}")
        return self.pb.get_output_tensor_by_name(response, output).as_numpy().astype(np.float32)

    def describe(self) -> str:
        return f"triton BLS ({', '.join(self.model_names.values())}; {self.dtype})"


class TritonPythonModel:
    """What Triton's Python backend instantiates: ``initialize`` once, ``execute`` per batch of requests."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils   # provided by Triton's Python backend
        self.pb = pb_utils
        here = Path(args["model_repository"]) / args["model_version"]
        source = open_model(here / EXPORT_SUBDIR)
        names = json.loads((here / NETWORK_MODELS_FILE).read_text())
        backend = TritonBLSBackend.load(source.path, source.spec, pb_utils=pb_utils, model_names=names)
        self.pipe = Pipeline(source, backend)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:  # one generation per request; a bad one gets its error, the others their images
            try:
                output = self.pipe.generate(self.options(request))
            except ToolkitError as exc:
                responses.append(self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(str(exc))))
                continue
            responses.append(self.pb.InferenceResponse(output_tensors=[
                self.pb.Tensor("IMAGES", output.arrays), self.pb.Tensor("SEEDS", np.asarray(output.seeds, np.int64))]))
        return responses

    def options(self, request) -> GenerationOptions:
        def scalar(name, kind):
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else kind(tensor.as_numpy().reshape(-1)[0])
        prompts = self.pb.get_input_tensor_by_name(request, "PROMPT")
        texts = None if prompts is None else [p.decode() if isinstance(p, bytes) else str(p)
                                              for p in prompts.as_numpy().reshape(-1)]
        seed = scalar("SEED", int)
        return GenerationOptions(prompts=texts, num_images=scalar("NUM_IMAGES", int), steps=scalar("STEPS", int),
                                 seed=0 if seed is None else seed, guidance_scale=scalar("GUIDANCE_SCALE", float))

    def finalize(self) -> None:
        self.pipe.close()
