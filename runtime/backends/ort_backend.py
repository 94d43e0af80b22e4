"""ONNX Runtime backend: runs an export directory (``toolkit export``) with numpy + onnxruntime only.

The array type at the backend boundary (what the samplers compute on; float32 for latents and images) is
host numpy or, with ``arrays="torch"``, torch tensors on the backend's device (runtime/backends/ort_binding.py):
  - CPU provider, numpy arrays: each network call is a plain ``session.run``.
  - CUDA provider, torch arrays (the default when torch can use the GPU): every call goes through IO binding
    on torch buffers preallocated per input shape; the latents stay on the GPU between steps and only the
    step's scalar timestep crosses PCIe.
  - CUDA provider, numpy arrays: the same binding on OrtValue buffers; the latents cross PCIe in and out
    each step (no torch needed).
  - CPU provider, torch arrays: the torch binding path on CPU tensors (what the tests run without a GPU).
Fixed buffer addresses let ORT capture and replay a CUDA graph of the UNet per shape (``cuda_graph=True``).
fp16 exports are cast inside: inputs to the graph's declared dtypes, float outputs back to float32.

Options (``Pipeline.load(..., backend="onnxruntime", <option>=...)``):
  intra_op_threads / inter_op_threads: ORT thread pools (default: ORT's choice),
  graph_optimization: disable | basic | extended | all (default all),
  cuda_graph: capture one CUDA graph per input shape (CUDA only; every node must run on CUDA),
  cuda_options: extra CUDA provider options, e.g. {"prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC"},
  verify: check every file's sha256 against manifest.json before loading (default True),
  arrays: numpy | torch (default: torch on cuda when torch with CUDA is importable, else numpy; an explicit
    "torch" without torch is an error, never a silent switch; describe() names the array type that ran).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from atdiff.runtime.backends.base import Backend, BackendError
from atdiff.runtime.backends.ort_binding import BoundBuffers, make_arrays, run_bound
from atdiff.runtime.contracts import ExportContract
from atdiff.runtime.devices import DeviceSupport, gpu_index, resolve_device
from atdiff.runtime.export_manifest import ExportManifest, read_manifest, verify_files
from atdiff.runtime.model_spec import ModelSpec

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module and break each other when both are
# present, so the CPU build must be removed first (pip cannot express "instead of" in an extra).
GPU_EXTRA_HINT = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install -e '.[gpu]' (in the toolkit's checkout) "
                  "(onnxruntime-gpu replaces the CPU-only onnxruntime)")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
               "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
               "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
               "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def device_support() -> DeviceSupport:
    """Whether ONNX Runtime can use CUDA here: its CUDA provider is installed (onnxruntime-gpu)."""
    available = ort.get_available_providers()
    return DeviceSupport("onnxruntime", CUDA_EP in available,
                         missing=f"onnxruntime {ort.__version__} has no {CUDA_EP} (it has {', '.join(available)})",
                         fix=f"install the gpu extra: {GPU_EXTRA_HINT}")


def ort_device(device: str) -> tuple[str, int | None]:
    """``device`` (auto | cpu | cuda | cuda:N, runtime/devices.py) resolved for ONNX Runtime as (kind, GPU id):
    ('cpu', None) or ('cuda', N). CUDA without ORT's CUDA provider is an error naming the extra to install,
    never a silent CPU run."""
    resolved = resolve_device(device, device_support)
    return ("cpu", None) if resolved == "cpu" else ("cuda", gpu_index(resolved))


def session_options(intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                    graph_optimization: str = "all") -> ort.SessionOptions:
    if graph_optimization not in _OPT_LEVELS:
        raise BackendError(f"graph_optimization '{graph_optimization}' is not one of {', '.join(_OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPT_LEVELS[graph_optimization]
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    return options


def providers_for(kind: str, device_id: int | None, cuda_graph: bool, cuda_options: dict | None = None) -> list:
    if kind == "cpu":
        if cuda_graph or cuda_options:
            raise BackendError("cuda_graph / cuda_options need device cuda; drop them for CPU runs")
        return [CPU_EP]
    cuda_options = {**{k: str(v) for k, v in (cuda_options or {}).items()}, "device_id": str(device_id)}
    if cuda_graph:
        cuda_options["enable_cuda_graph"] = "1"
    # CPU stays listed for the few shape ops ORT places there; with cuda_graph every node must be on CUDA
    # and ORT refuses to capture otherwise (the error is passed on).
    return [(CUDA_EP, cuda_options), CPU_EP]


class OrtRunner:
    """One network's InferenceSession: inputs are cast to the graph's dtypes, float outputs come back as
    float32. ``arrays=None`` is a plain ``session.run`` on host numpy (CPU provider); an array adapter
    (``atdiff.runtime.backends.ort_binding``) runs through IO binding on buffers preallocated per input shape on
    the adapter's device (required for CUDA graphs; on a CPU it exercises the same path)."""

    def __init__(self, path: Path, contract: ExportContract, options: ort.SessionOptions, providers: list,
                 arrays=None, cuda_graph: bool = False):
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; keep the first line
            raise BackendError(f"onnxruntime could not load {path}: {str(exc).splitlines()[0][:300]}") from None
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.session.get_providers()[0] != wanted:  # ORT falls back to CPU when CUDA libraries fail to load
            raise BackendError(f"onnxruntime could not start {wanted} for {path.name} (it fell back to "
                               f"{self.session.get_providers()}); check the CUDA/cuDNN install ({GPU_EXTRA_HINT})")
        self.contract, self.arrays, self.cuda_graph = contract, arrays, cuda_graph
        self.input_types = {i.name: _numpy_type(i.type) for i in self.session.get_inputs()}
        self.output_types = {o.name: _numpy_type(o.type) for o in self.session.get_outputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._buffers: dict[tuple, BoundBuffers] = {}
        self._buffers_lock = threading.Lock()   # two threads meeting a new shape must not make two buffer sets

    @classmethod
    def for_component(cls, manifest: ExportManifest, name: str, device: str = "cpu", *,
                      options: ort.SessionOptions | None = None, arrays=None, cuda_graph: bool = False,
                      cuda_options: dict | None = None) -> "OrtRunner":
        """The runner of one exported network on ``device`` ('cpu', 'cuda', 'cuda:N'): what the backend, export
        validation and ``toolkit bench ort`` each open (use it as a context manager, or ``close()`` it)."""
        kind, device_id = ort_device(device)
        return cls(manifest.component_path(name), manifest.contract(name), options or session_options(),
                   providers_for(kind, device_id, cuda_graph, cuda_options), arrays, cuda_graph)

    def __enter__(self) -> "OrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def input_names(self) -> list[str]:
        return list(self.input_types)

    @property
    def output(self) -> str:
        """The contract's (first) output: what the network computes."""
        return self.contract.outputs[0].name

    def __call__(self, feed: dict) -> dict:
        missing = set(self.input_types) - set(feed)
        extra = set(feed) - set(self.input_types)
        if missing or extra:
            raise BackendError(f"network inputs mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}; "
                               "the export does not match this model's conditioning, re-run 'toolkit export'")
        return self._run_host(feed) if self.arrays is None else self._run_bound(feed)

    def _run_host(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(a, dtype=self.input_types[n]) for n, a in feed.items()}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        return {n: (a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a) for n, a in outputs.items()}

    def _run_bound(self, feed: dict) -> dict:
        key = tuple(sorted((n, tuple(a.shape)) for n, a in feed.items()))
        with self._buffers_lock:
            buffers = self._buffers.get(key)
            if buffers is None:
                # one captured graph per input-shape signature; ids start at 1 because 0 is ORT's default
                # annotation (runs that name none) and -1 means 'do not capture'
                graph_id = len(self._buffers) + 1 if self.cuda_graph else None
                buffers = self._buffers[key] = BoundBuffers(self.session, self.contract, feed, self.arrays,
                                                            (self.input_types, self.output_types), graph_id)
        return run_bound(self.session, buffers, feed, self.arrays, self.input_types)

    def close(self) -> None:
        self._buffers.clear()
        self.session = None


def _numpy_type(onnx_type: str):
    if onnx_type not in _NUMPY_TYPES:
        raise BackendError(f"unsupported ONNX tensor type {onnx_type} at the network boundary")
    return _NUMPY_TYPES[onnx_type]


class OrtBackend(Backend):
    name = "onnxruntime"

    @classmethod
    def device_support(cls) -> DeviceSupport:
        return device_support()

    @classmethod
    def auto_dtype(cls, source_dir, device: str) -> str:
        """An export's precision is fixed when it is exported: 'auto' means the manifest's."""
        return read_manifest(source_dir).precision

    @classmethod
    def load(cls, source_dir, spec: ModelSpec, *, device: str, dtype: str, intra_op_threads: int | None = None,
             inter_op_threads: int | None = None, graph_optimization: str = "all", cuda_graph: bool = False,
             verify: bool = True, cuda_options: dict | None = None, arrays: str | None = None,
             **options: Any) -> "OrtBackend":
        if options:
            raise BackendError(f"the onnxruntime backend has no option(s) {sorted(options)}; it takes "
                               "intra_op_threads, inter_op_threads, graph_optimization, cuda_graph, "
                               "cuda_options, verify, arrays")
        device = cls.resolve_device(device)   # 'auto' -> what describe() names
        kind, device_id = ort_device(device)
        manifest = read_manifest(source_dir)
        if dtype not in ("auto", manifest.precision):
            raise BackendError(f"export {source_dir} runs {manifest.precision} (fixed at export); pass dtype "
                               f"'{manifest.precision}' or 'auto', or re-export "
                               f"{'without' if manifest.precision == 'float16' else 'with'} --fp16")
        providers_for(kind, device_id, cuda_graph, cuda_options)  # option errors before the slow parts
        array_adapter = make_arrays(arrays, kind, device_id)     # and a missing torch, too
        if verify:
            verify_files(manifest)
        backend = cls(spec, device, manifest.precision)
        backend._arrays = array_adapter
        backend._open(manifest, session_options(intra_op_threads, inter_op_threads, graph_optimization),
                      kind, device_id, cuda_graph, cuda_options)
        return backend

    def _open(self, manifest, options, kind, device_id, cuda_graph, cuda_options) -> None:
        needed = ["unet"] + (["text_encoder", "vae_decoder"] if self.spec.is_latent else [])
        # host numpy on the CPU provider needs no binding (session.run reads numpy directly); every other
        # combination runs through IO binding on the adapter's buffers
        self._bound = not (kind == "cpu" and self._arrays.name == "numpy")
        self._runners: dict[str, OrtRunner] = {}
        device = "cpu" if kind == "cpu" else f"cuda:{device_id}"
        for name in needed:
            # CUDA graphs only for the UNet, the network called every step; the text encoder and VAE
            # run once per generation, where a graph saves little and capture constraints only risk errors.
            self._runners[name] = OrtRunner.for_component(
                manifest, name, device, options=options, arrays=self._arrays if self._bound else None,
                cuda_graph=cuda_graph and name == "unet", cuda_options=cuda_options)
        self._precisions = {name: manifest.components[name]["precision"] for name in needed}
        self._provider = self._runners["unet"].session.get_providers()[0]
        self._cuda_graph = cuda_graph
        self._threads = options.intra_op_num_threads

    def from_numpy(self, array: np.ndarray):
        return self._arrays.from_numpy(array)

    def to_numpy(self, array) -> np.ndarray:
        return self._arrays.to_numpy(array)

    def synchronize(self) -> None:
        self._arrays.synchronize()

    def encode_text(self, input_ids: np.ndarray):
        if "text_encoder" not in self._runners:
            return super().encode_text(input_ids)
        return self._call("text_encoder", input_ids=input_ids)

    def denoise(self, sample, timestep: int, *, encoder_hidden_states=None, timestep_cond=None,
                class_labels=None):
        return self._call("unet", sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          timestep_cond=timestep_cond, class_labels=class_labels)

    def decode(self, latents):
        if "vae_decoder" not in self._runners:
            return super().decode(latents)
        return self._call("vae_decoder", latent=latents)

    def _call(self, component: str, **given):
        """Feed the network exactly the inputs its contract names; return the contract's output."""
        runner = self._runners[component]
        return runner(runner.contract.feed(given))[runner.output]

    def close(self) -> None:
        for runner in getattr(self, "_runners", {}).values():
            runner.close()
        self._runners = {}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {precision}" for name, precision in self._precisions.items())
        graph = ", UNet in CUDA graphs" if self._cuda_graph else ""
        binding = ", IO binding" if self._bound else ""
        return (f"onnxruntime {ort.__version__} on {self.device} via {self._provider}{graph}, "
                f"{self._arrays.name} arrays{binding} ({parts})")
