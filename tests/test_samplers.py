"""Samplers against diffusers' schedulers: same model, same initial noise, same per-step noise.

Per-step noise: diffusers' ``step(..., generator=g)`` draws ``torch.randn(shape, generator=g)`` each time
it injects noise; our ``noise(i)`` draws from a second generator seeded identically. Both streams line up
only if our samplers draw at exactly the steps diffusers does, so that is checked too.

Precision: for LCM / DDIM / DDPM the reference runs in float64 with its float32 ``alphas_cumprod``
replaced by ours, so the comparison checks the update rules to float64 rounding (the schedule itself is
compared in test_schedule.py). DPMSolverMultistepScheduler casts samples and sigmas to float32 internally,
so that comparison holds to float32 precision. Errors are relative to the magnitudes on the path (see
``parity``) and each tolerance is the rounding those samplers do (tests/tolerance.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler, UNet2DModel

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.samplers import eps_scaling, get_sampler
from atdiff.runtime.schedule import NoiseSchedule
from tolerance import EPS32, EPS64, FLOAT32_CUMPROD, assert_close_scaled, max_abs, sampler_ops_rel, scaled_error

SHAPE = (2, 3, 4, 4)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
# LCMScheduler's c_skip and c_out are float32 (t is a tensor): ~4 float32 ops each, <= 2 EPS32 per step
LCM_PER_STEP = 2 * EPS32
# DPMSolverMultistepScheduler in float32: its own float32 cumprod, and x0 = (x - sigma eps) / alpha at the first step
# scaling ~4 float32 roundings by 1/alpha (157 at t=999 on the linear schedule, 165 at lambda_min_clipped -5.1)
DPM_FLOAT32 = FLOAT32_CUMPROD + 4 * (EPS32 / 2) * 165


def toy_model(schedule: NoiseSchedule, data_std: float = 0.5):
    """The exact denoiser for N(0, data_std^2) data, bent by a small nonlinearity, returned in the schedule's
    parameterization. Plain float arithmetic, so it takes numpy arrays and torch tensors."""
    def model(x, t):
        ab = schedule.alpha_bar(int(t))
        a, s = ab ** 0.5, (1.0 - ab) ** 0.5
        var = ab * data_std ** 2 + 1.0 - ab
        bend = 0.05 * x / (1.0 + x * x)
        eps, x0 = (s / var) * x + bend, (a * data_std ** 2 / var) * x + bend
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[schedule.prediction_type]
    return model


def float64_reference(scheduler, schedule: NoiseSchedule):
    """``scheduler`` computing with our float64 alpha_bar (see the module docstring)."""
    scheduler.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod.copy())
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(schedule.final_alpha_cumprod, dtype=torch.float64)
    return scheduler


def run_diffusers(scheduler, model, x, steps, seed, **step_kwargs):
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t)), t, x, generator=gen, **step_kwargs).prev_sample
    return x, scheduler.timesteps.numpy()


def run_ours(name, schedule, model, x, steps, seed, ts_options=None, **options):
    """Our sampler on ``x`` (numpy or torch); noise(i) comes from a torch generator seeded like diffusers'."""
    sampler = get_sampler(name)
    gen = torch.Generator().manual_seed(seed)
    to_like_x = (lambda n: n.numpy()) if isinstance(x, np.ndarray) else (lambda n: n)
    calls = []

    def noise(i):
        calls.append(i)
        return to_like_x(torch.randn(x.shape, generator=gen, dtype=torch.float64 if x.dtype in (np.float64, torch.float64)
                                     else torch.float32))
    ts = sampler.timesteps(schedule, steps, **(ts_options or {}))
    return sampler.fn(model, x, schedule, ts, noise, **options), ts, calls


def parity(scheduler, name, steps, ts_options=None, step_kwargs=None, float64=True, data_std=0.5,
           relative_to="path", **options):
    """Max |ours - diffusers| over one run from the same x_T with the same noise streams, relative to the
    largest magnitude on the path (``relative_to="path"``: x_T or the result, as x0 = (x - sigma eps) / alpha
    carries rounding of |x_T|'s size) or to the result alone ("result": LCM, whose float32 error is in the
    scalings of the result's terms)."""
    schedule = NoiseSchedule.from_config(dict(scheduler.config))
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        float64_reference(scheduler, schedule)
    model = toy_model(schedule, data_std)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref, ref_ts = run_diffusers(scheduler, model, x_T.clone(), steps, seed=1, **(step_kwargs or {}))
    ours, ts, _ = run_ours(name, schedule, model, x_T.numpy().astype(np.float64), steps, 1, ts_options, **options)
    np.testing.assert_array_equal(ts, ref_ts)
    return scaled_error(ours, ref, max_abs(ref, x_T) if relative_to == "path" else max_abs(ref))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_lcm_scheduler(prediction_type, steps):
    scheduler = LCMScheduler(prediction_type=prediction_type)
    assert parity(scheduler, "lcm", steps, relative_to="result") <= steps * LCM_PER_STEP


@pytest.mark.parametrize("timestep_scaling", [10.0, 1.0])
def test_lcm_boundary_scalings_match_at_small_timesteps(timestep_scaling):
    """LCM's own grid keeps t >= 19, where c_skip is ~1e-7; a custom grid down to t=0 exercises it."""
    scheduler = LCMScheduler(timestep_scaling=timestep_scaling)
    schedule = NoiseSchedule.from_config(dict(scheduler.config))
    float64_reference(scheduler, schedule)
    model, grid = toy_model(schedule), [999, 259, 19, 3, 0]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler.set_timesteps(timesteps=grid)
    gen, x = torch.Generator().manual_seed(1), x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t)), t, x, generator=gen).prev_sample
    gen_ours = torch.Generator().manual_seed(1)
    ours = get_sampler("lcm").fn(model, x_T.numpy(), schedule, np.array(grid), lambda i: torch.randn(
        SHAPE, generator=gen_ours, dtype=torch.float64).numpy())
    assert_close_scaled(ours, x, len(grid) * LCM_PER_STEP)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing, offset, set_alpha_to_one", [("leading", 1, False), ("trailing", 0, True),
                                                               ("linspace", 0, True)])
@pytest.mark.parametrize("steps", [3, 10])
def test_ddim_matches_ddim_scheduler(prediction_type, spacing, offset, set_alpha_to_one, steps):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                              set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    assert parity(scheduler, "ddim", steps) <= sampler_ops_rel(steps, EPS64)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_ddim_scheduler_fed_the_same_noise(prediction_type, eta):
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=True)  # pixel-DDPM defaults
    assert parity(scheduler, "ddim", 10, step_kwargs={"eta": eta}, eta=eta) <= sampler_ops_rel(10, EPS64)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_eps_from_the_clipped_x0_matches_ddim_schedulers_use_clipped_model_output(eta):
    """guided-diffusion's DDIM (eps re-derived from the clipped x0). Data of std 3 puts x0 outside [-1, 1], so the
    clipping is exercised: the result differs from DDIM that keeps the network's eps."""
    def run(rederive):
        scheduler = DDIMScheduler(clip_sample=True)
        return parity(scheduler, "ddim", 10, step_kwargs={"eta": eta, "use_clipped_model_output": rederive},
                      data_std=3.0, eta=eta, use_clipped_model_output=rederive)
    assert run(True) <= sampler_ops_rel(10, EPS64) and run(False) <= sampler_ops_rel(10, EPS64)
    schedule = NoiseSchedule.from_config(dict(DDIMScheduler(clip_sample=True).config))
    x_T = np.random.default_rng(0).standard_normal(SHAPE)
    outs = [run_ours("ddim", schedule, toy_model(schedule, 3.0), x_T, 10, 1, use_clipped_model_output=flag)[0]
            for flag in (False, True)]
    assert np.abs(outs[0] - outs[1]).max() > 1e-3   # far beyond the parity tolerance: the two are told apart


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps, spacing", [(1000, "leading"), (25, "leading"), (25, "trailing"), (25, "linspace")])
def test_iddpm_matches_ddpm_scheduler(prediction_type, variance, steps, spacing):
    scheduler = DDPMScheduler(prediction_type=prediction_type, variance_type=variance, timestep_spacing=spacing)
    assert parity(scheduler, "iddpm", steps, ts_options={"spacing": spacing}) <= sampler_ops_rel(steps, EPS64)


def improved_diffusion_space_timesteps(num_timesteps: int, section_count: int) -> list[int]:
    """improved-diffusion's ``respace.space_timesteps(T, [count])`` (one section), written out as the reference."""
    frac_stride = (num_timesteps - 1) / (section_count - 1) if section_count > 1 else 1
    cur_idx, taken = 0.0, []
    for _ in range(section_count):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return sorted(set(taken), reverse=True)


@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50, 250])
def test_iddpm_default_grid_is_improved_diffusions_respacing(steps):
    """Whatever the scheduler config's own spacing, iddpm defaults to IDDPM's grid, which starts at T-1."""
    schedule = NoiseSchedule.from_config({"timestep_spacing": "leading"})
    ts = get_sampler("iddpm").timesteps(schedule, steps)
    assert ts.tolist() == improved_diffusion_space_timesteps(1000, steps)
    assert ts[0] == 999


COSINE = dict(beta_schedule="squaredcos_cap_v2")


@pytest.mark.parametrize("clip", [-5.1, -3.0])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_lambda_min_clipped_matches_dpm_solver_multistep(clip, steps):
    scheduler = DPMSolverMultistepScheduler(lambda_min_clipped=clip, **COSINE)
    assert parity(scheduler, "dpmpp_2m", steps, float64=False) <= DPM_FLOAT32
    assert scheduler.timesteps[0] < 999


def test_dpmpp_2m_cosine_default_clips_the_start_and_an_explicit_setting_wins():
    """On cosine the default lambda_min_clipped is -5.1: neither grid spends calls where alpha_bar ~ 1e-9.
    A config that sets it (diffusers saves -inf in every DPMSolverMultistepScheduler config) keeps it."""
    from atdiff.runtime.samplers.dpmpp_2m import noise_levels
    cosine = NoiseSchedule.from_config(COSINE)
    assert cosine.lambda_min_clipped == -5.1
    sampler = get_sampler("dpmpp_2m")
    linspace, logsnr = sampler.timesteps(cosine, 5), sampler.timesteps(cosine, 5, spacing="logsnr")
    for ts in (linspace, logsnr):
        assert ts[0] < 997 and cosine.alpha_bar(int(ts[0])) > 1e-5
    # exp then log of the grid's first level, 5.1 exactly: ~3 float64 roundings (libm within an ulp)
    assert math.log(noise_levels(cosine, logsnr.tolist())[0]) == pytest.approx(5.1, rel=4 * EPS64)
    assert logsnr[1] < 950   # unclipped: [999, 997, 942, 160, 0], two calls at alpha_bar < 1e-5
    unclipped = NoiseSchedule.from_config(dict(COSINE, lambda_min_clipped=-math.inf))
    assert sampler.timesteps(unclipped, 5)[0] == 999
    assert NoiseSchedule.from_config({}).lambda_min_clipped == -math.inf   # linear: as diffusers
    assert sampler.timesteps(NoiseSchedule.from_config({}), 5)[0] == 999


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["linspace", "logsnr"])
@pytest.mark.parametrize("final_sigma", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20])  # sigma_min: first-order final step below 15 steps
def test_dpmpp_2m_matches_dpm_solver_multistep(prediction_type, spacing, final_sigma, steps):
    scheduler = DPMSolverMultistepScheduler(prediction_type=prediction_type, final_sigmas_type=final_sigma,
                                            use_lu_lambdas=spacing == "logsnr")
    err = parity(scheduler, "dpmpp_2m", steps, ts_options={"spacing": spacing}, float64=False,
                 final_sigma=final_sigma)
    assert err <= DPM_FLOAT32  # ~1e-4; noise levels one timestep off show up at >4e-4, a wrong step order at >0.1


def test_dpmpp_2m_without_lower_order_final_differs_below_15_steps():
    schedule = NoiseSchedule.from_config({})
    model, x = toy_model(schedule), np.random.default_rng(0).standard_normal(SHAPE)
    a, _, _ = run_ours("dpmpp_2m", schedule, model, x, 5, 0, final_sigma="sigma_min")
    b, _, _ = run_ours("dpmpp_2m", schedule, model, x, 5, 0, final_sigma="sigma_min", lower_order_final=False)
    assert np.abs(a - b).max() > 1e-6


def test_tiny_unet_end_to_end_float32_matches_diffusers():
    """A real (tiny, random) UNet2DModel, float32 on both sides, unmodified DDPMScheduler (clip_sample on)."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()

    def model(x, t):
        with torch.no_grad():
            return unet(x, t).sample

    scheduler = DDPMScheduler()
    schedule = NoiseSchedule.from_config(dict(scheduler.config))
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref, _ = run_diffusers(scheduler, model, x_T.clone(), 5, seed=3)
    ours, _, _ = run_ours("iddpm", schedule, model, x_T.clone(), 5, 3, {"spacing": "leading"})
    assert ours.dtype == torch.float32
    # the float32 alphas_cumprod is the only difference (with ours swapped in, the two agree bit for bit)
    assert scaled_error(ours, ref, max_abs(ref, x_T)) <= FLOAT32_CUMPROD


@pytest.mark.parametrize("name, options", [("lcm", {}), ("ddim", {"eta": 0.7}), ("dpmpp_2m", {}), ("iddpm", {})])
def test_numpy_and_torch_inputs_give_the_same_result(name, options):
    schedule = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    model, x = toy_model(schedule), np.random.default_rng(0).standard_normal(SHAPE)
    on_numpy, _, _ = run_ours(name, schedule, model, x, 6, 0, **options)
    on_torch, _, _ = run_ours(name, schedule, model, torch.from_numpy(x), 6, 0, **options)
    assert isinstance(on_numpy, np.ndarray) and isinstance(on_torch, torch.Tensor)
    # the same float64 ops (up to FMA contraction in vectorized kernels): float64 rounding over the 6 steps
    assert_close_scaled(on_torch, on_numpy, sampler_ops_rel(6, EPS64), scale=max_abs(on_numpy, x))
    on_float32, _, _ = run_ours(name, schedule, model, x.astype(np.float32), 6, 0, **options)
    assert on_float32.dtype == np.float32  # Python-float arithmetic keeps the caller's dtype


@pytest.mark.parametrize("name, steps, expected_calls", [
    ("lcm", 4, [0, 1, 2]),            # re-noise between steps, not after the last
    ("ddim", 4, []),                  # eta = 0: deterministic
    ("dpmpp_2m", 4, []),
    ("iddpm", 4, [0, 1, 2]),          # 'leading' grid ends at t=0, where DDPM adds no noise
])
def test_noise_is_drawn_once_per_noisy_step_in_order(name, steps, expected_calls):
    schedule = NoiseSchedule.from_config({})
    _, _, calls = run_ours(name, schedule, toy_model(schedule), np.zeros(SHAPE), steps, 0)
    assert calls == expected_calls


def test_eps_scaling_with_factor_one_equals_plain_sampling():
    schedule = NoiseSchedule.from_config({})
    model, x = toy_model(schedule), np.random.default_rng(0).standard_normal(SHAPE)
    plain, _, _ = run_ours("ddim", schedule, model, x, 10, 0)
    scaled, _, _ = run_ours("ddim", schedule, eps_scaling(model, schedule, 1.0), x, 10, 0)
    np.testing.assert_array_equal(scaled, plain)


def test_eps_scaling_divides_eps_by_constant_or_per_timestep_factor():
    schedule = NoiseSchedule.from_config({})
    model, x = toy_model(schedule), np.random.default_rng(0).standard_normal(SHAPE)
    # per element: 1 + 2e-5 t rounds twice, the literal 1.01 once, each division once: <= 5 EPS64/2 relative
    division = 5 * EPS64 / 2
    np.testing.assert_allclose(eps_scaling(model, schedule, 1.017)(x, 500), model(x, 500) / 1.017, rtol=division)
    linear = eps_scaling(model, schedule, lambda t: 1.0 + 2e-5 * t)   # ES paper's k*t + b variant
    np.testing.assert_allclose(linear(x, 500), model(x, 500) / 1.01, rtol=division)
    with_es, _, _ = run_ours("dpmpp_2m", schedule, eps_scaling(model, schedule, 1.017), x, 10, 0)
    plain, _, _ = run_ours("dpmpp_2m", schedule, model, x, 10, 0)
    assert np.abs(with_es - plain).max() > 1e-4


def test_eps_scaling_rejects_non_epsilon_models_and_bad_factors():
    v_schedule = NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    with pytest.raises(ToolkitError, match="epsilon"):
        eps_scaling(toy_model(v_schedule), v_schedule, 1.017)
    schedule = NoiseSchedule.from_config({})
    with pytest.raises(ToolkitError, match="positive"):
        eps_scaling(toy_model(schedule), schedule, 0.0)(np.zeros(SHAPE), 10)


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(ToolkitError) as err:
        get_sampler("euler_a")
    assert all(name in str(err.value) for name in ["ddim", "dpmpp_2m", "iddpm", "lcm"])


def test_bad_timesteps_and_options_are_toolkit_errors():
    schedule = NoiseSchedule.from_config({})
    model, x = toy_model(schedule), np.zeros(SHAPE)
    for ts in [np.array([10, 500]), np.array([1000, 10]), np.array([], dtype=np.int64), np.array([9.5, 1.0])]:
        with pytest.raises(ToolkitError, match="timesteps"):
            get_sampler("ddim").fn(model, x, schedule, ts, None)
    ts = np.array([999, 500])
    with pytest.raises(ToolkitError, match="eta"):
        get_sampler("ddim").fn(model, x, schedule, ts, None, eta=-1.0)
    with pytest.raises(ToolkitError, match="fixed_large"):
        get_sampler("iddpm").fn(model, x, schedule, ts, None, variance="learned_range")
    with pytest.raises(ToolkitError, match="final_sigma"):
        get_sampler("dpmpp_2m").fn(model, x, schedule, ts, None, final_sigma="karras")
