"""toolkit train lcm / lcm-at: commands, the consistency target, free-AT delta, output pipeline, bad input."""
from __future__ import annotations

import contextlib
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import requires_cuda
from atdiff.runtime.errors import ToolkitError
from atdiff.train.core.adversarial import ascend, init_delta, per_sample_norm, radius_for
from atdiff.train.core.caption_data import CaptionDataset, find_records, open_or_build_cache
from atdiff.train.lcm.lcm_losses import AdvSettings, ConsistencyDistillation, LCDSettings
from atdiff.train.lcm.lcm_teacher import (DDIMSolver, alphas_cumprod, lcm_scheduler, load_teacher, make_student,
                                         teacher_solver_step)
from tolerance import (EPS16, EPS32, TINY_TEXT_UNET_LAYERS, assert_close_scaled, guidance_amplification, max_abs,
                       network_rel, sampler_ops_rel, schedule_rel)

FAST = ["--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--save-every", "0", "--resolution", "32"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each command builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


def _png_bytes(rng, h=72, w=80) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder(root, n=4, captions=True):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        (root / f"{i}.png").write_bytes(_png_bytes(rng))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines[: n if captions else n - 1]) + "\n")
    return root


def _tar_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _invoke(*args):
    from toolkit import app
    return CliRunner().invoke(app, ["train", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def lcm_run(tiny_sd_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lcm")
    result = _invoke("lcm", "--teacher", tiny_sd_dir, "--data", _imagefolder(tmp / "data"), "--out", tmp / "run", *FAST)
    assert result.exit_code == 0, result.output
    return tmp / "run"


@pytest.fixture(scope="module")
def parts(tiny_sd_dir):
    teacher = load_teacher(str(tiny_sd_dir))
    torch.manual_seed(0)
    student = make_student(teacher.unet, w_embedding=True, time_cond_proj_dim=32)
    solver = DDIMSolver(alphas_cumprod(teacher.scheduler_config), 50)
    return teacher, student, solver, lcm_scheduler(teacher.scheduler_config, 50, 10.0)


def _objective(parts, adv=None, **settings):
    teacher, student, solver, scheduler = parts
    import copy
    return ConsistencyDistillation(teacher, copy.deepcopy(student), solver, scheduler, LCDSettings(**settings), adv)


def _batch(teacher, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = teacher.tokenizer([f"a red cube {i}" for i in range(n)], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    return {"pixel_values": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, "input_ids": ids}  # 8x8 latents


class FakeContext:
    """What the objective uses of the trainer's StepContext, with plain SGD as the optimizer step."""

    class _Accelerator:
        optimizer_step_was_skipped = False
        autocast = staticmethod(contextlib.nullcontext)

        @staticmethod
        def unwrap_model(model):
            return model

    def __init__(self, model, seed):
        self.model, self.device, self.accelerator = model, torch.device("cpu"), self._Accelerator()
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)

    def update(self, micro_batches, loss_fn):
        loss = loss_fn(0, micro_batches[0])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


# ---- commands --------------------------------------------------------------------------------------

def test_lcm_command_one_step_writes_lcm_pipeline(lcm_run):
    model = lcm_run / "model"
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "LatentConsistencyModelPipeline"
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 50
    assert json.loads((model / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 256
    record = json.loads((model / "training.json").read_text())
    assert record["command"] == "lcm" and record["weights"] == "ema-target" and record["files_sha256"]
    assert (lcm_run / "checkpoints" / "step-1" / "trainer_state.json").exists()


def test_lcm_at_command_one_step_on_tar_shards_with_latent_cache(tiny_sd_dir, tmp_path):
    rng = np.random.default_rng(1)
    _tar_shard(tmp_path / "a.tar", [("k0.png", _png_bytes(rng)), ("k0.txt", b"a blue ball"),
                                    ("k1.jpg", _png_bytes(rng)), ("k1.json", b'{"text": "a green tree"}')])
    _tar_shard(tmp_path / "b.tar", [("k2.png", _png_bytes(rng)), ("k2.caption", b"a yellow car")])
    args = ["lcm-at", "--teacher", tiny_sd_dir, "--data", tmp_path, "--out", tmp_path / "run",
            "--cache-latents", tmp_path / "cache", "--adv-steps", "2", *FAST]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["key"]["num_samples"] == 3
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["optimizer_steps"] == 2 and 0 < metrics["delta_rms"] <= 0.05 + 1e-6
    assert json.loads((tmp_path / "run" / "model" / "training.json").read_text())["adv"]["steps"] == 2


# ---- the maths -------------------------------------------------------------------------------------

def test_solver_step_matches_diffusers_ddim_step_with_cfg(parts):
    from diffusers import DDIMScheduler
    teacher, _, solver, _ = parts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    index = torch.tensor([0, 17, 49])
    cond, uncond = torch.randn(2, 3, 77, 32, generator=g)
    w = torch.tensor([5.0, 7.5, 15.0])
    ours = teacher_solver_step(teacher.unet, solver, x, index, cond, uncond, w, "epsilon")

    ddim = DDIMScheduler.from_config(teacher.scheduler_config)
    ddim.set_timesteps(50)
    abar = torch.from_numpy(_scaled_linear_alphas_cumprod())  # float64, from the formula
    for i, idx in enumerate(index.tolist()):
        t = 20 * (idx + 1) - 1  # diffusers' solver grid: [19, 39, ..., 999]
        with torch.no_grad():
            e_c = teacher.unet(x[i:i + 1], t, encoder_hidden_states=cond[i:i + 1]).sample.double()
            e_u = teacher.unet(x[i:i + 1], t, encoder_hidden_states=uncond[i:i + 1]).sample.double()
        eps = e_c + w[i].item() * (e_c - e_u)  # Imagen-form CFG
        a, a_prev = abar[t], abar[max(t - 20, 0)]
        x0 = (x[i:i + 1].double() - (1 - a).sqrt() * eps) / a.sqrt()
        by_hand = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        # ours runs cond and uncond as one batch of 6, the UNet calls above one sample each: the (SD-style, 83)
        # layers round differently, and the Imagen-form (1 + w) e_c - w e_u multiplies that by 2w + 1; ours also
        # steps with diffusers' float32 alphas_cumprod (schedule_rel) and float32 ops
        rel = (network_rel(TINY_TEXT_UNET_LAYERS - 1, guidance_amplification(1 + w[i].item()))
               + schedule_rel(solver.alphas_cumprod, abar, [t, max(t - 20, 0)]) + sampler_ops_rel(1))
        assert_close_scaled(ours[i:i + 1], by_hand, rel, what=f"by hand, t={t}")
        if t >= 20:  # diffusers' DDIM lands on alpha-bar_prev of t - 20 as well (t = 19: final_alpha_cumprod)
            ref = ddim.step(eps.float(), t, x[i:i + 1]).prev_sample   # float32 ops on the by-hand eps
            assert_close_scaled(ours[i:i + 1], ref, rel + sampler_ops_rel(1), what=f"DDIMScheduler, t={t}")


def test_consistency_target_is_boundary_scaled_target_network_on_teacher_step(parts):
    teacher = parts[0]
    objective = _objective(parts)
    p = objective.prepare(_batch(teacher), torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.t_prev, (p.t_start - 20).clamp(min=0))
    assert torch.all((p.w >= 5) & (p.w <= 15))
    cond_index = (p.t_start + 1) // 20 - 1
    expected_prev = teacher_solver_step(teacher.unet, objective.solver, p.x_start, cond_index, p.prompt_embeds,
                                        objective.uncond_embeds.expand(2, -1, -1), p.w, "epsilon")
    assert torch.equal(p.x_prev, expected_prev)   # the same function on the same inputs
    with torch.no_grad():
        out = objective.target(p.x_prev, p.t_prev, timestep_cond=p.w_emb, encoder_hidden_states=p.prompt_embeds).sample
    formula = _scaled_linear_alphas_cumprod()
    abar = torch.from_numpy(formula).float()[p.t_prev].view(-1, 1, 1, 1)
    x0 = (p.x_prev - (1 - abar).sqrt() * out) / abar.sqrt()
    scaled = 10.0 * p.t_prev.double().view(-1, 1, 1, 1)
    c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25).sqrt()
    expected = (c_skip * p.x_prev + c_out * x0).float()
    # the same target-network output on both sides; the objective's float32 alphas_cumprod and this float32 copy
    # of the formula's are each off it (schedule_rel), and ~10 float32 ops round on each side
    rel = (schedule_rel(objective.solver.alphas_cumprod, formula, p.t_prev)
           + schedule_rel(formula.astype(np.float32), formula, p.t_prev) + sampler_ops_rel(1))
    assert_close_scaled(objective.target_value(p), expected, rel)


def test_target_network_is_ema_of_student(parts):
    objective = _objective(parts, ema_decay=0.95)
    model = parts[1].__class__.from_config(parts[1].config)
    model.load_state_dict(parts[1].state_dict())
    before = [p.detach().clone() for p in objective.target.parameters()]
    objective(FakeContext(model, seed=0), [_batch(parts[0])])
    for old, new, online in zip(before, objective.target.parameters(), model.parameters()):
        # float32 on both sides: the two constants, two products and a sum (or a lerp's three ops) round each,
        # <= 8 EPS32/2 of the terms' magnitude
        assert_close_scaled(new, 0.95 * old + 0.05 * online.detach(), 4 * EPS32, scale=max_abs(old, online))


def test_lcm_at_with_zero_radius_is_exactly_lcd(parts):
    """eta = 0: delta is projected to 0, so K inner steps are K LCD updates on the same batch."""
    teacher, student = parts[0], parts[1]
    at = _objective(parts, adv=AdvSettings(steps=2, lr=0.5, max_norm=0.0))
    lcd = _objective(parts)
    m_at, m_lcd = (student.__class__.from_config(student.config) for _ in range(2))
    for m in (m_at, m_lcd):
        m.load_state_dict(student.state_dict())
    batch = _batch(teacher)
    at_metrics = at(FakeContext(m_at, seed=5), [batch])
    lcd_losses = [lcd(FakeContext(m_lcd, seed=5), [batch])["loss"] for _ in range(2)]
    assert at_metrics["delta_rms"] == 0.0
    assert at_metrics["loss"] == pytest.approx(sum(lcd_losses) / 2, abs=0)
    for a, b in zip(list(m_at.parameters()) + list(at.target.parameters()),
                    list(m_lcd.parameters()) + list(lcd.target.parameters())):
        assert torch.equal(a, b)


def test_delta_respects_bound_and_increases_distance_to_first_order(parts):
    objective = _objective(parts, adv=AdvSettings())
    p = objective.prepare(_batch(parts[0]), torch.Generator().manual_seed(1))
    student = parts[1]
    delta = init_delta(p.x_prev)
    clean = objective.loss(student, p, delta)
    clean.backward()
    student.zero_grad(set_to_none=True)
    grad = delta.grad.clone()
    assert grad.abs().sum() > 0  # the target network's input carries the gradient
    step = radius_for(delta.shape, 1e-4)
    ascend(delta, step, radius_for(delta.shape, 0.05))
    with torch.no_grad():
        moved = objective.loss(student, p, delta)
    first_order = (grad * delta).sum()
    assert moved > clean
    assert (moved - clean).item() == pytest.approx(first_order.item(), rel=0.05)
    # a long ascent stays on the ball ||delta|| <= sqrt(CHW) * max_norm, per sample
    radius = radius_for(delta.shape, 0.05)
    for _ in range(2):
        objective.loss(student, p, delta).backward()
        ascend(delta, 10 * radius, radius)
    student.zero_grad(set_to_none=True)
    norms = per_sample_norm(delta).flatten()
    assert torch.all(norms <= radius * (1 + 1e-5)) and torch.all(norms >= radius * (1 - 1e-4))


def test_resume_continues_bit_for_bit_including_target_network(tiny_sd_dir, tmp_path):
    from safetensors.torch import load_file

    from atdiff.train.lcm.lcm_cli import DistillOptions, distill
    data = str(_imagefolder(tmp_path / "d"))
    common = dict(teacher=str(tiny_sd_dir), data=data, batch_size=2, device="cpu", resolution=32, progress=False,
                  save_every=0)
    distill(DistillOptions(out=tmp_path / "straight", max_steps=2, **common))
    distill(DistillOptions(out=tmp_path / "resumed", max_steps=1, **common))
    distill(DistillOptions(out=tmp_path / "resumed", max_steps=2, resume=True, **common))
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@requires_cuda
def test_lcm_at_fp16_steps_with_latent_cache_run_on_gpu(tiny_sd_dir, tmp_path):
    """The GPU paths: the cache encoded on the device, per-step generators on CUDA, GradScaler + autocast
    around the teacher, student and target network, and free AT's delta under a scaled loss."""
    from atdiff.train.lcm.lcm_cli import DistillOptions, distill
    from atdiff.train.lcm.lcm_losses import AdvSettings
    options = DistillOptions(teacher=str(tiny_sd_dir), data=str(_imagefolder(tmp_path / "d")), out=tmp_path / "run",
                             max_steps=2, batch_size=2, device="cuda", mixed_precision="fp16", resolution=32,
                             cache_latents=tmp_path / "cache", progress=False, save_every=1)
    result = distill(options, adv=AdvSettings(steps=2))
    assert result.step == 2 and result.optimizer_steps == 4 and result.model_dir is not None
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and 0 <= m["delta_rms"] <= 0.05 + 1e-6 for m in metrics)


# ---- the output pipeline ---------------------------------------------------------------------------

def test_output_loads_in_diffusers_lcm_pipeline_and_generates(lcm_run):
    from diffusers import LatentConsistencyModelPipeline
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_run / "model")
    images = pipe("a red cube", num_inference_steps=2, guidance_scale=8.0, height=32, width=32,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_output_loads_in_runtime_pipeline_and_generates(lcm_run):
    from atdiff.runtime.pipeline import Pipeline
    pipe = Pipeline.load(lcm_run / "model", backend="torch", device="cpu", dtype="float32")
    out = pipe(["a red cube"], steps=2, seed=0, height=32, width=32)
    assert out.arrays.shape == (1, 32, 32, 3) and out.arrays.std() > 0


# ---- bad input -------------------------------------------------------------------------------------

def test_teacher_that_is_not_text_to_image_is_refused(tiny_uncond_dir, tmp_path):
    result = _invoke("lcm", "--teacher", tiny_uncond_dir, "--data", _imagefolder(tmp_path / "d"),
                     "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 2 and "not a text-to-image pipeline" in result.output
    assert not (tmp_path / "run").exists()


def test_images_without_captions_are_refused(tiny_sd_dir, tmp_path):
    result = _invoke("lcm-at", "--teacher", tiny_sd_dir, "--data", _imagefolder(tmp_path / "d", captions=False),
                     "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 2 and "no caption" in result.output and "3.png" in result.output
    rng = np.random.default_rng(0)
    _tar_shard(tmp_path / "s.tar", [("k0.png", _png_bytes(rng)), ("k0.txt", b"ok"), ("k1.png", _png_bytes(rng))])
    with pytest.raises(ToolkitError, match="k1 .* no caption"):
        find_records(str(tmp_path / "s.tar"))


def test_tar_members_group_by_file_name_like_webdataset(tmp_path):
    """``tar -C dir .`` writes ``./0001.jpg``; a dotted folder holds ``a.b/0002.png``: the sample key ends at
    the first dot of the file name, not of the whole path (webdataset's rule)."""
    rng = np.random.default_rng(0)
    shard = _tar_shard(tmp_path / "s.tar", [
        ("./0001.png", _png_bytes(rng)), ("./0001.txt", b"a red cube"),
        ("v1.2/0002.png", _png_bytes(rng)), ("v1.2/0002.json", b'{"text": "a cat"}')])
    records = find_records(str(shard))
    assert sorted(r.caption for r in records) == ["a cat", "a red cube"]
    with tarfile.open(shard) as tar:
        offsets = {m.name: m.offset_data for m in tar}
    assert sorted(r.offset for r in records) == sorted([offsets["./0001.png"], offsets["v1.2/0002.png"]])


def test_student_without_time_cond_proj_dim_is_refused_with_w_embedding(tiny_sd_dir, tmp_path):
    result = _invoke("lcm", "--teacher", tiny_sd_dir, "--data", _imagefolder(tmp_path / "d"), "--out",
                     tmp_path / "run", "--student", tiny_sd_dir, "--w-embedding", *FAST)
    assert result.exit_code == 2 and "time_cond_proj_dim" in result.output
    assert not (tmp_path / "run").exists()


def test_bad_settings_are_refused_before_loading(tmp_path):
    result = _invoke("lcm-at", "--teacher", tmp_path / "nope", "--data", tmp_path, "--out", tmp_path / "run",
                     "--adv-steps", "0", *FAST)
    assert result.exit_code == 2 and "--adv-steps" in result.output
    result = _invoke("lcm", "--teacher", tmp_path / "nope", "--data", tmp_path, "--out", tmp_path / "run",
                     "--w-min", "9", "--w-max", "3", *FAST)
    assert result.exit_code == 2 and "--w-min" in result.output


def test_latent_cache_is_reused_and_refused_for_other_data(parts, tmp_path):
    teacher = parts[0]
    dataset = CaptionDataset(find_records(str(_imagefolder(tmp_path / "d"))), teacher.tokenizer, 32)
    calls = []

    def encode(pixels, ids):
        calls.append(len(pixels))
        with torch.no_grad():
            return teacher.vae.encode(pixels).latent_dist.parameters, teacher.text_encoder(ids)[0]

    cached = open_or_build_cache(tmp_path / "cache", dataset, {"data": "x", "num_samples": 4}, encode, batch_size=3)
    assert calls == [3, 1] and len(cached) == 4
    item = cached[3]
    with torch.no_grad():
        moments = teacher.vae.encode(dataset[3]["pixel_values"][None]).latent_dist.parameters[0]
    # stored as float16: one rounding, EPS16/2 of each value (EPS16 if a float32 difference of the batched encode
    # crosses a rounding boundary), and fp16's subnormal spacing 2**-24 below its normal range
    torch.testing.assert_close(item["latent_moments"], moments, rtol=EPS16, atol=2.0 ** -24)
    assert item["prompt_embeds"].shape == (77, 32)
    open_or_build_cache(tmp_path / "cache", dataset, {"data": "x", "num_samples": 4}, encode)
    assert calls == [3, 1]  # reused, not rebuilt
    with pytest.raises(ToolkitError, match="other data"):
        open_or_build_cache(tmp_path / "cache", dataset, {"data": "y", "num_samples": 4}, encode)


def _scaled_linear_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_output_exports_and_runs_on_onnxruntime(lcm_run, tmp_path):
    from atdiff.export.exporter import ExportSettings, run_export
    from atdiff.runtime.pipeline import Pipeline
    result = run_export(ExportSettings(model=str(lcm_run / "model"), out=tmp_path / "export"), log=lambda m: None)
    assert result.report.passed
    with Pipeline.load(result.out, backend="onnxruntime", device="cpu") as pipe:
        out = pipe(["a red cube"], steps=2, seed=0)
    assert out.arrays.shape == (1, 64, 64, 3)
