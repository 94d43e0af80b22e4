"""NoiseSchedule and the samplers' timestep grids against diffusers' schedulers (the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.samplers import dpmpp_2m, get_sampler
from atdiff.runtime.schedule import NoiseSchedule, predict_x0, predict_x0_eps, spaced_timesteps
from tolerance import EPS32, EPS64, FLOAT32_CUMPROD, assert_close_scaled, max_abs

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


def _schedule(scheduler) -> NoiseSchedule:
    return NoiseSchedule.from_config(dict(scheduler.config))


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, rescale):
    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=rescale)
    ours = _schedule(ref)
    assert ours.alphas_cumprod.dtype == np.float64 and ours.num_train_timesteps == 1000
    if not rescale:  # diffusers rescales in float32 ratios, so only its alphas_cumprod is close there
        betas = 1.0 - ours.alphas_cumprod / np.concatenate([[1.0], ours.alphas_cumprod[:-1]])
        # float32 linspace: start + i * step with step rounded errs by <= (end - start) EPS32/2, which is
        # (end / start - 1) EPS32/2 of beta_start (less on scaled_linear's sqrt grid, even squared), + 2 roundings
        linspace_rtol = (ref.config.beta_end / ref.config.beta_start + 1) * EPS32 / 2
        np.testing.assert_allclose(betas, ref.betas.double().numpy(), rtol=linspace_rtol)
    # float32 cumprod in diffusers drifts at the tail; rescaling re-derives the betas and cumprods a second time
    cumprods = 2 if rescale else 1
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(),
                               rtol=cumprods * FLOAT32_CUMPROD)
    if rescale:
        assert ours.alphas_cumprod[-1] == 0.0


def test_trained_betas_are_used():
    betas = np.linspace(1e-4, 0.02, 50)
    ours = NoiseSchedule.from_config({"trained_betas": betas.tolist(), "num_train_timesteps": 50})
    np.testing.assert_allclose(ours.alphas_cumprod, np.cumprod(1 - betas), rtol=50 * EPS64 / 2)  # 50 float64 products


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_final_alpha_cumprod_follows_set_alpha_to_one(set_alpha_to_one):
    ref = DDIMScheduler(beta_schedule="scaled_linear", set_alpha_to_one=set_alpha_to_one)
    ours = _schedule(ref)
    # diffusers' float32 1 - beta_0 (or 1.0): two float32 roundings (beta_0's own, 1 - beta_0)
    assert ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=EPS32)
    assert ours.alpha_bar(-1) == ours.final_alpha_cumprod


def test_from_config_reads_conventions_and_ignores_unknown_keys():
    config = dict(LCMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1,
                               original_inference_steps=40, timestep_scaling=5.0).config)
    config.update({"_class_name": "LCMScheduler", "some_future_key": [1, 2]})
    ours = NoiseSchedule.from_config(config)
    assert (ours.prediction_type, ours.timestep_spacing, ours.steps_offset) == ("v_prediction", "trailing", 1)
    assert (ours.original_inference_steps, ours.timestep_scaling, ours.clip_sample) == (40, 5.0, False)
    assert NoiseSchedule.from_config(dict(DDPMScheduler(variance_type="fixed_large").config)).variance_type == "fixed_large"


@pytest.mark.parametrize("bad, words", [
    ({"beta_schedule": "sigmoid"}, ["beta_schedule", "sigmoid", "scaled_linear"]),
    ({"prediction_type": "flow_prediction"}, ["prediction_type", "v_prediction"]),
    ({"timestep_spacing": "karras"}, ["timestep_spacing", "leading"]),
    ({"thresholding": True}, ["thresholding", "false"]),
])
def test_unsupported_config_names_the_problem_and_fix(bad, words):
    with pytest.raises(ToolkitError) as err:
        NoiseSchedule.from_config(bad)
    assert all(w in str(err.value) for w in words)


# ---- timestep grids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_spaced_timesteps_match_diffusers(cls, spacing, offset):
    ref = cls(timestep_spacing=spacing, steps_offset=offset)
    ours = _schedule(ref)
    for steps in [1, 2, 3, 4, 7, 10, 25, 48, 50, 61, 100, 1000]:
        ref.set_timesteps(steps)
        expected = ref.timesteps.numpy()[:steps]  # diffusers' 'trailing' adds a stray -1 for e.g. 61 steps
        np.testing.assert_array_equal(spaced_timesteps(ours, steps), expected, err_msg=f"{spacing} {steps}")
        assert spaced_timesteps(ours, steps).dtype == np.int64


@pytest.mark.parametrize("name", ["ddim", "iddpm"])
def test_ddim_and_iddpm_grids_take_a_spacing_option(name):
    ours = NoiseSchedule.from_config({"timestep_spacing": "leading"})
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(10)
    np.testing.assert_array_equal(get_sampler(name).timesteps(ours, 10, spacing="trailing"), ref.timesteps.numpy())


@pytest.mark.parametrize("original_steps", [50, 25])
def test_lcm_timesteps_match_diffusers(original_steps):
    ref = LCMScheduler(original_inference_steps=original_steps)
    ours = _schedule(ref)
    for steps in range(1, 9):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(get_sampler("lcm").timesteps(ours, steps), ref.timesteps.numpy())
    ref.set_timesteps(4, original_inference_steps=10)
    np.testing.assert_array_equal(get_sampler("lcm").timesteps(ours, 4, original_inference_steps=10),
                                  ref.timesteps.numpy())
    with pytest.raises(ToolkitError, match="1 to"):
        get_sampler("lcm").timesteps(ours, original_steps + 1)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_dpmpp_2m_linspace_timesteps_match_diffusers(beta_schedule):
    ref = DPMSolverMultistepScheduler(beta_schedule=beta_schedule)
    ours = _schedule(ref)
    for steps in [1, 2, 3, 5, 10, 14, 15, 20, 50, 1000]:
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(get_sampler("dpmpp_2m").timesteps(ours, steps, spacing="linspace"),
                                      ref.timesteps.numpy(), err_msg=f"{steps} steps")


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_dpmpp_2m_logsnr_grid_matches_diffusers_lu_lambdas(beta_schedule):
    """diffusers derives this grid from float32 alphas_cumprod: its smallest sigma, sqrt(1 - alpha_bar_0)
    over alpha_bar_0, is only good to EPS32 / (4 beta_0) (~3e-4 for beta_0 = 1e-4: float32 alpha_bar_0
    rounds by EPS32/2 near 1, which is EPS32 / (2 beta_0) of 1 - alpha_bar_0, halved by the sqrt), its
    largest carries half the cumprod's error, and the levels between are log-uniform between the two.
    A fractional timestep within that error of x.5 can round the other way, so a couple of entries may
    differ by one (for the linear schedule none do below 26 steps)."""
    ref = DPMSolverMultistepScheduler(beta_schedule=beta_schedule, use_lu_lambdas=True)
    ours = _schedule(ref)
    sigma_rtol = EPS32 / (4 * (1 - ours.alphas_cumprod[0])) + FLOAT32_CUMPROD / 2
    for steps in [1, 2, 3, 5, 10, 14, 15, 20, 50, 100]:
        ref.set_timesteps(steps)
        ts = dpmpp_2m.timesteps(ours, steps, spacing="logsnr")
        mismatched = ts != ref.timesteps.numpy()
        assert mismatched.sum() <= 2 and np.abs(ts - ref.timesteps.numpy()).max() <= 1, f"{steps} steps"
        if beta_schedule == "linear" and steps <= 25:
            assert not mismatched.any(), f"{steps} steps"
        if not mismatched.any():
            np.testing.assert_allclose(dpmpp_2m.noise_levels(ours, list(ts)), ref.sigmas.numpy()[:-1], rtol=sigma_rtol)


def test_bad_step_counts_are_toolkit_errors():
    ours = NoiseSchedule.from_config({})
    for name in ["ddim", "iddpm", "dpmpp_2m", "lcm"]:
        with pytest.raises(ToolkitError):
            get_sampler(name).timesteps(ours, 0)
    with pytest.raises(ToolkitError, match="spacing"):
        get_sampler("dpmpp_2m").timesteps(ours, 10, spacing="karras")


# ---- parameterization helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_eps_inverts_each_parameterization(prediction_type):
    rng = np.random.default_rng(0)
    x0, eps, ab = rng.standard_normal(8), rng.standard_normal(8), 0.3
    x = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
    output = {"epsilon": eps, "sample": x0,
              "v_prediction": ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0}[prediction_type]
    got_x0, got_eps = predict_x0_eps(output, x, ab, prediction_type)
    # ~6 float64 roundings (building x and output, then inverting), the inversion dividing by sqrt(ab) at worst
    rel, scale = 6 * EPS64 / min(ab, 1 - ab) ** 0.5, max_abs(x0, eps)
    assert_close_scaled(got_x0, x0, rel, scale, "x0")
    assert_close_scaled(got_eps, eps, rel, scale, "eps")
    assert_close_scaled(predict_x0(torch.from_numpy(output), torch.from_numpy(x), ab, prediction_type), x0, rel, scale,
                        "x0 from torch")


@pytest.mark.parametrize("class_name, clips", [("DDIMScheduler", True), ("DDPMScheduler", True),
                                               ("LCMScheduler", False), ("DPMSolverMultistepScheduler", False)])
def test_clip_sample_default_follows_diffusers_when_the_config_omits_it(class_name, clips):
    import diffusers
    assert NoiseSchedule.from_config({"_class_name": class_name}).clip_sample == clips
    default = getattr(diffusers, class_name)().config.get("clip_sample", False)
    assert default == clips
