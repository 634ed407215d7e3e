"""hrm profile: measurements -> profile mapping on synthetic data, the TOML round trip, and one
real `hrm profile --quick --device cpu` run through the CLI."""

import dataclasses
import json
import math
import time

import pytest
import torch
from typer.testing import CliRunner

from hrm.cli import app, main
from hrm.hardware import SaturatingCurve, load_profile, save_profile
from hrm.model import load_model_spec
from hrm.profile import (
    FULL,
    MAX_CURVE_FIT_ERROR,
    STANDIN_NOTE,
    Environment,
    Measurement,
    build_profile,
    decode_attention_call,
    executor_attention_threads,
    min_page_bytes,
)
from hrm.units import GiB, KiB, MiB
from hrm.workload import Workload

GEMM_CURVE = SaturatingCurve(peak=700e12, half=400.0)
H2D_CURVE = SaturatingCurve(peak=54e9, half=2e5)
ATTN_CURVE = SaturatingCurve(peak=60e9, half=4e6)
CPU_GEMM_CURVE = SaturatingCurve(peak=1.4e12, half=64.0)
#: a micro-batch's routed experts as grouped GEMMs: slower than the dense GEMM at few rows
GROUPED_CURVE = SaturatingCurve(peak=500e12, half=900.0)
#: solo rate / together rate of each stage; 0.9 (faster together: noise) must floor at 1
SLOWDOWN = {"link": 1.25, "gpu": 0.9, "cpu_attention": 1.1}
#: the GPU stage's kernel launches, together / alone
LAUNCH_SLOWDOWN = 1.3
#: the staging copy alone over beside the three stages, and over beside the link alone
COPY_SLOWDOWN, COPY_SLOWDOWN_SERIAL = 1.6, 1.3


def _m(bench, params, x, work, rate, unit="B/s", reps=5):
    """A measurement whose median rate is exactly `rate` (times spread +-1% around it)."""
    t = work / rate
    return Measurement(bench, params, x=x, work=work, unit=unit,
                       times_s=tuple(t * f for f in (0.99, 1.0, 1.0, 1.0, 1.01)[:reps]))


def _env(device="cuda"):
    return Environment(date="2026-11-23", device=device, mode="full", torch_version="2.11.0",
                       cuda_version="13.0" if device == "cuda" else "none",
                       gpu_name="NVIDIA H100 80GB HBM3" if device == "cuda" else "CPU stand-in",
                       cpu_name="Intel Xeon", threads=16, gpu_memory_bytes=80e9,
                       cpu_memory_bytes=128e9, model="mixtral-8x7b")


def synthetic_measurements(standin=False):
    ms = [_m("op_overhead", {"elements": 1}, 1, 1.0, 1 / 12e-6, unit="op/s"),
          _m("hbm_copy", {"bytes": GiB}, GiB, 2.0 * GiB, 2.9e12)]
    for dtype, scale in (("bf16", 1.0), ("fp16", 0.97)):
        ms.append(_m("gpu_gemm_square", {"model": "square", "proj": "square", "rows": 8192,
                                         "k": 8192, "n": 8192, "dtype": dtype},
                     8192, 2.0 * 8192**3, 780e12 * scale, unit="FLOP/s"))
        for model, (k, n) in (("mixtral-8x7b", (4096, 14336)), ("dbrx", (6144, 10752))):
            for rows in (2**i for i in range(14)):
                ms.append(_m("gpu_gemm", {"model": model, "proj": "up", "rows": rows, "k": k,
                                          "n": n, "dtype": dtype}, rows, 2.0 * rows * k * n,
                             GEMM_CURVE(rows) * scale, unit="FLOP/s"))
    ms.append(_m("gpu_gemm_square", {"model": "square", "proj": "square", "rows": 8192,
                                     "k": 8192, "n": 8192, "dtype": "fp32"},
                 8192, 2.0 * 8192**3, 50e12, unit="FLOP/s"))
    sizes = [4 * KiB * 4**i for i in range(10)]
    links = [("cpu", False, 1.0)] if standin else \
        [("h2d", True, 1.0), ("d2h", True, 1.02), ("h2d", False, 0.17), ("d2h", False, 0.16)]
    for direction, pinned, scale in links:
        for size in sizes:
            ms.append(_m("copy", {"direction": direction, "pinned": pinned, "bytes": size},
                         size, size, H2D_CURVE(size) * scale))
    if not standin:
        ms.append(_m("pageable_to_pinned", {"bytes": GiB}, GiB, GiB, 42e9))
        ms.append(_m("kv_gather", {"batch": 64, "context": 136, "dtype": "bf16", "threads": 10,
                                   "contexts": "uniform",
                                   "counted": "bytes copied (whole blocks)"},
                     50e6, 50e6, 8e9))
        ms.append(_m("attention_handoff", {"micro_batch": 64, "qkv_width": 6144,
                                           "filler_ops": 200}, 64, 1.0, 1 / 450e-6,
                     unit="handoff/s"))
        for mu in (1, 4, 16, 48, 128, 512):   # Mixtral-8x7B: rows per touched expert
            rows = mu * 2 / min(8, 2 * mu)
            ms.append(_m("gpu_grouped_experts", {"model": "mixtral-8x7b", "micro_batch": mu,
                                                 "dtype": "bf16"}, rows,
                         2.0 * mu * 2 * 176e6, GROUPED_CURVE(rows), unit="FLOP/s"))
        for block, ops, per_op_s in (("attention_in", 16, (20e-6, 22e-6)),
                                     ("post_grouped", 37, (30e-6, 34e-6)),
                                     ("gpu_attention", 23, (26e-6, 28e-6))):
            for mu, t in zip((16, 64), per_op_s, strict=True):
                ms.append(Measurement("launch_block", {"block": block, "micro_batch": mu,
                                                       "ops": ops, "model": "mixtral-8x7b",
                                                       "dtype": "bf16"},
                                      x=mu, work=float(ops), unit="op/s",
                                      times_s=(ops * t,) * 3))
        ms.append(Measurement("pin_probe", {"chunk_bytes": 4 * GiB, "bound_bytes": 80 * GiB,
                                            "outcome": "failed"}, x=60 * GiB, work=60 * GiB,
                              unit="B/s", times_s=(34.0,)))
    for page in (64 * KiB * 4**i for i in range(7)):
        ms.append(_m("h2d_paged", {"page_bytes": page, "total_bytes": 256 * MiB}, page,
                     256 * MiB, 54e9 * page / (page + 1 * MiB)))
    for dtype, scale in (("fp32", 0.9), ("bf16", 1.0)):
        for rows in (4**i for i in range(7)):
            ms.append(_m("cpu_gemm", {"threads": 16, "rows": rows, "k": 4096, "n": 4096,
                                      "dtype": dtype}, rows, 2.0 * rows * 4096**2,
                         CPU_GEMM_CURVE(rows) * scale, unit="FLOP/s"))
        ms.append(_m("dram_read", {"bytes": 2 * GiB, "dtype": dtype}, 2 * GiB, 2 * GiB,
                     100e9 * scale))
        for batch in (1, 8, 64, 512):
            for context in (128, 1024):
                kv = 2.0 * batch * 8 * context * 128 * (4 if dtype == "fp32" else 2)
                ms.append(_m("cpu_attention", {"batch": batch, "context": context,
                                               "dtype": dtype, "threads": 16, "kv_heads": 8},
                             kv, kv,
                             ATTN_CURVE(kv) * scale))
    for stage, unit, solo_rate in (("link", "B/s", 50e9), ("gpu", "FLOP/s", 600e12),
                                   ("cpu_attention", "B/s", 55e9)):
        for mode, rate in (("solo", solo_rate), ("together", solo_rate / SLOWDOWN[stage])):
            ms.append(Measurement("interference", {"stage": stage, "mode": mode, "ops": 100},
                                  x=1e6, work=rate * 2.0, unit=unit, times_s=(2.0,)))
    for mode, rate in (("solo", 27e9), ("beside", 27e9 / COPY_SLOWDOWN),
                       ("staging_copy+link", 27e9 / COPY_SLOWDOWN_SERIAL)):
        ms.append(Measurement("interference", {"stage": "staging_copy", "mode": mode, "ops": 10},
                              x=64 * MiB, work=rate * 2.0, unit="B/s", times_s=(2.0,)))
    for mode, per_op_s in (("solo", 8e-6), ("together", 8e-6 * LAUNCH_SLOWDOWN)):
        ms.append(Measurement("interference_launch", {"stage": "gpu", "mode": mode, "ops": 6400},
                              x=1, work=6400.0, unit="op/s", times_s=(6400 * per_op_s,)))
    return ms


def test_a_curve_that_fits_badly_is_left_out_and_said_so():
    ms = synthetic_measurements()
    # attention rates that zig-zag by 10x between neighbouring sizes: no saturating curve fits
    ms = [dataclasses.replace(m, work=m.work * (10.0 if i % 2 else 0.1))
          if m.bench == "cpu_attention" and m.params["dtype"] == "bf16" else m
          for i, m in enumerate(ms)]
    profile = build_profile("noisy", ms, _env(), [])
    assert "cpu_attention" not in profile.curves and "gpu_gemm" in profile.curves
    fit = profile.measurements["fits"]["cpu_attention"]
    assert fit["rel_error"] > MAX_CURVE_FIT_ERROR and fit["used"] is False
    assert any("curve cpu_attention not used" in s for s in profile.measurements["skipped"])


def test_a_stalled_measurement_is_left_out_of_its_curve_and_named():
    """One attention shape measured 10x slow (as on the H200 machine, 2026-12-01: batch 8,
    context 512 ran 6 ms for 12.6 MB) is left out; the curve of the rest is kept."""
    ms = [dataclasses.replace(m, work=m.work / 10)
          if m.bench == "cpu_attention" and m.params == {"batch": 64, "context": 128,
                                                          "dtype": "bf16", "threads": 16,
                                                          "kv_heads": 8} else m
          for m in synthetic_measurements()]
    profile = build_profile("stalled", ms, _env(), [])
    fit = profile.measurements["fits"]["cpu_attention"]
    assert fit["outliers"] == 1 and fit["used"] is True and "left out" in fit["what"]
    assert profile.curves["cpu_attention"].peak == pytest.approx(ATTN_CURVE.peak, rel=0.05)
    assert "left out" in profile.sources["curves.cpu_attention.peak"]


def test_full_run_covers_the_sizes_the_issue_asks_for():
    assert (FULL.link_sizes_bytes[0], FULL.link_sizes_bytes[-1]) == (4 * KiB, GiB)
    assert (FULL.gemm_rows[0], FULL.gemm_rows[-1]) == (1, 8192)
    assert set(FULL.gemm_models) == {"mixtral-8x7b", "dbrx"}
    assert {"bf16", "fp16"} <= set(FULL.gemm_dtypes)
    assert FULL.page_sizes_bytes[-1] == FULL.paged_total_bytes  # one large copy vs pages


def test_measurement_statistics():
    m = Measurement("copy", {"bytes": 100}, x=100, work=100.0, unit="B/s",
                    times_s=(1.0, 2.0, 3.0, 4.0, 5.0))
    assert m.median_s == 3.0
    assert m.rate == pytest.approx(100 / 3)
    assert m.iqr_rel == pytest.approx((4.0 - 2.0) / 3.0)


def test_min_page_bytes_is_smallest_page_near_the_best_rate():
    paged = [_m("h2d_paged", {}, page, 1e9, rate) for page, rate in
             ((64e3, 10e9), (1e6, 40e9), (4e6, 50e9), (16e6, 52e9))]
    assert min_page_bytes(paged) == 4_000_000  # 50 >= 0.9 * 52, 40 is not


def test_build_profile_maps_measurements_onto_fields():
    profile = build_profile("h100-test", synthetic_measurements(), _env(), ["nothing"])
    gpu, link, cpu = profile.gpu, profile.link, profile.cpu
    assert gpu.peak_flops["bf16"] == pytest.approx(780e12)       # the square GEMM is the max
    assert gpu.peak_flops["fp16"] == pytest.approx(780e12 * 0.97)
    assert gpu.peak_flops["fp32"] == pytest.approx(50e12)         # peak-only dtype
    assert gpu.hbm_bandwidth_bps == pytest.approx(2.9e12)
    assert gpu.op_overhead_s == pytest.approx(12e-6)
    assert gpu.memory_bytes == 80e9
    assert cpu.cores == 16 and cpu.peak_flops == pytest.approx(CPU_GEMM_CURVE(4096))
    assert cpu.dram_bandwidth_bps == pytest.approx(90e9)          # the fp32 read
    largest = 4 * KiB * 4**9
    assert link.h2d_pinned_bps == pytest.approx(H2D_CURVE(largest))
    assert link.d2h_pageable_bps == pytest.approx(H2D_CURVE(largest) * 0.16)
    assert link.pageable_to_pinned_bps == pytest.approx(42e9)
    assert link.kv_gather_bps == pytest.approx(8e9)
    assert gpu.attention_handoff_s == pytest.approx(450e-6)
    # the decode blocks' host time per operation: the median over the micro-batches
    assert gpu.attention_in_op_s == pytest.approx(21e-6)
    assert gpu.post_grouped_op_s == pytest.approx(32e-6)
    assert gpu.gpu_attention_op_s == pytest.approx(27e-6)
    assert "host clock" in profile.sources["gpu.post_grouped_op_s"]
    assert "AttentionLink" in profile.sources["gpu.attention_handoff_s"]
    assert link.pinned_max_bytes == 60 * GiB
    assert "failed to pin" in profile.sources["link.pinned_max_bytes"]
    inter = profile.interference
    assert (inter.link, inter.gpu, inter.cpu_attention) == pytest.approx((1.25, 1.0, 1.1))
    assert inter.launch == pytest.approx(LAUNCH_SLOWDOWN)
    ratios = profile.measurements["derived"]["interference_ratio"]   # recorded, not applied
    assert ratios["staging_copy"] == pytest.approx(COPY_SLOWDOWN)
    assert ratios["staging_copy+link"] == pytest.approx(COPY_SLOWDOWN_SERIAL)
    assert "launches" in profile.sources["interference.launch"]
    assert profile.measurements["derived"]["interference_ratio"]["gpu"] == pytest.approx(0.9)
    for key, truth in (("gpu_gemm", GEMM_CURVE), ("h2d", H2D_CURVE),
                       ("cpu_attention", ATTN_CURVE), ("cpu_gemm", CPU_GEMM_CURVE),
                       ("gpu_grouped_experts", GROUPED_CURVE)):
        fitted = profile.curves[key]
        assert fitted.peak == pytest.approx(truth.peak, rel=1e-3), key
        assert fitted.half == pytest.approx(truth.half, rel=1e-2), key
    # bf16 and fp16 GEMMs must not be pooled into the one 'gpu_gemm' curve
    assert profile.measurements["fits"]["gpu_gemm"]["points"] == 28
    assert profile.measurements["derived"]["min_page_bytes_90pct"] == 16 * MiB


def test_grouped_experts_are_timed_as_the_executor_runs_them():
    """hrm profile's grouped-experts benchmark (CUDA only in the plan; here on the CPU with the
    tiny Mixtral): routed_experts_grouped over ExpertStore.stacked's views, x = rows per touched
    expert, work = 2 pairs expert_params; a stand-in profile has no such curve, and the cost
    model then times grouped experts by gpu_gemm."""
    from hrm.profile import grouped_experts_series

    spec = load_model_spec("tiny-mixtral")
    ms = grouped_experts_series(spec, (1, 8), "cpu", reps=2)
    assert [m.params["micro_batch"] for m in ms] == [1, 8]
    for m in ms:
        mu, touched = m.params["micro_batch"], m.params["touched"]
        assert 1 <= touched <= min(spec.num_experts, mu * spec.top_k)
        assert m.x == pytest.approx(mu * spec.top_k / touched)
        assert m.work == pytest.approx(2.0 * mu * spec.top_k * spec.expert_params())
        assert m.rate > 0
    standin = build_profile("cpu-test", synthetic_measurements(standin=True), _env("cpu"))
    assert "gpu_grouped_experts" not in standin.curves


def test_launch_blocks_time_the_executors_decode_blocks():
    """hrm profile's launch-block benchmark (CUDA only in the plan; here on the CPU with the
    tiny Mixtral): each block's work is the model's operation count (OPS_*), which the
    operations it dispatched match, and a stand-in profile, which has no block times, times
    every launch by op_overhead_s."""
    from hrm.profile import launch_blocks
    from hrm.roofline import (
        OPS_ATTENTION_IN,
        OPS_ATTENTION_OUT,
        OPS_GPU_DECODE_ATTENTION,
        OPS_MOE_GROUPED,
    )

    ms = launch_blocks(load_model_spec("tiny-mixtral"), (1, 8), "cpu", bursts=1)
    blocks = ["attention_in", "post_grouped", "gpu_attention"]
    assert [(m.params["block"], m.params["micro_batch"]) for m in ms] == [
        (b, mu) for mu in (1, 8) for b in blocks]
    ops = {"attention_in": OPS_ATTENTION_IN, "post_grouped": OPS_ATTENTION_OUT + OPS_MOE_GROUPED,
           "gpu_attention": OPS_GPU_DECODE_ATTENTION}
    for m in ms:   # work: the model's count, which the executor's dispatch matches
        assert m.work == m.params["ops"] == ops[m.params["block"]]
        if m.params["block"] != "gpu_attention" or m.params["micro_batch"] > 1:
            # (a lone sequence's SDPA dispatches 2 more on the CPU)
            assert m.params["dispatched_ops"] == m.params["ops"]
        assert len(m.times_s) == 8 and m.rate > 0
    standin = build_profile("cpu-test", synthetic_measurements(standin=True), _env("cpu"))
    assert standin.gpu.block_op_s("post_grouped") == standin.gpu.op_overhead_s


def test_every_value_says_how_it_was_measured():
    profile = build_profile("h100-test", synthetic_measurements(), _env())
    for path in ("gpu.peak_flops.bf16", "gpu.hbm_bandwidth_bps", "gpu.op_overhead_s",
                 "cpu.peak_flops", "cpu.dram_bandwidth_bps", "link.h2d_pinned_bps",
                 "link.d2h_pinned_bps", "link.h2d_pageable_bps", "link.d2h_pageable_bps",
                 "link.pageable_to_pinned_bps", "interference.link"):
        assert profile.sources[path].startswith("measured 2026-11-23: "), path
    assert "x 5 reps, median" in profile.sources["link.h2d_pinned_bps"]
    assert "IQR" in profile.sources["link.h2d_pinned_bps"]
    assert profile.sources["curves.h2d.rel_error"].startswith("fit 2026-11-23")
    env = profile.measurements["environment"]
    assert env["torch_version"] == "2.11.0" and env["gpu_name"].startswith("NVIDIA")
    table = profile.measurements["benchmarks"]["copy"]
    assert len(table["rate"]) == len(table["bytes"]) == 40 and table["unit"] == "B/s"


def test_standin_profile_uses_the_memcpy_for_the_link():
    profile = build_profile("cpu-test", synthetic_measurements(standin=True), _env("cpu"))
    link = profile.link
    assert link.h2d_pinned_bps == link.d2h_pageable_bps == link.pageable_to_pinned_bps
    assert math.isinf(link.pinned_max_bytes)
    assert STANDIN_NOTE in profile.description
    assert "CPU stand-in" in profile.sources["gpu.peak_flops.bf16"]


def test_toml_round_trip(tmp_path):
    profile = build_profile("h100-test", synthetic_measurements(), _env(), ["a skipped thing"])
    path = tmp_path / "h100-test.toml"
    save_profile(profile, path)
    loaded = load_profile(path)
    assert loaded == profile
    assert loaded.sources == profile.sources
    assert loaded.measurements == profile.measurements
    assert loaded.curves["gpu_gemm"].rel_error == profile.curves["gpu_gemm"].rel_error


# ---- the real thing, through the CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    toml_path, raw_path = out / "quick.toml", out / "quick.json"
    result = CliRunner().invoke(app, ["profile", "--quick", "--device", "cpu", "-o",
                                      str(toml_path), "--raw-json", str(raw_path)])
    return result, toml_path, raw_path


def test_quick_cpu_profile_runs_and_loads(quick_run):
    result, toml_path, raw_path = quick_run
    assert result.exit_code == 0, result.output
    assert "CPU stand-in" in result.output
    assert "skipped:" in result.output
    profile = load_profile(toml_path)
    assert profile.name == "quick"
    # every curve was fitted; one that fits the (noisy) measurements badly is left out, said so
    fits = profile.measurements["fits"]
    assert set(fits) >= {"gpu_gemm", "h2d", "cpu_attention", "cpu_gemm"}
    assert {k for k in fits if "[" not in k and fits[k]["used"]} == set(profile.curves)
    for curve in profile.curves.values():
        assert math.isfinite(curve.rel_error)
    assert profile.gpu.peak_flops["bf16"] > 0 and profile.cpu.dram_bandwidth_bps > 0
    assert profile.cpu.cores == torch.get_num_threads()
    assert all(f >= 1.0 for f in (profile.interference.link, profile.interference.gpu,
                                  profile.interference.cpu_attention,
                                  profile.interference.launch))   # timed on the stand-in too
    env = profile.measurements["environment"]
    assert env["mode"] == "quick" and env["torch_version"] == torch.__version__
    raw = json.loads(raw_path.read_text())
    benches = {m["bench"] for m in raw["measurements"]}
    assert benches >= {"gpu_gemm", "copy", "h2d_paged", "cpu_gemm", "dram_read",
                       "cpu_attention", "interference"}
    assert all(len(m["times_s"]) >= 1 for m in raw["measurements"])


def test_from_raw_refits_the_same_profile_without_measuring(quick_run, tmp_path):
    _, toml_path, raw_path = quick_run
    again = tmp_path / "again.toml"
    result = CliRunner().invoke(app, ["profile", "--from-raw", str(raw_path), "-o", str(again),
                                      "--name", "quick"])
    assert result.exit_code == 0, result.output
    assert load_profile(again) == load_profile(toml_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"measurements": []}')
    result = CliRunner().invoke(app, ["profile", "--from-raw", str(bad), "-o", str(again)])
    assert result.exit_code != 0 and "not a raw sample file" in str(result.exception)


def test_quick_cpu_profile_measures_attention_in_both_kv_dtypes(quick_run):
    _, toml_path, _ = quick_run
    table = load_profile(toml_path).measurements["benchmarks"]["cpu_attention"]
    assert set(table["dtype"]) == {"fp32", "bf16"}
    # on the threads the executor's CPU attention worker gets on this machine
    assert set(table["threads"]) == {executor_attention_threads(torch.get_num_threads())}


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device must be auto, cuda or cpu"),
    (["--device", "cpu", "--threads", "0"], "--threads must be >= 1"),
    (["--device", "cpu", "--pin-probe-gib", "-1"], "--pin-probe-gib must be >= 0"),
    (["--device", "cpu", "--pin-probe-gib", "8"], "--pin-probe-gib needs CUDA"),
    (["--device", "cpu", "--model", "deepseek-v2-lite"], "grouped-query"),
])
def test_bad_options_give_one_line_error(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["hrm", "profile", "-o", str(tmp_path / "x.toml"), *args])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.toml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["hrm", "profile", "--device", "cuda"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_allreduce_microbenchmark_with_gloo_fits_the_interconnect():
    """The NCCL code path, run on the CPU: 2 processes, gloo, a few sizes."""
    from hrm.profile import interconnect_from, measure_allreduce

    ms = measure_allreduce(2, "gloo", "cpu", sizes=(64 * 1024, 1024 * 1024, 4 * 1024 * 1024),
                           reps=3)
    assert [m.x for m in ms] == [64 * 1024, 1024 * 1024, 4 * 1024 * 1024]
    assert all(m.bench == "allreduce" and len(m.times_s) == 3 and m.rate > 0 for m in ms)
    tier, sources = interconnect_from(ms, "2026-01-01")
    assert tier.num_gpus == 2 and tier.allreduce_bus_bps > 0 and tier.allreduce_latency_s >= 0
    assert sources["interconnect.allreduce_bus_bps"].startswith("fit 2026-01-01")


def test_attention_curve_leaves_out_calls_with_too_few_work_items():
    """A single sequence gives the kernel 8 (sequence, KV head) items for 16 threads: its rate
    measures idle threads, so it is not fitted (MIN_ATTENTION_ITEMS_PER_THREAD)."""
    ms = [dataclasses.replace(m, work=m.work / 20)
          if m.bench == "cpu_attention" and m.params["batch"] == 1 else m
          for m in synthetic_measurements()]
    profile = build_profile("few-items", ms, _env(), [])
    fit = profile.measurements["fits"]["cpu_attention"]
    assert fit["points"] == 6 and fit["used"] is True        # batches 8, 64, 512 x 2 contexts
    assert profile.curves["cpu_attention"].peak == pytest.approx(ATTN_CURVE.peak, rel=0.05)


def test_interference_runs_cpu_attention_on_the_executors_threads(monkeypatch):
    """The interference ratio scales the CPU attention curve, which is measured on the threads
    the executor's worker gets; so is the interference benchmark."""
    import hrm.profile as prof

    seen = []
    monkeypatch.setattr(prof, "interference",
                        lambda stages, window_s, pairs, beside:
                        seen.append((torch.get_num_threads(), pairs, beside.name)) or [])
    env = _env("cpu")
    plan = dict(prof.benchmark_plan(prof.QUICK.for_standin(), env,
                                    load_model_spec("tiny-mixtral"), 0))
    before = torch.get_num_threads()
    plan["overlap interference"]()
    assert seen == [(executor_attention_threads(env.threads), [("staging_copy", "link")],
                     "staging_copy")]
    assert torch.get_num_threads() == before


def test_a_slow_cpu_gemm_ends_its_series(monkeypatch):
    """A CPU GEMM call over CPU_GEMM_CALL_LIMIT_S (emulated bf16) ends the series once two sizes
    (what a curve needs) are measured."""
    import hrm.profile as prof

    monkeypatch.setattr(prof, "time_calls", lambda fn, reps, device, **kw:
                        (prof.CPU_GEMM_CALL_LIMIT_S * 2,) * reps)
    series = prof.gemm_series("cpu_gemm", 8, 8, [64, 1, 8], "fp32", "cpu", 3, {})
    assert [m.x for m in series] == [1, 8]
    monkeypatch.setattr(prof, "time_calls", lambda fn, reps, device, **kw: (1e-3,) * reps)
    assert [m.x for m in prof.gemm_series("cpu_gemm", 8, 8, [64, 1, 8], "fp32", "cpu", 3,
                                          {})] == [1, 8, 64]


def test_interference_runs_the_beside_stage_alone_beside_all_and_in_pairs():
    """The staging copy runs alone, beside the three stages ('beside') and beside the link
    ('staging_copy+link'); 'together' stays the three pipeline stages, whatever else is
    measured."""
    import hrm.profile as prof

    def stage(name):
        return prof.Stage(name, lambda: time.sleep(0.001), 1.0, "op/s")

    ms = prof.interference([stage("link"), stage("gpu")], 0.02, [("staging_copy", "link")],
                           stage("staging_copy"))
    runs = {}
    for m in ms:
        runs.setdefault(m.params["mode"], set()).add(m.params["stage"])
    assert runs == {"solo": {"link", "gpu", "staging_copy"}, "together": {"link", "gpu"},
                    "beside": {"link", "gpu", "staging_copy"},
                    "staging_copy+link": {"staging_copy", "link"}}
    assert all(m.work > 0 for m in ms)
    assert sum(m.params["mode"] == "solo" for m in ms) == 3


def test_cold_attention_calls_rotate_over_enough_kv_caches(monkeypatch):
    """With cold_bytes, successive calls read different KV caches (together >= cold_bytes, so
    that they come from DRAM, not the last-level cache); without, the same one."""
    from executor.kv_cache import KVCache

    read = []
    attend = KVCache.attend
    monkeypatch.setattr(KVCache, "attend", lambda self, *a: read.append(id(self)) or
                        attend(self, *a))
    spec = load_model_spec("tiny-mixtral")
    warm, kv_bytes = decode_attention_call(spec, 4, 64, "fp32")
    cold, _ = decode_attention_call(spec, 4, 64, "fp32", cold_bytes=2.5 * kv_bytes)
    warm(), warm()
    assert read[0] == read[1]
    read.clear()
    for _ in range(4):
        cold()
    assert len(set(read[:3])) == 3 and read[3] == read[0]    # ceil(2.5) = 3 caches in turn


def test_kv_gather_times_the_executors_gather_in_bytes_copied() -> None:
    """The gather of the executor's KV cache (CPU stand-in: nothing pinned, no DMA), counted in
    whole blocks copied: 2 Hkv D bytes x batch x ceil(context / T) T."""
    from hrm.profile import kv_gather
    from hrm.roofline import KV_BLOCK_TOKENS

    spec = dataclasses.replace(load_model_spec("tiny-mixtral"), num_layers=1)
    m = kv_gather(spec, reps=3, threads=1, cold_bytes=0.0, call=(4, 20), device="cpu")
    assert m.bench == "kv_gather" and len(m.times_s) == 3 and m.rate > 0
    blocks = -(-20 // KV_BLOCK_TOKENS)
    assert m.work == 2 * spec.num_kv_heads * spec.head_dim * 2 * 4 * blocks * KV_BLOCK_TOKENS
    assert m.params["dma"] == "after each gather, waited for"


def test_pipeline_calibration_measures_the_executor_and_sets_the_gpu_factor() -> None:
    """The calibration runs the executor's decode (CPU stand-in, tiny model) and build_profile's
    factor is its layer over the model's solo GPU stage, which the cost model then uses for
    kernels and host work alike."""
    from hrm.cost import gpu_factors, gpu_stage_solo_s
    from hrm.policy import Policy
    from hrm.profile import _with_pipeline_factor, pipeline_calibration

    cal = {"model": "tiny-mixtral", "layers": 2, "batch_size": 8, "micro_batch_size": 2,
           "prompt_len": 8, "gen_len": 3}
    run = pipeline_calibration("cpu", cal, runs=2)
    assert run.bench == "pipeline_gpu" and len(run.times_s) == 2 and min(run.times_s) > 0
    hw = load_profile("t4")
    calibrated = _with_pipeline_factor(hw, run, "today")
    spec = dataclasses.replace(load_model_spec("tiny-mixtral"), num_layers=2)
    solo = gpu_stage_solo_s(spec, hw, Workload(8, 8, 3),
                            Policy(batch_size=8, micro_batch_size=2, attn_decode_device="cpu"))
    assert calibrated.interference.pipeline == pytest.approx(run.median_s / solo)
    assert gpu_factors(calibrated) == (calibrated.interference.pipeline,) * 2
    assert gpu_factors(hw) == (hw.interference.gpu, hw.interference.launch or hw.interference.gpu)
    source = calibrated.sources["interference.pipeline"]
    assert "executor's CGOPipe decode" in source and "median of 2 runs" in source
    # the staged calibration sets the staged policies' factor and leaves the other alone
    staged = pipeline_calibration("cpu", {**cal, "pinned_share": 0.6}, runs=1)
    both = _with_pipeline_factor(calibrated, staged, "today")
    assert both.interference.pipeline == calibrated.interference.pipeline
    assert both.interference.pipeline_staged == pytest.approx(staged.median_s / solo)
    assert "60% of the expert bytes pinned" in both.sources["interference.pipeline_staged"]


def test_a_machine_that_cannot_run_the_calibration_keeps_the_benchmark_factors(
        monkeypatch, capsys) -> None:
    import hrm.profile as P

    def too_big(device: str, calibration: dict) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.62 GiB")

    monkeypatch.setattr(P, "pipeline_calibration", too_big)
    assert P._calibration_if_it_runs("cuda") == []
    err = capsys.readouterr().err
    assert err.count("skipped (OutOfMemoryError") == 2 and "pinned share 60%" in err
