"""The exposure-bias meter: how far the x_t a sampler feeds its network drift from what training showed it.

Training sees x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with x0 from the data; sampling sees the
sampler's own x_t, built from the network's previous predictions, so errors compound (exposure bias). Per
sampling step i (timestep t_i) this measures, on ``num`` trajectories of a real sampler and ``num`` data images:

(a) E||x_t||^2/d of the sampler's x_t, against its value under q:
    E_q||x_t||^2/d = (abar E||x0||^2 + (1 - abar) d)/d, with E||x0||^2 from the data (ratio and difference);
(b) the network's eps error, both sides in the same units:
    - q side: the denoising error on q-noised data, E||eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t) - eps||^2/d
      (the training loss at t);
    - sampler side: the eps consistency E||eps_theta(x_t, t) - (x_t - sqrt(abar) x0_final)/sqrt(1-abar)||^2/d,
      x0_final the trajectory's own final sample: the bracket is the eps that would take x0_final to this x_t
      under q. It equals abar/(1-abar) E||x0_hat(x_t) - x0_final||^2/d (how far the step's predicted x0 is from
      where the chain ends), which is how it is computed. With an exact network and full-step ancestral sampling
      the chain's joint law of (x_t, x0_final) is nearly q's, so the two sides agree (but for the last steps); a
      deterministic sampler (DDIM eta=0, DPM-Solver) makes x0_final a function of x_t, which puts its value below
      the q side even for an exact network (docs/eval.md, "Exposure-bias meter").

Steps are observed by wrapping ``model(x, t)``: every sampler in runtime/samplers calls it exactly once per step
with that step's x_t (checked), so no sampler loop is copied or changed. Without sampler options each step's
noise level is the training grid's alpha_bar(t_i) for all four samplers, which is what the q side uses.

Arrays: ``measure`` runs the samplers on what ``arrays.from_numpy`` makes (a backend's device tensors, or numpy
arrays by default) and does all statistics on the host in float64.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.noise import SeededNoise, StepNoise
from atdiff.runtime.samplers import get_sampler
from atdiff.runtime.schedule import NoiseSchedule, predict_x0, predict_x0_eps

HOST = SimpleNamespace(from_numpy=lambda a: a, to_numpy=np.asarray)   # numpy in, numpy out
Q_STREAM = 1            # q-side noise seeds are (seed, Q_STREAM, i): apart from the sampler's seeds seed + i
STORE_BYTES = 1 << 29   # per batch, the float32 x0 predictions kept until the trajectory's end is known

# model(x, t) -> raw network output; a Denoiser binds a batch's class labels (None: unconditional)
Denoiser = Callable[[np.ndarray | None], Callable]


@dataclasses.dataclass(frozen=True)
class MeterConfig:
    sampler: str
    nfe: int
    num: int = 1000
    seed: int = 0
    batch_size: int | None = None    # None: what fits STORE_BYTES (results do not depend on it)

    def check(self) -> None:
        """The checks that need no model, so bad input fails before anything loads."""
        get_sampler(self.sampler)
        if self.nfe < 1:
            raise ToolkitError(f"--steps/--nfe must be at least 1 (sampling steps = network evaluations), "
                               f"got {self.nfe}")
        if self.num < 2:
            raise ToolkitError(f"--num must be at least 2 (each mean comes with its standard error), got {self.num}")
        if self.seed < 0:
            raise ToolkitError(f"--seed must be >= 0, got {self.seed}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ToolkitError(f"--batch-size must be at least 1, got {self.batch_size}")


class StepMoments:
    """Per-step running mean and standard error of a per-sample quantity."""

    def __init__(self, steps: int):
        self.count, self.total, self.squares = 0, np.zeros(steps), np.zeros(steps)

    def add(self, values: np.ndarray) -> None:
        """``values`` [steps, batch]."""
        self.count += values.shape[1]
        self.total += values.sum(axis=1)
        self.squares += (values ** 2).sum(axis=1)

    def mean(self) -> np.ndarray:
        return self.total / self.count

    def sem(self) -> np.ndarray:
        mean = self.mean()
        var = np.maximum(self.squares - self.count * mean ** 2, 0.0) / max(self.count - 1, 1)
        return np.sqrt(var / self.count)


def per_dim_sq(a: np.ndarray) -> np.ndarray:
    """||a_k||^2 / d for every sample k of a batch [B, ...]."""
    flat = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    return np.einsum("kd,kd->k", flat, flat) / flat.shape[1]


def batch_size_for(config: MeterConfig, steps: int, dims: int) -> int:
    if config.batch_size is not None:
        return config.batch_size
    return max(1, min(config.num, 500, STORE_BYTES // (4 * steps * dims)))


def sampler_trajectories(model, schedule: NoiseSchedule, sampler, timesteps: list[int], seeds: list[int],
                         shape: tuple[int, ...], arrays=HOST, tick=None) -> tuple[np.ndarray, np.ndarray]:
    """Run ``sampler`` from the seeds' noise (sample k: the stream of ``seeds[k]``, as ``toolkit generate``)
    and return, per step and sample, (||x_t||^2/d, the eps consistency) [steps, B]."""
    x_sq, x0_hats = [], []

    def observed(x, t):
        out = model(x, t)
        host_x = arrays.to_numpy(x).astype(np.float64)
        x_sq.append(per_dim_sq(host_x))
        x0 = predict_x0(arrays.to_numpy(out).astype(np.float64), host_x, schedule.alpha_bar(int(t)),
                        schedule.prediction_type)
        x0_hats.append(x0.astype(np.float32))
        if tick is not None:
            tick()
        return out

    noise = StepNoise(SeededNoise(seeds, shape), arrays)
    final = sampler.fn(observed, noise.initial(), schedule, np.asarray(timesteps, dtype=np.int64), noise)
    if len(x0_hats) != len(timesteps):  # the step <-> network call pairing everything here rests on
        raise RuntimeError(f"sampler '{sampler.name}' made {len(x0_hats)} network calls for {len(timesteps)} "
                           "steps; the exposure-bias meter needs exactly one per step")
    final = arrays.to_numpy(final).astype(np.float64)
    consistency = [_eps_units(schedule.alpha_bar(t)) * per_dim_sq(x0 - final) for t, x0 in zip(timesteps, x0_hats)]
    return np.stack(x_sq), np.stack(consistency)


def _eps_units(alpha_bar: float) -> float:
    """||eps_theta - (x_t - sqrt(ab) x0')/sqrt(1-ab)||^2 = ab/(1-ab) ||x0_hat - x0'||^2 (eps = (x_t - sqrt(ab) x0_hat)
    / sqrt(1-ab) for every parameterization)."""
    return alpha_bar / (1.0 - alpha_bar)


def q_denoising_errors(model, schedule: NoiseSchedule, timesteps: list[int], x0: np.ndarray, seeds: list,
                       arrays=HOST, tick=None) -> np.ndarray:
    """E||eps_theta(sqrt(ab) x0 + sqrt(1-ab) eps, t) - eps||^2/d per step and image [steps, B]; image k's eps
    come from the stream of ``seeds[k]``, one draw per step."""
    noise = SeededNoise(seeds, x0.shape[1:])
    errors = []
    for t in timesteps:
        ab = schedule.alpha_bar(t)
        eps = noise.draw().astype(np.float64)
        x_t = (math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * eps).astype(np.float32)
        out = arrays.to_numpy(model(arrays.from_numpy(x_t), t)).astype(np.float64)
        _, eps_hat = predict_x0_eps(out, x_t.astype(np.float64), ab, schedule.prediction_type)
        errors.append(per_dim_sq(eps_hat - eps))
        if tick is not None:
            tick()
    return np.stack(errors)


def measure(denoiser: Denoiser, schedule: NoiseSchedule, data: np.ndarray, config: MeterConfig, *,
            data_labels: np.ndarray | None = None, num_classes: int | None = None, arrays=HOST,
            progress=None) -> dict:
    """The meter over ``config.num`` sampler trajectories and the images ``data`` [N, C, H, W] (preprocessed as
    in training; ``data_labels`` for a class-conditional model, whose samples take class k mod ``num_classes``).
    Returns {"rows": one dict per step, "data_sq_norm", "data_sq_norm_sem", "num_data", "dims", "timesteps"}.
    ``progress(done, total)`` counts network evaluations."""
    config.check()
    sampler = get_sampler(config.sampler)
    timesteps = [int(t) for t in sampler.timesteps(schedule, config.nfe)]
    shape, dims = tuple(data.shape[1:]), int(np.prod(data.shape[1:]))
    batch = batch_size_for(config, len(timesteps), dims)
    done, total = [0], len(timesteps) * (config.num + len(data))

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    sampler_sq, consistency, q_error = (StepMoments(len(timesteps)) for _ in range(3))
    for lo in range(0, config.num, batch):
        index = np.arange(lo, min(lo + batch, config.num))
        labels = index % num_classes if num_classes else None
        x_sq, cons = sampler_trajectories(denoiser(labels), schedule, sampler, timesteps,
                                          [config.seed + int(k) for k in index], shape, arrays, tick)
        sampler_sq.add(x_sq)
        consistency.add(cons)
    data_sq = StepMoments(1)
    for lo in range(0, len(data), batch):
        x0 = np.asarray(data[lo:lo + batch], dtype=np.float64)
        labels = None if data_labels is None else data_labels[lo:lo + batch]
        data_sq.add(per_dim_sq(x0)[None])
        seeds = [(config.seed, Q_STREAM, lo + k) for k in range(len(x0))]
        q_error.add(q_denoising_errors(denoiser(labels), schedule, timesteps, x0, seeds, arrays, tick))
    m2, m2_sem = float(data_sq.mean()[0]), float(data_sq.sem()[0])
    return {"rows": _rows(schedule, timesteps, sampler_sq, consistency, q_error, m2, m2_sem),
            "data_sq_norm": m2, "data_sq_norm_sem": m2_sem, "num_data": len(data), "dims": dims,
            "timesteps": timesteps}


def _rows(schedule, timesteps, sampler_sq, consistency, q_error, m2: float, m2_sem: float) -> list[dict]:
    rows = []
    for i, t in enumerate(timesteps):
        ab = schedule.alpha_bar(t)
        expected, expected_sem = ab * m2 + (1.0 - ab), ab * m2_sem   # E_q||x_t||^2/d and its error from the data
        got, got_sem = float(sampler_sq.mean()[i]), float(sampler_sq.sem()[i])
        rows.append({"step": i, "t": t, "alpha_bar": ab,
                     "sampler_sq_norm": got, "sampler_sq_norm_sem": got_sem,
                     "q_sq_norm": expected, "q_sq_norm_sem": expected_sem,
                     "sq_norm_ratio": got / expected, "sq_norm_diff": got - expected,
                     "sq_norm_diff_sem": math.hypot(got_sem, expected_sem),
                     "sampler_eps_consistency": float(consistency.mean()[i]),
                     "sampler_eps_consistency_sem": float(consistency.sem()[i]),
                     "q_eps_error": float(q_error.mean()[i]), "q_eps_error_sem": float(q_error.sem()[i])})
    return rows
