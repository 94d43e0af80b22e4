"""The exposure-bias meter (eval/exposure_bias.py) on a case with a known answer, and `toolkit eval exposure-bias`.

Known answer: data x0 ~ N(mu, s^2 I) and its exact denoiser. Under q, x_t = a x0 + sigma eps (a = sqrt(abar),
sigma = sqrt(1 - abar)) has coordinates N(a mu, v), v = a^2 s^2 + sigma^2, and E[eps | x_t] = sigma/v (x_t - a mu).
A sampler driven by that denoiser at fine steps reproduces q's marginals, so the meter's mismatch (a) must be ~0;
the same denoiser with eps scaled by 1.1 must show a clear one.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from atdiff.eval.exposure_bias import MeterConfig, measure
from atdiff.runtime.samplers import get_sampler
from atdiff.runtime.schedule import NoiseSchedule
from toolkit import app

MU, S, SHAPE, N = 0.3, 0.5, (1, 8, 8), 500   # d = 64 dimensions, N trajectories and N data points
D = int(np.prod(SHAPE))
SCHEDULE = NoiseSchedule.from_config(dict(num_train_timesteps=1000, beta_schedule="linear",
                                          prediction_type="epsilon", clip_sample=False))
FINE_STEPS = 250

# Tolerance of (a), from the sample count. Each coordinate of x_t is N(a mu, v) with v <= 1 (s <= 1), so
# Var(x_j^2) = 2 v^2 + 4 a^2 mu^2 v <= 2 + 4 mu^2 = 2.36, and the mean of ||x_t||^2/d over N samples of d
# independent coordinates has standard error <= sqrt(2.36 / (N d)) = sqrt(2.36 / 32000) = 0.0086. The expected
# value abar E||x0||^2/d + 1 - abar takes E||x0||^2/d from the N data points: standard error
# sqrt((2 s^4 + 4 mu^2 s^2) / (N d)) = sqrt(0.215 / 32000) = 0.0026 (times abar <= 1). Together <= 0.0090; five
# of those: 0.045. DDIM's own discretization error at 250 steps is ~1.2/steps = 0.005 (it shrinks as 1/steps),
# well inside.
SQ_NORM_TOL = 5 * math.hypot(math.sqrt((2 + 4 * MU ** 2) / (N * D)), math.sqrt((2 * S ** 4 + 4 * MU ** 2 * S ** 2) / (N * D)))


def gaussian_data(seed: int = 123) -> np.ndarray:
    return (MU + S * np.random.default_rng(seed).standard_normal((N, *SHAPE))).astype(np.float32)


def levels(t: int) -> tuple[float, float, float]:
    ab = SCHEDULE.alpha_bar(t)
    a, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    return a, sigma, a * a * S * S + sigma * sigma


def exact_denoiser(eps_scale: float = 1.0):
    """labels -> model(x, t): the exact E[eps | x_t] of the Gaussian data, times ``eps_scale``."""
    def model(x, t):
        a, sigma, v = levels(int(t))
        return eps_scale * sigma / v * (np.asarray(x, dtype=np.float64) - a * MU)
    return lambda labels: model


def run(eps_scale: float = 1.0, sampler: str = "ddim", steps: int = FINE_STEPS, **config) -> dict:
    return measure(exact_denoiser(eps_scale), SCHEDULE, gaussian_data(), MeterConfig(sampler, steps, num=N, **config))


@pytest.fixture(scope="module")
def exact_ddim() -> dict:
    return run()


def test_exact_denoiser_under_fine_ddim_has_no_norm_mismatch(exact_ddim):
    rows = exact_ddim["rows"]
    assert [r["t"] for r in rows] == get_sampler("ddim").timesteps(SCHEDULE, FINE_STEPS).tolist()
    worst = max(abs(r["sq_norm_diff"]) for r in rows)
    assert worst <= SQ_NORM_TOL, (worst, SQ_NORM_TOL)
    assert all(abs(r["sq_norm_ratio"] - 1) <= SQ_NORM_TOL / r["q_sq_norm"] for r in rows)
    # the reported standard error is the one the tolerance was derived from (bound above, same order)
    assert all(0.2 * SQ_NORM_TOL / 5 < r["sq_norm_diff_sem"] <= SQ_NORM_TOL / 5 for r in rows)


def test_biased_denoiser_shows_a_clear_norm_mismatch():
    rows = run(eps_scale=1.1)["rows"]
    worst = max(abs(r["sq_norm_diff"]) for r in rows)
    # eps too large removes too much noise: x_t shrinks below q's norm, by ~0.5 at mid t
    assert worst > 5 * SQ_NORM_TOL, (worst, SQ_NORM_TOL)
    assert min(r["sq_norm_diff"] for r in rows) < -5 * SQ_NORM_TOL


def test_q_side_denoising_error_is_the_posterior_variance(exact_ddim):
    # eps_hat - eps is N(0, w) per coordinate with w = 1 - sigma^2 / v (Var(eps | x_t)), so its mean square over
    # N d coordinates has relative standard error sqrt(2 / (N d)) = 0.8%: five of them.
    for r in exact_ddim["rows"]:
        _, sigma, v = levels(r["t"])
        w = 1.0 - sigma ** 2 / v
        assert abs(r["q_eps_error"] - w) <= 5 * math.sqrt(2 / (N * D)) * w, (r["t"], r["q_eps_error"], w)


def test_ddim_eps_consistency_is_the_probability_flow_value(exact_ddim):
    # The exact ODE maps x_t to x0_final = mu + s/sqrt(v) (x_t - a mu) (the monotone Gaussian transport), while the
    # denoiser predicts x0_hat = mu + a s^2/v (x_t - a mu); so abar/(1-abar) E(x0_hat - x0_final)^2 =
    # abar/(1-abar) s^2 (1 - a s/sqrt(v))^2: below the q side, as the docs say for deterministic samplers. Sampling
    # error: 0.8% relative as above. DDIM's end point is off by O(1/steps), amplified in eps units as t -> 0
    # (abar/(1-abar) grows); at 250 steps that is <= 6% for t >= 200, so: 10% there.
    checked = 0
    for r in exact_ddim["rows"]:
        a, sigma, v = levels(r["t"])
        expected = a * a / sigma ** 2 * S * S * (1 - a * S / math.sqrt(v)) ** 2
        assert r["sampler_eps_consistency"] <= r["q_eps_error"] + 1e-12
        if r["t"] >= 200:
            assert abs(r["sampler_eps_consistency"] - expected) <= 0.10 * expected, (r["t"], expected)
            checked += 1
    assert checked > 150


def test_results_do_not_depend_on_the_batch_size():
    data = gaussian_data()[:12]
    one = measure(exact_denoiser(), SCHEDULE, data, MeterConfig("iddpm", 5, num=12, seed=3, batch_size=5))
    other = measure(exact_denoiser(), SCHEDULE, data, MeterConfig("iddpm", 5, num=12, seed=3))
    # same numbers, summed in another grouping (float round-off only)
    assert [list(r) for r in one["rows"]] == [list(r) for r in other["rows"]]
    for a, b in zip(one["rows"], other["rows"]):
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-9, atol=1e-12)


def test_class_conditional_batches_get_their_labels():
    seen = []

    def denoiser(labels):
        seen.append(None if labels is None else list(labels))
        return exact_denoiser()(labels)
    labels = np.array([7, 1, 4, 4, 2], dtype=np.int64)
    measure(denoiser, SCHEDULE, gaussian_data()[:5], MeterConfig("lcm", 2, num=5, batch_size=3), data_labels=labels,
            num_classes=3)
    # sampler side: sample k is class k mod 3 (as sample-fid); q side: each image's own label
    assert seen == [[0, 1, 2], [0, 1], [7, 1, 4], [4, 2]]


# ---- the command ------------------------------------------------------------------------------------------------

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["eval", "exposure-bias", *[str(a) for a in args]])


@pytest.fixture()
def rgb_data(tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    return path


def test_command_writes_json_and_plot(tiny_uncond_dir, rgb_data, tmp_path):
    out = tmp_path / "report"
    result = _run(tiny_uncond_dir, "--sampler", "ddim", "--nfe", "2", "--num", "4", "--data", rgb_data,
                  "--seed", "5", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "exposure_bias.json").read_text())
    assert [r["step"] for r in record["rows"]] == [0, 1]
    assert [r["t"] for r in record["rows"]] == record["timesteps"] and len(record["timesteps"]) == 2
    assert all(math.isfinite(r[k]) for r in record["rows"] for k in ("sq_norm_ratio", "sampler_eps_consistency",
                                                                      "q_eps_error"))
    assert record["config"]["seed"] == 5 and record["num_data"] == 4 and record["dims"] == 3 * 16 * 16
    assert "torch" in record["versions"] and record["model"]["sha256"]
    assert (out / "exposure_bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".report.*"))   # no staging left behind


@pytest.mark.parametrize("args, message", [
    (["--sampler", "euler", "--nfe", "4"], "unknown sampler 'euler'"),
    (["--sampler", "ddim", "--nfe", "0"], "--nfe must be at least 1"),
    (["--sampler", "ddim", "--nfe", "-3"], "--nfe must be at least 1"),
    (["--sampler", "ddim", "--steps", "0"], "--steps/--nfe must be at least 1"),   # --nfe: another name for --steps
    (["--sampler", "ddim", "--nfe", "2", "--num", "1"], "--num must be at least 2"),
])
def test_bad_input_is_one_error_line(tiny_uncond_dir, rgb_data, tmp_path, args, message):
    out = tmp_path / "report"
    result = _run(tiny_uncond_dir, *args, "--data", rgb_data, "--device", "cpu", "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]] and message in lines[-1]
    assert "Traceback" not in result.output and not out.exists()


def test_data_the_model_cannot_take_is_refused(tiny_uncond_dir, tmp_path):
    gray = tmp_path / "gray.npy"
    np.save(gray, np.zeros((4, 16, 16), dtype=np.uint8))
    result = _run(tiny_uncond_dir, "--sampler", "ddim", "--nfe", "2", "--num", "2", "--data", gray, "--device", "cpu",
                  "--out", tmp_path / "report")
    assert result.exit_code == 2 and "1-channel images" in result.stderr and "takes 3" in result.stderr


def test_a_folder_it_did_not_write_is_not_replaced(tiny_uncond_dir, rgb_data, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = _run(tiny_uncond_dir, "--sampler", "ddim", "--nfe", "2", "--num", "2", "--data", rgb_data,
                  "--device", "cpu", "--out", tmp_path / "mine")
    assert result.exit_code == 2 and "not an exposure-bias directory" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
