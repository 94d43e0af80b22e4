"""ADM / ADM-AT / ADM-IP training: the formulas, free AT's mechanics (Algorithm 1), exact resume, the
saved pipeline running in runtime/, the CLI, the data loaders and the bad-input errors."""
from __future__ import annotations

import gzip
import json
import math
import pickle
import struct
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import requires_cuda, requires_fashion_mnist
from atdiff.runtime.errors import ToolkitError
from atdiff.train.adm.adm_cli import train_adm
from atdiff.train.adm.adm_losses import (ADMObjective, Draw, FreeATObjective, InputPerturbationObjective, NoiseLevels,
                              at_target, ip_input, noisy_input, per_sample_mse)
from atdiff.train.core.adversarial import ascend, free_at_steps, init_delta, per_sample_norm, project_, radius_for
from atdiff.train.core.image_data import load_image_dataset
from atdiff.train.adm.presets import LINEAR_1000, build_model, unet_config
from atdiff.train.adm.timestep_sampler import LossSecondMomentSampler, UniformSampler
from tolerance import EPS32, EPS64, assert_close_scaled, max_abs


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each training run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory):
    """24 random 16x16 RGB images with 3 classes, as an .npz (x, y)."""
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 3, 24))
    return path


def run_options(data, out, **overrides) -> dict:
    base = dict(data=str(data), out=out, preset="tiny", init=None, resolution=None, batch_size=4, lr=1e-3,
                max_steps=2, ema_decay=0.9, mixed_precision="no", device="cpu", seed=0, save_every=0, resume=False,
                grad_accum=1, class_cond=False, timestep_sampler="uniform", max_grad_norm=0.0, lr_warmup_steps=0,
                export_weights="ema", num_workers=0, log_every=1, progress=False, adv_steps=3, adv_lr=0.1,
                adv_max_norm=0.1, adv_target_grad="full", ema_warmup=None,
                ip_gamma=0.15)
    return {**base, **overrides}


def safetensors_of(directory):
    from safetensors.torch import load_file
    return load_file(str(next(directory.rglob("*.safetensors"))))


class FakeContext:
    """A StepContext stand-in that records each ``update`` (loss, parameter gradients) without
    stepping the optimizer, so objectives can be compared on one fixed model."""

    def __init__(self, model, seed: int = 0):
        self.model, self.generator = model, torch.Generator().manual_seed(seed)
        self.accelerator = SimpleNamespace(num_processes=1, optimizer_step_was_skipped=False)
        self.updates: list[tuple[float, dict[str, torch.Tensor]]] = []

    def update(self, micro_batches, loss_fn):
        total = 0.0
        for i, mb in enumerate(micro_batches):
            loss = loss_fn(i, mb)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        self.updates.append((total / len(micro_batches), grads))
        return total / len(micro_batches)


class RecordingModel(torch.nn.Module):
    """eps_theta(x, t) = w * x + b, recording its inputs; output shaped like diffusers' (.sample)."""

    def __init__(self):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.tensor(0.7)), torch.nn.Parameter(torch.tensor(0.1))
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, class_labels=None):
        self.inputs.append((x.detach().clone(), t.clone()))
        return SimpleNamespace(sample=self.w * x + self.b)


def linear_levels() -> NoiseLevels:
    return NoiseLevels(dict(LINEAR_1000))


# ---- the formulas -------------------------------------------------------------------------------
def test_noise_levels_match_the_ddpm_linear_schedule():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    t = torch.tensor([0, 499, 999])
    a, s = linear_levels().coefficients(t, torch.zeros(3, 1, 2, 2))
    # float64 schedule and sqrt, then one cast to float32: <= EPS32/2 of each value (float64's part ~1e-16)
    np.testing.assert_allclose(a.flatten().numpy(), np.sqrt(abar[[0, 499, 999]]), rtol=EPS32)
    np.testing.assert_allclose(s.flatten().numpy(), np.sqrt(1 - abar[[0, 499, 999]]), rtol=EPS32)


def test_at_loss_equals_the_formula_on_hand_made_tensors():
    x0 = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.2, 0.3], [-0.4, 0.9]]]])
    eps = torch.tensor([[[[0.1, 0.2], [-0.3, 0.4]]], [[[1.0, -0.5], [0.0, 0.25]]]])
    delta = torch.tensor([[[[0.05, 0.0], [0.0, -0.05]]], [[[0.0, 0.1], [0.1, 0.0]]]])
    a, s = torch.tensor([0.8, 0.6]).view(2, 1, 1, 1), torch.tensor([0.6, 0.8]).view(2, 1, 1, 1)
    model = RecordingModel()
    draw = Draw(t=torch.tensor([3, 7]), weights=torch.tensor([1.0, 3.0]), eps=eps, sqrt_abar=a, sqrt_one_minus=s)
    loss = FreeATObjective(linear_levels(), UniformSampler(1000)).at_loss(model, {"x": x0}, draw, delta)
    expected = []
    for i in range(2):  # written out per sample, independently of the vectorised code
        x_in = a[i] * x0[i] + s[i] * eps[i] + delta[i]
        residual = (0.7 * x_in + 0.1) - eps[i] - delta[i] / s[i]
        expected.append(residual.pow(2).mean() * draw.weights[i])
    # float32, in another order: ~11 roundings build the residual (of up to its terms' size M), squaring doubles
    # them (relative to M^2), the means and weights ~6 more; each <= EPS32/2
    terms = max_abs(a * x0 + s * eps + delta, eps, delta / s)
    assert_close_scaled(loss, torch.stack(expected).mean(), 14 * EPS32, scale=terms ** 2 * max_abs(draw.weights))
    # two products and two sums on each side
    assert_close_scaled(model.inputs[0][0], a * x0 + s * eps + delta, 4 * EPS32, scale=max_abs(a * x0, s * eps, delta))


def test_delta_step_increases_the_loss_to_first_order():
    torch.manual_seed(0)
    model = build_model(unet_config("tiny", 3, 16, None)).double()
    x0, eps = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1, torch.randn(3, 3, 16, 16, dtype=torch.float64)
    abar = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64).view(3, 1, 1, 1)
    draw = Draw(t=torch.tensor([100, 400, 800]), weights=torch.ones(3, dtype=torch.float64), eps=eps,
                sqrt_abar=abar.sqrt(), sqrt_one_minus=(1 - abar).sqrt())
    objective = FreeATObjective(linear_levels(), UniformSampler(1000))
    delta = init_delta(x0).double().detach().requires_grad_(True)
    loss0 = objective.at_loss(model, {"x": x0}, draw, delta)
    loss0.backward()
    g = delta.grad.clone()
    h = 1e-4
    ascend(delta, h, radius=None)
    with torch.no_grad():
        loss1 = objective.at_loss(model, {"x": x0}, draw, delta)
    predicted = h * per_sample_norm(g).sum()  # <g_i, h g_i/|g_i|> summed over samples
    assert loss1 > loss0
    assert abs((loss1 - loss0).item() / predicted.item() - 1) < 1e-2


def test_one_inner_step_with_zero_adv_lr_is_the_plain_ddpm_loss_and_gradients():
    torch.manual_seed(0)
    model = build_model(unet_config("tiny", 3, 16, None))
    batch = [{"x": torch.rand(4, 3, 16, 16) * 2 - 1}, {"x": torch.rand(4, 3, 16, 16) * 2 - 1}]
    plain, at = FakeContext(model, seed=5), FakeContext(model, seed=5)
    ADMObjective(linear_levels(), UniformSampler(1000))(plain, batch)
    FreeATObjective(linear_levels(), UniformSampler(1000), adv_steps=1, adv_lr=0.0)(at, batch)
    assert len(plain.updates) == len(at.updates) == 1
    assert plain.updates[0][0] == at.updates[0][0]
    for name, grad in plain.updates[0][1].items():
        assert torch.equal(grad, at.updates[0][1][name]), name


def test_detached_target_drops_only_the_targets_term_from_deltas_gradient():
    """'full' ascends d/d(delta) of the whole loss; 'detach' (the authors' script) leaves out the
    -1/sqrt(1-abar) of the target: per element, grad_detach / grad_full = w / (w - 1/s) for eps = w x + b.
    The loss and the parameters' gradients are the same."""
    x0, eps = torch.rand(2, 1, 2, 2) * 2 - 1, torch.randn(2, 1, 2, 2)
    s = torch.tensor([0.6, 0.8]).view(2, 1, 1, 1)
    draw = Draw(t=torch.tensor([3, 7]), weights=torch.ones(2), eps=eps, sqrt_abar=(1 - s * s).sqrt(), sqrt_one_minus=s)
    grads = {}
    for mode in ("full", "detach"):
        model, delta = RecordingModel(), torch.full_like(x0, 0.05).requires_grad_(True)
        objective = FreeATObjective(linear_levels(), UniformSampler(1000), adv_target_grad=mode)
        objective.at_loss(model, {"x": x0}, draw, delta).backward()
        grads[mode] = (delta.grad, model.w.grad, model.b.grad)
    # products and quotients per element (autograd's 0.7 g - g / s cancels at most 2.4x): ~10 roundings of EPS32/2
    torch.testing.assert_close(grads["detach"][0], grads["full"][0] * 0.7 / (0.7 - 1 / s), rtol=5 * 2.4 * EPS32, atol=0)
    assert torch.equal(grads["detach"][1], grads["full"][1]) and torch.equal(grads["detach"][2], grads["full"][2])
    with pytest.raises(ToolkitError, match="adv-target-grad"):
        FreeATObjective(linear_levels(), UniformSampler(1000), adv_target_grad="stop")


@pytest.mark.parametrize("mode", ["full", "detach"])
def test_at_training_runs_with_either_target_gradient(tmp_path, toy_npz, mode):
    result = train_adm("adm-at", **run_options(toy_npz, tmp_path / mode, max_steps=1, adv_target_grad=mode))
    assert result.optimizer_steps == 3
    record = json.loads((tmp_path / mode / "model/training.json").read_text())
    assert record["options"]["adv_target_grad"] == mode


def test_fine_tuning_ema_continues_the_init_weights_at_a_constant_decay(tmp_path, toy_npz, tiny_uncond_dir):
    """With --init the EMA starts as the init weights and every update uses --ema-decay (no warm-up):
    after one optimizer step, ema = d * init + (1 - d) * raw. From scratch (or with --ema-warmup) diffusers'
    warm-up makes the first update a copy (ema = raw)."""
    init = safetensors_of(tiny_uncond_dir / "unet")
    tune = dict(preset=None, init=tiny_uncond_dir, max_steps=1, ema_decay=0.9)
    train_adm("adm", **run_options(toy_npz, tmp_path / "raw", export_weights="raw", **tune))
    train_adm("adm", **run_options(toy_npz, tmp_path / "ema", **tune))
    train_adm("adm", **run_options(toy_npz, tmp_path / "warm", ema_warmup=True, **tune))
    raw, ema, warm = (safetensors_of(tmp_path / name / "model") for name in ("raw", "ema", "warm"))
    assert any(not torch.equal(raw[k], init[k]) for k in raw)  # the step moved the weights
    for k in raw:
        # float32 EMA s - (1 - d)(s - p) vs d init + (1 - d) raw: <= 9 roundings of EPS32/2 of the weights' size
        assert_close_scaled(ema[k], 0.9 * init[k] + 0.1 * raw[k], 5 * EPS32, scale=max_abs(init[k], raw[k]), what=k)
        assert torch.equal(warm[k], raw[k])
    assert json.loads((tmp_path / "ema/model/training.json").read_text())["options"]["ema_warmup"] is False


def test_plain_and_k1_at_training_runs_end_with_identical_weights(tmp_path, toy_npz):
    train_adm("adm", **run_options(toy_npz, tmp_path / "plain"))
    train_adm("adm-at", **run_options(toy_npz, tmp_path / "at", adv_steps=1, adv_lr=0.0))
    a, b = safetensors_of(tmp_path / "plain/model"), safetensors_of(tmp_path / "at/model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_projection_bound_holds():
    assert radius_for((8, 3, 32, 32), 0.1) == pytest.approx(math.sqrt(3 * 32 * 32) * 0.1)
    delta = torch.randn(6, 3, 8, 8) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000]).view(6, 1, 1, 1)
    radius = radius_for(delta.shape, 0.1)
    inside = per_sample_norm(delta).flatten() <= radius
    before = delta.clone()
    project_(delta, radius)
    norms = per_sample_norm(delta).flatten()
    assert (norms <= radius * (1 + 1e-6)).all()
    assert torch.equal(delta[inside], before[inside])            # samples inside the ball are untouched
    # the rest land on it: two float32 norms (torch sums pairwise: <= log2(n) roundings, halved by the sqrt) and
    # the scaling between them
    on_ball = (math.log2(delta[0].numel()) + 2) * EPS32
    torch.testing.assert_close(norms[~inside], torch.full_like(norms[~inside], radius), rtol=on_ball, atol=0)
    leaf = init_delta(delta)
    leaf.grad = torch.randn_like(leaf)
    for _ in range(50):  # many big ascent steps never leave the ball
        leaf.grad = torch.randn_like(leaf)
        ascend(leaf, 10.0, radius)
    assert (per_sample_norm(leaf).flatten() <= radius * (1 + 1e-6)).all()


def test_free_at_keeps_x0_t_eps_and_takes_k_optimizer_steps_per_batch():
    model = RecordingModel()
    ctx = FakeContext(model)
    x0 = torch.rand(2, 1, 4, 4)
    metrics = FreeATObjective(linear_levels(), UniformSampler(1000), adv_steps=3, adv_lr=0.5,
                              adv_max_norm=1.0)(ctx, [{"x": x0}])
    assert len(ctx.updates) == 3 and len(model.inputs) == 3  # ONE forward (and backward) per inner step
    (x_first, t_first), deltas = model.inputs[0], []
    for x_in, t in model.inputs:
        assert torch.equal(t, t_first)
        deltas.append(x_in - x_first)  # same x0 and eps: the input moves only by delta
    assert torch.count_nonzero(deltas[0]) == 0                      # delta starts at 0
    # one ascent (a norm of 16 squares: <= log2(16) + 1 roundings halved by the sqrt, a division, a scaling) and
    # the norm measured (~3.5 EPS32 together), plus x_in = (a x0 + s eps) + delta's rounding (EPS32/2 of |x_in|, 16
    # of them per sample) that the difference x_in - x_first carries into the norm 0.5
    inputs = max_abs(*(x for x, _ in model.inputs))
    rel = 4 * EPS32 + math.sqrt(16) * inputs * EPS32 / 2 / 0.5
    assert per_sample_norm(deltas[1]).flatten() == pytest.approx([0.5, 0.5], rel=rel)
    assert metrics["loss_adv"] > metrics["loss_clean"]


def test_free_at_steps_ascends_between_steps_and_not_after_a_skipped_optimizer_step():
    """The shared loop (ADM-AT and LCM-AT): K updates, K-1 ascents (the last delta would never be used);
    an optimizer step skipped for an fp16 overflow leaves delta where it was (lines 8 and 9 share a gradient)."""
    x = torch.randn(2, 1, 4, 4)
    weight = torch.nn.Parameter(torch.ones(()))
    ctx = FakeContext(torch.nn.ParameterList([weight]))

    def loss_fn(i, mb, delta):
        return (weight * (mb + delta)).pow(2).sum()

    deltas = [init_delta(x)]
    losses = free_at_steps(ctx, [x], deltas, loss_fn, steps=3, step_size=0.25, radius=None)
    assert len(losses) == len(ctx.updates) == 3 and deltas[0].grad is None
    # two ascents (each: a 16-element norm, a division, a scaling, an add) and the norm measured: ~13 roundings
    assert per_sample_norm(deltas[0].detach()).flatten().tolist() == pytest.approx([0.5, 0.5], rel=8 * EPS32)
    ctx.accelerator.optimizer_step_was_skipped = True
    skipped = [init_delta(x)]
    free_at_steps(ctx, [x], skipped, loss_fn, steps=3, step_size=0.25, radius=None)
    assert torch.count_nonzero(skipped[0]) == 0 and skipped[0].grad is None


def test_one_outer_at_step_with_k3_makes_exactly_three_optimizer_steps(tmp_path, toy_npz):
    result = train_adm("adm-at", **run_options(toy_npz, tmp_path / "run", max_steps=1, adv_steps=3))
    assert result.step == 1 and result.optimizer_steps == 3
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert record["optimizer_steps"] == 3 and {"loss_clean", "loss_adv", "delta_norm"} <= set(record)


def test_ip_input_and_target_follow_the_definition():
    x0, eps, xi = torch.rand(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    a, s = torch.tensor([0.9, 0.3]).view(2, 1, 1, 1), torch.tensor([0.1, 0.7]).view(2, 1, 1, 1).sqrt()
    terms = max_abs(a * x0, s * eps, 0.15 * s * xi)   # 4 float32 roundings on each side, of up to these terms' size
    assert_close_scaled(ip_input(x0, eps, xi, 0.15, a, s), a * x0 + s * (eps + 0.15 * xi), 4 * EPS32, scale=terms)
    model = RecordingModel()
    draw = Draw(t=torch.tensor([1, 2]), weights=torch.ones(2), eps=eps, sqrt_abar=a, sqrt_one_minus=s, xi=xi)
    loss = InputPerturbationObjective(linear_levels(), UniformSampler(1000), gamma=0.15).loss(model, {"x": x0}, draw)
    x_in = model.inputs[0][0]
    assert_close_scaled(x_in, a * x0 + s * eps + 0.15 * s * xi, 5 * EPS32, scale=terms)   # 5 roundings here
    # the target is eps, not eps+gamma*xi: the same ops on the same x_in but for the model's order (~6 roundings of
    # the residual's terms, doubled by squaring, + the mean's)
    residual_terms = max_abs(0.7 * x_in + 0.1, eps)
    assert_close_scaled(loss, ((0.7 * x_in + 0.1) - eps).pow(2).mean(), 10 * EPS32, scale=residual_terms ** 2)
    assert torch.equal(noisy_input(x0, eps, a, s), a * x0 + s * eps) and torch.equal(at_target(eps, s), eps)
    assert per_sample_mse(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]


# ---- timestep samplers ----------------------------------------------------------------------------
def test_loss_second_moment_sampler_weights_and_state():
    sampler = LossSecondMomentSampler(4, history=2, uniform_prob=0.0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))  # warm-up: uniform
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3]), torch.tensor([1.0, 2, 3, 4, 1, 2, 3, 4, 8]))
    rms = torch.tensor([1.0, 2.0, 3.0, math.sqrt((16 + 64) / 2)], dtype=torch.float64)  # history of t=3: [4, 8]
    # float64: square, mean of 2, sqrt, sum of 4, divide: ~8 roundings of EPS64/2 per element on each side
    torch.testing.assert_close(sampler.probabilities(), rms / rms.sum(), rtol=8 * EPS64, atol=0)
    t, weights = sampler.sample(1000, gen, torch.device("cpu"))
    p = sampler.probabilities()
    # unbiased reweighting: the float64 1 / (N p) rounded once to float32 (<= EPS32/2), + float64's few roundings
    torch.testing.assert_close(weights.double(), 1 / (4 * p[t]), rtol=EPS32, atol=0)
    assert abs((t == 3).float().mean().item() - p[3].item()) < 0.05
    restored = LossSecondMomentSampler(4, history=2, uniform_prob=0.0)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.probabilities(), p)   # the same state, the same computation


# ---- runs: resume, runtime, CLI --------------------------------------------------------------------
def test_resume_after_n_steps_equals_an_uninterrupted_run_bitwise(tmp_path, toy_npz):
    opts = dict(max_steps=4, timestep_sampler="loss-second-moment", class_cond=True, adv_steps=2)
    train_adm("adm-at", **run_options(toy_npz, tmp_path / "whole", **opts))
    train_adm("adm-at", **run_options(toy_npz, tmp_path / "parts", **{**opts, "max_steps": 2}))
    result = train_adm("adm-at", **run_options(toy_npz, tmp_path / "parts", **opts, resume=True))
    assert result.step == 4 and result.optimizer_steps == 8
    for part in ("model", "checkpoints/step-4"):
        a, b = safetensors_of(tmp_path / "whole" / part), safetensors_of(tmp_path / "parts" / part)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}: {key}"
    # The importance sampler's loss history went through the checkpoint too (all 4 steps' losses).
    whole, parts = (sampler_state(tmp_path / name / "checkpoints/step-4") for name in ("whole", "parts"))
    assert whole["counts"].sum() == 4 * 4 * 2 and torch.equal(whole["counts"], parts["counts"])
    assert torch.equal(whole["losses"], parts["losses"])


def sampler_state(checkpoint) -> dict:
    states = [torch.load(p, weights_only=True) for p in sorted(checkpoint.glob("trainer_object_*.pt"))]
    return next(s["sampler"] for s in states if isinstance(s, dict) and "sampler" in s)


def test_resume_with_another_seed_is_refused(tmp_path, toy_npz):
    train_adm("adm", **run_options(toy_npz, tmp_path / "run", max_steps=1))
    with pytest.raises(ToolkitError, match="seed 0 -> 1"):
        train_adm("adm", **run_options(toy_npz, tmp_path / "run", max_steps=2, seed=1, resume=True))


def test_saved_pipeline_loads_in_runtime_and_samples(tmp_path, toy_npz):
    from atdiff.runtime.pipeline import Pipeline
    result = train_adm("adm-ip", **run_options(toy_npz, tmp_path / "run", class_cond=True))
    record = json.loads((result.model_dir / "training.json").read_text())
    assert record["command"] == "toolkit train adm-ip" and record["data"]["num_classes"] == 3
    assert record["data"]["fingerprint"].startswith("sha256:") and record["versions"]["torch"] == metadata.version("torch")
    assert "unet/diffusion_pytorch_model.safetensors" in record["files_sha256"]
    pipe = Pipeline.load(str(result.model_dir), backend="torch", device="cpu")
    out = pipe(num_images=2, sampler="ddim", steps=3, seed=0, class_labels=[0, 2])
    assert out.arrays.shape == (2, 16, 16, 3) and out.arrays.dtype == np.uint8
    ema = safetensors_of(result.model_dir)
    raw = safetensors_of(tmp_path / "run/checkpoints/step-2")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the export holds the EMA weights


def test_cli_trains_and_reports_bad_input_in_one_line(tmp_path, toy_npz):
    from typer.testing import CliRunner

    from toolkit import app
    prefix, runner = ["train"], CliRunner()
    args = prefix + ["adm-at", "--data", str(toy_npz), "--out", str(tmp_path / "run"), "--preset", "tiny",
                     "--batch-size", "4", "--max-steps", "1", "--device", "cpu", "--adv-steps", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run/model/model_index.json").is_file() and "2 optimizer steps" in result.output
    bad = runner.invoke(app, prefix + ["adm", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
                                       "--preset", "tiny"])
    assert bad.exit_code == 2 and "error: --data" in bad.output and "Traceback" not in bad.output


# ---- data and bad input ------------------------------------------------------------------------------
def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_cifar_and_numpy_sources_give_minus_one_to_one_images_and_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    ds = load_image_dataset(str(tmp_path), class_cond=True)
    assert (ds.info.channels, ds.info.resolution, len(ds)) == (1, 28, 5)
    item = ds[3]
    # uint8 -> [-1, 1] in float32: <= 2 roundings of EPS32/2 of magnitude 1 on each side
    assert_close_scaled(item["x"][0], torch.from_numpy(images[3]).float() / 127.5 - 1, 2 * EPS32, scale=1.0)
    assert item["label"].item() == 3
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for i in range(1, 6):
        batch = {b"data": np.full((2, 3072), i, dtype=np.uint8), b"labels": [i, i + 1]}
        (cifar / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    ds = load_image_dataset(str(cifar), class_cond=True)
    assert (len(ds), ds.info.channels, ds.info.resolution, ds[9]["label"].item()) == (10, 3, 32, 6)
    np.save(tmp_path / "nchw.npy", np.zeros((3, 3, 8, 8), dtype=np.float32))  # floats in [0, 1], NCHW
    ds = load_image_dataset(str(tmp_path / "nchw.npy"), resolution=4)
    assert ds[0]["x"].shape == (3, 4, 4) and ds[0]["x"].min().item() == -1.0


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batches_of_either_pickle_protocol_load(tmp_path, protocol):
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for i in range(1, 6):
        batch = {b"batch_label": b"training batch", b"data": np.full((2, 3072), i, dtype=np.uint8),
                 b"labels": [i, i + 1], b"filenames": [b"a.png", b"b.png"]}
        (cifar / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=protocol))
    assert len(load_image_dataset(str(cifar))) == 10


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    """issue 12: --data pointing at a crafted data_batch_* used to run code (plain pickle.loads)."""
    import os
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for i in range(1, 6):
        (cifar / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(ToolkitError, match="not an official CIFAR-10 python batch .*posix.system|os.system"):
        load_image_dataset(str(cifar))
    assert not marker.exists()


def test_image_folder_labels_sizes_and_errors(tmp_path):
    from PIL import Image
    for cls, size in (("cat", (12, 12)), ("dog", (12, 12))):
        (tmp_path / "ok" / cls).mkdir(parents=True)
        Image.new("RGB", size, (255, 0, 0)).save(tmp_path / "ok" / cls / "a.png")
    ds = load_image_dataset(str(tmp_path / "ok"), class_cond=True)
    assert ds.info.class_names == ["cat", "dog"] and ds[1]["label"].item() == 1
    assert ds[0]["x"][0].eq(1).all() and ds[0]["x"][1].eq(-1).all()
    Image.new("RGB", (20, 16)).save(tmp_path / "ok" / "dog" / "b.png")
    with pytest.raises(ToolkitError, match="different sizes.*--resolution"):
        load_image_dataset(str(tmp_path / "ok"))
    assert load_image_dataset(str(tmp_path / "ok"), resolution=8)[2]["x"].shape == (3, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolkitError, match="holds no images"):
        load_image_dataset(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ToolkitError, match="cannot read image"):
        load_image_dataset(str(tmp_path / "bad"))
    np.save(tmp_path / "nolabels.npy", np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ToolkitError, match="--class-cond needs labels"):
        load_image_dataset(str(tmp_path / "nolabels.npy"), class_cond=True)
    np.save(tmp_path / "none.npy", np.zeros((0, 8, 8), dtype=np.uint8))
    with pytest.raises(ToolkitError, match="holds no samples"):
        load_image_dataset(str(tmp_path / "none.npy"))


def test_init_checkpoint_that_does_not_fit_the_preset_fails_before_training(tmp_path, toy_npz, tiny_uncond_dir):
    with pytest.raises(ToolkitError, match="does not fit the chosen model"):
        train_adm("adm-at", **run_options(toy_npz, tmp_path / "run", preset="mnist", init=tiny_uncond_dir))
    assert not (tmp_path / "run").exists()  # nothing was trained or written
    result = train_adm("adm-at", **run_options(toy_npz, tmp_path / "ok", preset=None, init=tiny_uncond_dir,
                                                max_steps=1))
    assert result.optimizer_steps == 3  # fine-tuning with the checkpoint's own config works


@requires_cuda
def test_bf16_at_step_runs_on_gpu(tmp_path, toy_npz):
    result = train_adm("adm-at", **run_options(toy_npz, tmp_path / "run", device="cuda", mixed_precision="bf16",
                                                max_steps=1))
    assert result.optimizer_steps == 3


@requires_cuda
def test_fp16_at_with_importance_sampler_resumes_on_gpu(tmp_path, toy_npz):
    """fp16 (GradScaler, skipped steps) and the loss-second-moment sampler drawing from a CUDA generator,
    with a checkpoint and a resume in between."""
    gpu = dict(device="cuda", mixed_precision="fp16", timestep_sampler="loss-second-moment", save_every=1)
    train_adm("adm-at", **run_options(toy_npz, tmp_path / "run", max_steps=1, **gpu))
    result = train_adm("adm-at", **run_options(toy_npz, tmp_path / "run", max_steps=2, resume=True, **gpu))
    assert result.step == 2 and result.optimizer_steps == 6
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


@requires_fashion_mnist
def test_fashion_mnist_package_loads_when_installed():
    ds = load_image_dataset("fashion-mnist", class_cond=True)
    assert (len(ds), ds.info.channels, ds.info.resolution, ds.info.num_classes) == (60000, 1, 28, 10)
