"""Parity tolerances stated relative to the magnitude compared, so they follow from the arithmetic on the
path (rounding unit per op, times the number of ops, times any amplification) and not from one machine's
result. Roundings are to nearest: one op in a format with machine epsilon EPS errs by at most EPS / 2."""
from __future__ import annotations

import numpy as np

EPS64 = float(np.finfo(np.float64).eps)   # 2.2e-16
EPS32 = float(np.finfo(np.float32).eps)   # 1.19e-7
EPS16 = float(np.finfo(np.float16).eps)   # 9.8e-4


def as_float64(x) -> np.ndarray:
    """numpy copy in float64 of an array, a torch tensor (any device or dtype) or a number."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs(*arrays) -> float:
    """Largest |value| over all of ``arrays`` (the magnitude the rounding errors are relative to)."""
    return max(float(np.abs(as_float64(a)).max(initial=0.0)) for a in arrays)


def scaled_error(got, ref, scale: float | None = None) -> float:
    """max |got - ref| / scale, scale defaulting to max |ref|; shapes must match."""
    got, ref = as_float64(got), as_float64(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != reference's {ref.shape}"
    scale = max_abs(ref) if scale is None else scale
    err = float(np.abs(got - ref).max(initial=0.0))
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def assert_close_scaled(got, ref, rel: float, scale: float | None = None, what: str = ""):
    """|got - ref| <= rel * scale everywhere (scale defaulting to max |ref|): an absolute bound derived
    from a relative one, since the rounding of a sum is relative to its largest terms, not to each
    element (an element near zero carries the error of its neighbours' magnitude)."""
    err = scaled_error(got, ref, scale)
    label = f"{what}: " if what else ""
    assert err <= rel, f"{label}max |got - ref| is {err:.3g} of the scale, over the {rel:.3g} allowed"
