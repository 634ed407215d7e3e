"""hrm.fit: the saturating-curve fit recovers known parameters from synthetic measurements."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrm.errors import HRMError
from hrm.fit import (
    MAX_PEAK_OVER_MEASURED,
    FitError,
    fit_saturating,
    fit_saturating_robust,
    relative_rms_error,
)
from hrm.hardware import SaturatingCurve


def _noisy(curve: SaturatingCurve, x: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Rates of `curve` with multiplicative log-normal noise of relative size `noise`."""
    rng = np.random.default_rng(seed)
    return curve.peak * x / (x + curve.half) * np.exp(rng.normal(0.0, noise, x.size))


def test_recovers_gemm_curve_from_noisy_rows():
    truth = SaturatingCurve(peak=760e12, half=420.0)
    rows = 2.0 ** np.arange(0, 14)  # 1 .. 8192 tokens per expert
    fit = fit_saturating(rows, _noisy(truth, rows, 0.03, seed=1))
    assert fit.peak == pytest.approx(truth.peak, rel=0.05)
    assert fit.half == pytest.approx(truth.half, rel=0.15)
    assert 0.01 < fit.rel_error < 0.06  # about the 3% noise put in


def test_recovers_link_curve_over_bytes():
    truth = SaturatingCurve(peak=54.6e9, half=2.5e5)
    sizes = 4096 * 4.0 ** np.arange(10)  # 4 KiB .. 1 GiB
    fit = fit_saturating(sizes, _noisy(truth, sizes, 0.02, seed=2))
    assert fit.peak == pytest.approx(truth.peak, rel=0.03)
    assert fit.half == pytest.approx(truth.half, rel=0.15)


@settings(max_examples=40, deadline=None)
@given(peak=st.floats(1e6, 1e15), half_over_x=st.floats(1e-2, 1e2),
       x0=st.floats(1.0, 1e6))
def test_exact_data_is_recovered(peak, half_over_x, x0):
    """Noise-free points spanning half/100 .. half*100 give back the parameters and ~0 error."""
    half = half_over_x * x0
    x = half * np.logspace(-2, 2, 9)
    fit = fit_saturating(x, peak * x / (x + half))
    assert fit.peak == pytest.approx(peak, rel=1e-3)
    assert fit.half == pytest.approx(half, rel=1e-3)
    assert fit.rel_error < 1e-4


def test_rel_error_is_rms_relative_residual():
    curve = SaturatingCurve(peak=10.0, half=1.0)
    x, y = [1.0, 3.0], [5.0 * 1.1, 7.5 * 0.8]  # +10% and -20% off the curve
    expected = math.sqrt(((1 / 1.1 - 1) ** 2 + (1 / 0.8 - 1) ** 2) / 2)
    assert relative_rms_error(curve, x, y) == pytest.approx(expected)


def test_flat_rates_fit_with_no_ramp():
    fit = fit_saturating([1e3, 1e5, 1e7], [8e9, 8e9, 8e9])
    assert fit.peak == pytest.approx(8e9, rel=1e-3)
    assert fit(1e3) == pytest.approx(8e9, rel=1e-3)


def test_unsaturated_data_caps_the_peak():
    """Rates still growing linearly at the largest size cannot pin the peak down: it stays
    within MAX_PEAK_OVER_MEASURED of the largest measured rate."""
    fit = fit_saturating([1, 2, 4, 8], [1.0, 2.0, 4.0, 8.0])
    assert fit.peak <= MAX_PEAK_OVER_MEASURED * 8.0 * (1 + 1e-9)


@pytest.mark.parametrize("x, y, match", [
    ([1.0], [1.0], "2 distinct"),
    ([2.0, 2.0], [1.0, 1.5], "2 distinct"),
    ([1.0, 2.0], [1.0], "equal-length"),
    ([1.0, 2.0], [1.0, -3.0], "positive"),
    ([0.0, 2.0], [1.0, 3.0], "positive"),
    ([1.0, 2.0], [1.0, float("nan")], "finite"),
])
def test_bad_measurements_raise_fit_error(x, y, match):
    with pytest.raises(FitError, match=match) as info:
        fit_saturating(x, y)
    assert isinstance(info.value, HRMError)


def test_robust_fit_leaves_out_a_stalled_point():
    """One call that stalled (a rate 10x low, as a CPU attention shape measured on the H200
    machine on 2026-12-01) no longer drags the curve: it is named and the rest is recovered."""
    truth = SaturatingCurve(peak=28e9, half=5e6)
    x = 3e6 * 4.0 ** np.arange(7)
    y = _noisy(truth, x, 0.05, seed=3)
    y[2] /= 10.0
    plain = fit_saturating(x, y)
    robust = fit_saturating_robust(x, y)
    assert robust.outliers == (2,)
    assert robust.curve.peak == pytest.approx(truth.peak, rel=0.1)
    assert robust.curve.rel_error < 0.1 < plain.rel_error


def test_robust_fit_without_outliers_is_the_plain_fit():
    truth = SaturatingCurve(peak=54.6e9, half=2.5e5)
    sizes = 4096 * 4.0 ** np.arange(10)
    y = _noisy(truth, sizes, 0.1, seed=4)
    robust = fit_saturating_robust(sizes, y)
    assert robust.outliers == ()
    assert robust.curve == fit_saturating(sizes, y)


def test_robust_fit_keeps_at_least_three_points():
    """With three points, one far off, there is no majority to trust: nothing is left out."""
    robust = fit_saturating_robust([1e6, 1e7, 1e8], [1e9, 1e10, 1e11 / 50])
    assert robust.outliers == ()
