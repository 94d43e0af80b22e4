"""Shared fixtures: tiny random models saved once per test session (built from configs, offline)."""
from __future__ import annotations

import os
import tempfile

import pytest

# Tests never reach a model hub; fail fast instead of retrying network calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ... and never write into the user's ~/.cache (model hashes cached by `toolkit generate`).
os.environ.setdefault("TOOLKIT_CACHE_DIR", tempfile.mkdtemp(prefix="toolkit-test-cache-"))


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
    from train.tiny_models import build_tiny_text_to_image
    return build_tiny_text_to_image(tmp_path_factory.mktemp("models") / "tiny-lcm", seed=0, lcm=True)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline-style directory (no guidance embedding; CFG; DDIMScheduler)."""
    from train.tiny_models import build_tiny_text_to_image
    return build_tiny_text_to_image(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0, lcm=False)


@pytest.fixture(scope="session")
def tiny_uncond_dir(tmp_path_factory):
    """A tiny ADM-style pixel UNet (16x16 RGB) as a DDPMPipeline directory."""
    from train.tiny_models import build_tiny_unconditional
    return build_tiny_unconditional(tmp_path_factory.mktemp("models") / "tiny-uncond", seed=0)


@pytest.fixture(scope="session")
def tiny_lcm_export(tiny_lcm_dir, tmp_path_factory):
    """``tiny_lcm_dir`` exported to ONNX (fp32, not validated: the export tests validate)."""
    from export.exporter import ExportSettings, run_export
    out = tmp_path_factory.mktemp("exports") / "tiny-lcm"
    return run_export(ExportSettings(model=str(tiny_lcm_dir), out=out, validate=False), log=lambda m: None).out
