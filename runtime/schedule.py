"""The noise schedule as data, built from a diffusers ``scheduler_config.json`` dict.

A ``NoiseSchedule`` holds what every sampler needs and nothing that changes during sampling: the
training grid's ``alphas_cumprod`` (float64), the model's parameterization and diffusers' timestep
conventions. Samplers read it and keep no state of their own (see ``runtime/samplers``).

The beta schedules and timestep spacings reproduce diffusers' ``DDPMScheduler`` / ``DDIMScheduler``
(``set_timesteps``) so the same config gives the same grid, but are computed in float64 with numpy:
diffusers' schedulers are torch-only (and keep ``alphas_cumprod`` in float32), and ``runtime/`` must
run without torch.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from atdiff.runtime.config_checks import MAX_TIMESTEPS, Config, is_number
from atdiff.runtime.errors import ToolkitError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    alphas_cumprod: np.ndarray            # float64 [T]: alpha_bar_t on the training grid t = 0..T-1
    prediction_type: str = "epsilon"      # what the model outputs: epsilon | v_prediction | sample
    final_alpha_cumprod: float = 1.0      # alpha_bar "before" t=0 (diffusers' set_alpha_to_one)
    timestep_spacing: str = "leading"     # default grid for DDIM / DDPM respacing
    steps_offset: int = 0                 # added to 'leading' timesteps (Stable Diffusion uses 1)
    original_inference_steps: int = 50    # LCM: the distillation grid the few-step grid is taken from
    timestep_scaling: float = 10.0        # LCM: boundary-condition scaling of t (c_skip / c_out)
    clip_sample: bool = False             # clip predicted x0 to +-clip_sample_range (pixel DDPM/DDIM)
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"    # DDPM ancestral variance (iddpm sampler default)
    beta_schedule: str = "linear"         # kept because DPM-Solver's logSNR grid rounds differently for cosine
    # DPM-Solver starts no higher than the timestep where lambda = log(alpha/sigma) falls below this
    # (diffusers' ``lambda_min_clipped``); see ``default_lambda_min_clipped``.
    lambda_min_clipped: float = -math.inf

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (``scheduler_config.json`` as a dict); keys this
        runtime does not use (``_class_name``, solver settings, ...) are ignored; those it uses are checked
        (``check_scheduler_config``) before any array is made."""
        check_scheduler_config(Config(dict(config), "scheduler config", SCHEDULER_FIX))
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ToolkitError(f"scheduler prediction_type '{prediction_type}' is not supported; "
                               f"use one of {', '.join(PREDICTION_TYPES)} in scheduler_config.json")
        spacing = config.get("timestep_spacing", "leading")
        _check_spacing(spacing)
        if config.get("thresholding", False):
            raise ToolkitError("scheduler_config.json asks for dynamic thresholding, which this runtime does "
                               "not implement; set \"thresholding\": false (clip_sample still works)")
        alphas_cumprod = np.cumprod(1.0 - _betas(config))
        first = float(alphas_cumprod[0])
        return cls(
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            final_alpha_cumprod=1.0 if config.get("set_alpha_to_one", True) else first,
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
            original_inference_steps=int(config.get("original_inference_steps") or 50),
            timestep_scaling=float(config.get("timestep_scaling", 10.0)),
            clip_sample=bool(config.get("clip_sample", _CLIPS_BY_DEFAULT.get(config.get("_class_name"), False))),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            variance_type=config.get("variance_type") or "fixed_small",
            beta_schedule=config.get("beta_schedule", "linear"),
            lambda_min_clipped=float(config.get("lambda_min_clipped",
                                                default_lambda_min_clipped(config.get("beta_schedule", "linear")))),
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at training timestep ``t`` as a Python float; ``t < 0`` is the step past the end
        of the chain, ``final_alpha_cumprod`` (DDIM / LCM convention)."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


SCHEDULER_FIX = "fix scheduler_config.json (or re-create the model)"


def check_scheduler_config(config: Config) -> None:
    """The keys ``from_config`` reads, typed and bounded, and its names among the supported ones: the grid
    (num_train_timesteps, trained_betas) is what it allocates, so a crafted 5e8 fails here instead of in
    np.linspace. Called on every scheduler config a model or an export brings, before any network loads."""
    steps = config.integer("num_train_timesteps", 1, MAX_TIMESTEPS, 1000)
    for key in ("beta_start", "beta_end"):
        config.number(key, 0.0, 1.0, None)
    config.text("prediction_type", None, choices=PREDICTION_TYPES)
    config.text("timestep_spacing", None, choices=TIMESTEP_SPACINGS)
    config.text("_class_name", None)
    if config.data.get("trained_betas") is None:   # trained betas replace the named schedule
        config.text("beta_schedule", None, choices=BETA_SCHEDULES)
    config.text("variance_type", None, nullable=True)
    config.integer("steps_offset", 0, steps, 0)
    config.integer("original_inference_steps", 1, MAX_TIMESTEPS, None, nullable=True)
    config.number("timestep_scaling", 0.0, 1e6, None)
    config.number("clip_sample_range", 0.0, 1e6, None)
    config.number("lambda_min_clipped", -math.inf, math.inf, None)
    for key in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr"):
        config.flag(key, False)
    betas = config.data.get("trained_betas")
    if betas is not None and not _valid_betas(betas):
        raise config.error("trained_betas", betas, f"null or a list of 1 to {MAX_TIMESTEPS} numbers in [0, 1]")


def _valid_betas(betas) -> bool:
    if isinstance(betas, np.ndarray):   # passed in code (tests build schedules from arrays)
        return (betas.ndim == 1 and 1 <= betas.size <= MAX_TIMESTEPS and np.issubdtype(betas.dtype, np.floating)
                and bool(np.all((betas >= 0) & (betas <= 1))))
    return (isinstance(betas, (list, tuple)) and 1 <= len(betas) <= MAX_TIMESTEPS
            and all(is_number(b) and 0.0 <= b <= 1.0 for b in betas))


def default_lambda_min_clipped(beta_schedule: str) -> float:
    """DPM-Solver's clipping of lambda when the scheduler config does not set ``lambda_min_clipped``.

    The cosine schedule ends at alpha_bar(999) = 2.4e-9: a solver starting there multiplies any eps error by
    1/sqrt(alpha_bar) ~ 2e4 in its first data prediction, and its logSNR grid spends calls near t=999. -5.1
    (alpha_bar ~ 3.7e-5, t ~ 996 on cosine; the value diffusers documents for cosine models) removes that
    tail; it is about where the linear DDPM schedule ends by itself (lambda(999) = -5.07), so linear and
    scaled_linear schedules are left as they are (-inf, diffusers' default)."""
    return -5.1 if beta_schedule == "squaredcos_cap_v2" else -math.inf


# diffusers' defaults for a config that omits clip_sample (hand-written ones; save_pretrained writes it)
_CLIPS_BY_DEFAULT = {"DDIMScheduler": True, "DDPMScheduler": True}


def _betas(config: dict) -> np.ndarray:
    """float64 betas as diffusers computes them (there in float32), then zero-terminal-SNR rescaling."""
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    name = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif name == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
    elif name == "squaredcos_cap_v2":
        betas = _cosine_betas(steps)
    else:
        raise ToolkitError(f"scheduler beta_schedule '{name}' is not supported; use one of "
                           f"{', '.join(BETA_SCHEDULES)} (or trained_betas) in scheduler_config.json")
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """GLIDE / improved-DDPM cosine schedule (diffusers' ``betas_for_alpha_bar``, 'cosine')."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
                     for i in range(steps)], dtype=np.float64)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 (diffusers' ``rescale_zero_terminal_snr``): shift and scale
    sqrt(alpha_bar) so the last timestep has zero SNR and the first keeps its value."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def _check_spacing(spacing: str) -> None:
    if spacing not in TIMESTEP_SPACINGS:
        raise ToolkitError(f"timestep_spacing '{spacing}' is not supported; use one of {', '.join(TIMESTEP_SPACINGS)}")


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> np.ndarray:
    """``steps`` descending training timesteps, as diffusers' DDIM/DDPM ``set_timesteps`` picks them.

    'leading': multiples of T//steps plus ``steps_offset``; 'trailing': round(T - k*T/steps) - 1, so the
    first step is t=T-1; 'linspace': round(linspace(0, T-1, steps)). (Lin et al. 2023, Table 2.)
    """
    spacing = spacing or schedule.timestep_spacing
    _check_spacing(spacing)
    total = schedule.num_train_timesteps
    if not 1 <= int(steps) <= total:
        raise ToolkitError(f"steps must be between 1 and the model's {total} training timesteps, got {steps}")
    steps = int(steps)
    if spacing == "leading":
        ts = np.arange(0, steps)[::-1] * (total // steps) + schedule.steps_offset
    elif spacing == "trailing":
        # For some step counts (61, 103, ...) float round-off makes this arange one element longer, and
        # diffusers then returns an extra timestep -1; we keep the first `steps`, which match it.
        ts = (np.round(np.arange(total, 0, -total / steps)) - 1)[:steps]
    else:
        ts = np.linspace(0, total - 1, steps).round()[::-1]
    return ts.astype(np.int64)


def predict_x0(output, x, alpha_bar: float, prediction_type: str):
    """The model's estimate of the clean sample x0 from its raw ``output`` at noise level ``alpha_bar``
    (x_t = sqrt(ab) x0 + sqrt(1-ab) eps; v = sqrt(ab) eps - sqrt(1-ab) x0, Salimans & Ho 2022)."""
    a, s = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (x - s * output) / a
    if prediction_type == "v_prediction":
        return a * x - s * output
    if prediction_type == "sample":
        return output
    raise _unsupported(prediction_type)


def predict_x0_eps(output, x, alpha_bar: float, prediction_type: str):
    """(x0, eps) estimated from the raw model ``output``; see ``predict_x0`` (kept separate so samplers
    that need only x0 skip eps's extra array operations every step)."""
    a, s = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, a * output + s * x
    if prediction_type == "sample":
        return output, (x - a * output) / s
    raise _unsupported(prediction_type)


def _unsupported(prediction_type: str) -> ToolkitError:
    return ToolkitError(f"prediction_type '{prediction_type}' is not supported; use one of {', '.join(PREDICTION_TYPES)}")
