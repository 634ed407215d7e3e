"""Fitting the saturating efficiency curves of a hardware profile to measurements (scipy).

Every curve in a `HardwareProfile` is a rate that grows with the work per call and saturates:

    y(x) = peak * x / (x + half)                  rate (FLOP/s, bytes/s)
    t(x) = x / y(x) = half / peak + x / peak      time: a fixed latency plus a bandwidth term

x is the work per call (GEMM rows, bytes per copy, KV bytes per attention call). The fit is
least squares on relative residuals r_i = (y(x_i) - y_i) / y_i (`scipy.optimize.curve_fit` with
sigma = y), so that a 4 KiB copy counts as much as a 1 GiB one; the reported error is
rel_error = sqrt(mean(r_i^2)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import curve_fit

from hrm.errors import HRMError
from hrm.hardware import SaturatingCurve

#: the fitted peak may exceed the largest measured rate by at most this factor: a saturating
#: curve extrapolated further than that from the data is a guess, not a fit
MAX_PEAK_OVER_MEASURED = 10.0


class FitError(HRMError):
    """Measurements cannot be fitted (too few points, non-positive or non-finite values)."""


def saturating_rate(x: np.ndarray, peak: float, half: float) -> np.ndarray:
    """y = peak * x / (x + half)."""
    return peak * x / (x + half)


def relative_rms_error(curve: SaturatingCurve, x: Sequence[float], y: Sequence[float]) -> float:
    """sqrt(mean(((curve(x_i) - y_i) / y_i)^2)) over the measurements."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    residuals = (saturating_rate(xs, curve.peak, curve.half) - ys) / ys
    return float(np.sqrt(np.mean(residuals**2)))


def _checked(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise FitError(f"fit needs two equal-length lists, got shapes {xs.shape} and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise FitError("fit needs finite measurements (got NaN or inf)")
    if np.any(xs <= 0) or np.any(ys <= 0):
        raise FitError("fit needs positive work sizes and rates")
    if np.unique(xs).size < 2:
        raise FitError(f"fit needs at least 2 distinct work sizes, got {np.unique(xs).size}")
    return xs, ys


def fit_saturating(x: Sequence[float], y: Sequence[float]) -> SaturatingCurve:
    """Fit y = peak * x / (x + half) to measured rates `y` at work sizes `x` (both > 0).

    Fitted in units scaled by max(x) and max(y) (the raw values span 1 to 1e15); the initial
    guess takes peak = 1.05 max(y) and half = median of x_i (peak / y_i - 1), the value each
    point alone implies. Bounds: 0 < peak <= MAX_PEAK_OVER_MEASURED * max(y), half >= 0.
    """
    xs, ys = _checked(x, y)
    x_scale, y_scale = xs.max(), ys.max()
    u, v = xs / x_scale, ys / y_scale
    peak0 = 1.05
    half0 = float(np.median(u * (peak0 / v - 1.0)))
    upper_half = 1e3 * max(1.0, half0)
    try:
        (peak, half), _ = curve_fit(
            saturating_rate, u, v, p0=(peak0, min(max(half0, 1e-9), upper_half)), sigma=v,
            bounds=((1e-9, 0.0), (MAX_PEAK_OVER_MEASURED, upper_half)), max_nfev=20_000)
    except (RuntimeError, ValueError) as exc:
        raise FitError(f"saturating-curve fit did not converge on {xs.size} points: {exc}") \
            from None
    curve = SaturatingCurve(peak=float(peak * y_scale), half=float(half * x_scale))
    return SaturatingCurve(curve.peak, curve.half, relative_rms_error(curve, xs, ys))
