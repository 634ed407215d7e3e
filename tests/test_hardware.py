"""Hardware profiles: shipped TOMLs load, round trip through TOML, malformed ones fail clearly."""

import math

import pytest

from hrm.errors import HardwareProfileError
from hrm.hardware import (
    SaturatingCurve,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    save_profile,
    shipped_profiles,
)
from hrm.units import GiB


@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_loads(name):
    hw = load_profile(name)
    assert hw.gpu.memory_bytes > 0 and hw.cpu.memory_bytes > 0
    assert hw.gpu.flops("bf16") > hw.cpu.peak_flops
    assert hw.link.h2d_pinned_bps < hw.gpu.hbm_bandwidth_bps


@pytest.mark.parametrize("name", shipped_profiles())
def test_toml_round_trip(name, tmp_path):
    hw = load_profile(name)
    path = tmp_path / f"{name}.toml"
    save_profile(hw, path)
    again = load_profile(path)
    assert again == hw
    assert again.sources == hw.sources
    assert profile_from_dict(profile_to_dict(hw)) == hw


def test_round_trip_keeps_curves_and_pinned_limit(tmp_path):
    hw = load_profile("h100")
    data = profile_to_dict(hw)
    data["curves"]["h2d"] = {"peak": {"value": 50e9}, "half": {"value": 1e6, "source": "fit"}}
    with_curve = profile_from_dict(data)
    save_profile(with_curve, tmp_path / "p.toml")
    again = load_profile(tmp_path / "p.toml")
    assert again.curves["h2d"] == SaturatingCurve(50e9, 1e6)
    assert again.link.pinned_max_bytes == 60e9
    assert math.isinf(load_profile("t4").link.pinned_max_bytes)


@pytest.mark.parametrize("text, message", [
    ("name = 't' [gpu", "malformed TOML"),
    ("name = 'x'\n[cpu]\n[link]\n", "missing \\[gpu\\]"),
])
def test_malformed_toml(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(HardwareProfileError, match=message):
        load_profile(path)


def test_out_of_range_values(tmp_path):
    data = profile_to_dict(load_profile("t4"))
    data["link"]["h2d_pinned_bps"]["value"] = -1.0
    with pytest.raises(HardwareProfileError, match="link.h2d_pinned_bps must be >= 0"):
        profile_from_dict(data)
    data = profile_to_dict(load_profile("t4"))
    data["gpu"]["memory_bytes"]["value"] = "16 GB"
    with pytest.raises(HardwareProfileError, match="must be a number"):
        profile_from_dict(data)


def test_unknown_profile_and_memory_caps():
    with pytest.raises(HardwareProfileError, match="unknown hardware"):
        load_profile("tpu-v9")
    hw = load_profile("h100").with_memory(gpu_memory_bytes=16 * GiB, cpu_memory_bytes=64 * GiB)
    assert hw.gpu.memory_bytes == 16 * GiB and hw.cpu.memory_bytes == 64 * GiB
    assert hw.sources["gpu.memory_bytes"] == "user cap"
    with pytest.raises(HardwareProfileError, match="positive"):
        load_profile("h100").with_memory(gpu_memory_bytes=-1)
    pinned = hw.with_memory(pinned_max_bytes=8 * GiB)
    assert pinned.link.pinned_max_bytes == 8 * GiB and pinned.gpu == hw.gpu
    assert pinned.sources["link.pinned_max_bytes"] == "user cap"
    with pytest.raises(HardwareProfileError, match="pinned memory budget"):
        hw.with_memory(pinned_max_bytes=float("nan"))


def test_saturating_curve():
    curve = SaturatingCurve(peak=10.0, half=5.0)
    assert curve(5.0) == pytest.approx(5.0)
    assert curve.time_s(10.0) == pytest.approx((10.0 + 5.0) / 10.0)
    assert curve(0.0) == 0.0 and curve.time_s(0.0) == 0.0
    with pytest.raises(HardwareProfileError):
        SaturatingCurve(peak=0.0, half=1.0)


def test_the_launch_factor_is_optional_and_at_least_one_when_given():
    """Interference.launch is 0 where the profile did not measure it (the GPU's factor stands
    in: hrm.cost.gpu_factors); a measured one below 1 is an error, as for the other factors."""
    from dataclasses import replace

    from hrm.cost import gpu_factors
    from hrm.hardware import profile_from_dict, profile_to_dict

    hw = load_profile("t4")
    assert hw.interference.launch == 0.0
    assert gpu_factors(hw) == (hw.interference.gpu, hw.interference.gpu)
    data = profile_to_dict(replace(hw, interference=replace(hw.interference, launch=1.2)))
    assert profile_from_dict(data).interference.launch == 1.2
    assert gpu_factors(profile_from_dict(data))[1] == 1.2
    data["interference"]["launch"] = {"value": 0.5}
    with pytest.raises(HardwareProfileError, match="launch < 1"):
        profile_from_dict(data)
