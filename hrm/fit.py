"""Fitting the saturating efficiency curves of a hardware profile to measurements (scipy).

Every curve in a `HardwareProfile` is a rate that grows with the work per call and saturates:

    y(x) = peak * x / (x + half)                  rate (FLOP/s, bytes/s)
    t(x) = x / y(x) = half / peak + x / peak      time: a fixed latency plus a bandwidth term

x is the work per call (GEMM rows, bytes per copy, KV bytes per attention call). The fit is
least squares on relative residuals r_i = (y(x_i) - y_i) / y_i (`scipy.optimize.curve_fit` with
sigma = y), so that a 4 KiB copy counts as much as a 1 GiB one; the reported error is
rel_error = sqrt(mean(r_i^2)).

A benchmark that stalled (a thread descheduled, a page fault storm) can measure a rate ten times
too low at one size, and squared residuals let that one point pull the whole curve.
`fit_saturating_robust` therefore fits once on log residuals log(y(x_i) / y_i) with a soft-L1
loss (linear, not quadratic, in large residuals; symmetric in too fast and too slow), leaves out
the points more than OUTLIER_FACTOR off that fit, and fits the rest by least squares as above;
the points left out are returned, so the profile can say which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit, least_squares

from hrm.errors import HRMError
from hrm.hardware import SaturatingCurve

#: the fitted peak may exceed the largest measured rate by at most this factor: a saturating
#: curve extrapolated further than that from the data is a guess, not a fit
MAX_PEAK_OVER_MEASURED = 10.0

#: a measured rate more than this factor above or below the robust fit is an outlier
OUTLIER_FACTOR = 2.0

#: the robust fit's residual scale: log residuals beyond ~0.1 (10%) count linearly, not squared
ROBUST_F_SCALE = 0.1


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


def _initial_guess(u: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """(peak0, half0, upper bound of half) in scaled units: peak0 = 1.05 max(v), half0 = median
    of u_i (peak0 / v_i - 1), the value each point alone implies."""
    peak0 = 1.05
    half0 = float(np.median(u * (peak0 / v - 1.0)))
    upper_half = 1e3 * max(1.0, half0)
    return peak0, min(max(half0, 1e-9), upper_half), upper_half


def _scaled_curve(peak: float, half: float, xs: np.ndarray, ys: np.ndarray) -> SaturatingCurve:
    curve = SaturatingCurve(peak=float(peak * ys.max()), half=float(half * xs.max()))
    return SaturatingCurve(curve.peak, curve.half, relative_rms_error(curve, xs, ys))


def _least_squares_fit(xs: np.ndarray, ys: np.ndarray) -> SaturatingCurve:
    """Least squares on relative residuals, in units scaled by max(x) and max(y)."""
    u, v = xs / xs.max(), ys / ys.max()
    peak0, half0, upper_half = _initial_guess(u, v)
    try:
        (peak, half), _ = curve_fit(
            saturating_rate, u, v, p0=(peak0, half0), sigma=v,
            bounds=((1e-9, 0.0), (MAX_PEAK_OVER_MEASURED, upper_half)), max_nfev=20_000)
    except (RuntimeError, ValueError) as exc:
        raise FitError(f"saturating-curve fit did not converge on {xs.size} points: {exc}") \
            from None
    return _scaled_curve(peak, half, xs, ys)


def _soft_l1_log_fit(xs: np.ndarray, ys: np.ndarray) -> SaturatingCurve:
    """Soft-L1 fit of log y(x_i) to log y_i (robust to a few points far off the curve)."""
    u, v = xs / xs.max(), ys / ys.max()
    peak0, half0, upper_half = _initial_guess(u, v)

    def log_residuals(p: np.ndarray) -> np.ndarray:
        return np.log(saturating_rate(u, p[0], p[1]) / v)

    result = least_squares(log_residuals, x0=(peak0, max(half0, 1e-9)), loss="soft_l1",
                           f_scale=ROBUST_F_SCALE, max_nfev=20_000,
                           bounds=((1e-9, 1e-12), (MAX_PEAK_OVER_MEASURED, upper_half)))
    return _scaled_curve(*result.x, xs, ys)


def fit_saturating(x: Sequence[float], y: Sequence[float]) -> SaturatingCurve:
    """Fit y = peak * x / (x + half) to measured rates `y` at work sizes `x` (both > 0).

    Fitted in units scaled by max(x) and max(y) (the raw values span 1 to 1e15); the initial
    guess takes peak = 1.05 max(y) and half = median of x_i (peak / y_i - 1), the value each
    point alone implies. Bounds: 0 < peak <= MAX_PEAK_OVER_MEASURED * max(y), half >= 0.
    """
    return _least_squares_fit(*_checked(x, y))


@dataclass(frozen=True)
class RobustFit:
    """A curve fitted without its outliers, and the indices of the points left out."""

    curve: SaturatingCurve
    outliers: tuple[int, ...]


def fit_saturating_robust(x: Sequence[float], y: Sequence[float]) -> RobustFit:
    """`fit_saturating` on the points within OUTLIER_FACTOR of a first, soft-L1 fit.

    Points are left out only while at least 3 remain at 2 or more distinct sizes; with no
    outlier the curve is exactly `fit_saturating(x, y)`.
    """
    xs, ys = _checked(x, y)
    first = _soft_l1_log_fit(xs, ys)
    ratio = ys / saturating_rate(xs, first.peak, first.half)
    keep = (ratio <= OUTLIER_FACTOR) & (ratio >= 1.0 / OUTLIER_FACTOR)
    if keep.all() or keep.sum() < 3 or np.unique(xs[keep]).size < 2:
        return RobustFit(_least_squares_fit(xs, ys), ())
    outliers = tuple(int(i) for i in np.flatnonzero(~keep))
    return RobustFit(_least_squares_fit(xs[keep], ys[keep]), outliers)
