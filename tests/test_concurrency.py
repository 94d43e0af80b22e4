"""atdiff.runtime.Pipeline from many threads: every backend / array option that runs on a CPU gives each thread the
image a single-threaded call gives (8 threads x 3 rounds, seeds 0-7). The ONNX Runtime IO-binding paths used
to share one set of bound buffers between threads and returned 7 wrong images out of 8 (issue 12)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from atdiff.runtime import Pipeline
from tolerance import (TINY_TEXT_ENCODER_LAYERS, TINY_TEXT_UNET_LAYERS, TINY_VAE_DECODER_LAYERS, assert_close_scaled,
                       network_rel)

THREADS, ROUNDS = 8, 3
# the same kernels on the same shapes, but another thread count may split a kernel's sums differently: the text
# encoder, 2 UNet steps and the VAE decoder may each round their layers differently
PIPELINE_REL = network_rel(TINY_TEXT_ENCODER_LAYERS + 2 * TINY_TEXT_UNET_LAYERS + TINY_VAE_DECODER_LAYERS)
CASES = {  # name -> (export fixture or None for the torch backend, Pipeline.load options)
    "torch": (None, dict(backend="torch")),
    "onnxruntime-plain": ("lcm_export", dict(backend="onnxruntime")),
    "onnxruntime-bound-torch": ("lcm_export", dict(backend="onnxruntime", arrays="torch")),
}


@pytest.fixture(scope="module")
def lcm_export(tiny_lcm_export):
    return tiny_lcm_export


def generate(pipe, seed: int) -> np.ndarray:
    return pipe(["astronaut in a jungle"], steps=2, seed=seed).samples[0]


@pytest.mark.parametrize("case", list(CASES))
def test_eight_threads_get_the_single_threaded_images(case, tiny_lcm_dir, request):
    fixture, options = CASES[case]
    model = tiny_lcm_dir if fixture is None else request.getfixturevalue(fixture)
    with Pipeline.load(str(model), device="cpu", **options) as pipe:
        if options.get("arrays") == "torch":
            assert "IO binding" in pipe.backend.describe()
        expected = [generate(pipe, seed) for seed in range(THREADS)]
        with ThreadPoolExecutor(THREADS) as pool:
            for _ in range(ROUNDS):
                got = list(pool.map(lambda seed: generate(pipe, seed), range(THREADS)))
                for seed in range(THREADS):
                    assert_close_scaled(got[seed], expected[seed], PIPELINE_REL, what=f"seed {seed}")


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_bound_runner_calls_of_one_shape_from_eight_threads(lcm_export, arrays):
    """The runner level, where the numpy adapter binds too (on CUDA in practice; CPU OrtValues here): eight
    threads with eight different inputs of one shape, each gets the plain run's output for its own input."""
    from atdiff.runtime.backends.ort_backend import OrtRunner
    from atdiff.runtime.backends.ort_binding import make_arrays
    from atdiff.runtime.export_manifest import read_manifest
    manifest = read_manifest(lcm_export)
    contract = manifest.contract("unet")
    adapter = make_arrays(arrays, "cpu", 0)
    plain = OrtRunner.for_component(manifest, "unet")
    bound = OrtRunner.for_component(manifest, "unet", arrays=adapter)
    output = contract.output_names()[0]
    feeds = [contract.sample_inputs("min", seed=k) for k in range(THREADS)]
    expected = [plain(feed)[output] for feed in feeds]

    def call(k):
        return adapter.to_numpy(bound({n: adapter.from_numpy(v) for n, v in feeds[k].items()})[output])

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(ROUNDS):
            for k, got in enumerate(pool.map(call, range(THREADS))):
                np.testing.assert_array_equal(got, expected[k], err_msg=f"thread {k}")
    assert len(bound._buffers) == 1   # one shape: one buffer set, shared in turn
