"""A small stand-in for Triton's ``triton_python_backend_utils`` (no Triton server can be installed here): the
subset the pipeline model uses, with BLS requests forwarded to onnxruntime sessions on the repository's own
``<model>/1/model.onnx`` files. Tests set ``REPOSITORY`` before calling the model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

REPOSITORY: Path | None = None
_SESSIONS: dict[str, ort.InferenceSession] = {}


class TritonError:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list, error: TritonError | None = None):
        self._outputs, self._error = output_tensors, error

    def output_tensors(self) -> list:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceRequest:
    """A BLS request: ``exec()`` runs the named model's ONNX file like Triton's onnxruntime backend would."""

    def __init__(self, model_name: str, requested_output_names: list, inputs: list):
        self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

    def exec(self) -> InferenceResponse:
        if self.model_name not in _SESSIONS:
            path = REPOSITORY / self.model_name / "1" / "model.onnx"
            _SESSIONS[self.model_name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session = _SESSIONS[self.model_name]
        expected = {i.name: i.type for i in session.get_inputs()}
        feed = {t.name(): t.as_numpy() for t in self.inputs}
        if set(feed) != set(expected):
            return InferenceResponse([], TritonError(f"inputs {sorted(feed)} != model inputs {sorted(expected)}"))
        arrays = session.run(self.outputs, feed)   # Triton would refuse wrong dtypes too: ORT raises on them
        return InferenceResponse([Tensor(n, a) for n, a in zip(self.outputs, arrays)])


class _Request:
    """What Triton hands ``execute``: named input tensors."""

    def __init__(self, **inputs):
        self.inputs = [Tensor(name, value) for name, value in inputs.items()]


def get_input_tensor_by_name(request, name: str):
    return next((t for t in request.inputs if t.name() == name), None)


def get_output_tensor_by_name(response, name: str):
    return next((t for t in response.output_tensors() if t.name() == name), None)


def reset(repository: Path) -> None:
    global REPOSITORY
    REPOSITORY = repository
    _SESSIONS.clear()
