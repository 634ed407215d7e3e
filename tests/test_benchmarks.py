"""The GPU benchmark scripts stay runnable: their CPU paths (bench_multigpu on a tiny model with
gloo, bench_continuous's dry run) on the CI machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def test_bench_multigpu_runs_one_and_two_processes_on_the_cpu(tmp_path) -> None:
    proc = _run("bench_multigpu.py", "--device", "cpu", "--model", "tiny-mixtral", "--layers",
                "2", "--num-seqs", "8", "--batch-size", "8", "--micro-batch-size", "4",
                "--gen-len", "3", "--parallelisms", "tp", "--hardware", "h200x2-quick",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "multigpu_tiny-mixtral_2layers_gen3.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"gpus1", "gpus2_tp"} and not any("error" in r for r in runs.values())
    assert runs["gpus2_tp"]["num_gpus"] == 2 and runs["gpus2_tp"]["predicted_throughput_tok_s"]
    assert {"machine", "command", "date"} <= set(doc) and "gpus2_tp" in doc["scaling"]


def test_bench_continuous_dry_run_plans_both_schedulers(tmp_path) -> None:
    """Both schedulers of every workload are planned; the static 1-layer plans fit the CPU limit
    their runs get (rag's prefill parking pool, the same for 1 layer as for 32, failed that on
    the H200 machine on 2026-12-01 before the limit counted it whole)."""
    proc = _run("bench_continuous.py", "--layers", "1", "--dry-run", "--host-mem", "120",
                "--hardware", "h200-machine", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for kind in ("mtbench", "rag", "reasoning"):
        assert f"[static {kind}]" in proc.stdout and f"[continuous {kind}]" in proc.stdout


def test_the_benchmarks_pin_what_pin_gib_says() -> None:
    """--pin-gib sets the full model's pinned budget that the optimizer and the runs get
    (executor.cli.pin_budget_bytes); without it a profile that skipped the pin probe gets
    DEFAULT_PIN_SHARE of the host memory."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_executor import host_memory
    from executor.cli import DEFAULT_PIN_SHARE, pin_budget_bytes
    from hrm.hardware import load_profile
    from hrm.units import GiB

    unprobed = load_profile("h200-machine").with_memory(pinned_max_bytes=float("inf"))
    host_bytes, hw = host_memory(120.0, unprobed, 72.0)
    assert host_bytes == 120 * GiB and pin_budget_bytes(hw, host_bytes) == 72 * GiB
    host_bytes, hw = host_memory(120.0, unprobed)
    assert pin_budget_bytes(hw, host_bytes) == pytest.approx(DEFAULT_PIN_SHARE * 120 * GiB)


def test_bench_continuous_compares_job_and_steady_state() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_continuous import compare

    runs = [{"scheduler": "static", "workload_kind": "rag", "useful_throughput_tok_s": 1000.0},
            {"scheduler": "continuous", "workload_kind": "rag", "useful_throughput_tok_s": 1500.0,
             "continuous": {"passes": 300},
             "steady": {"passes": [100, 180], "throughput_tok_s": 2500.0}}]
    assert compare("rag", runs) == ("[rag] static 1,000 tok/s; continuous job 1,500 (1.50x), "
                                    "steady state 2,500 (2.50x; passes 100-180 of 300)")
    assert "a run failed" in compare("rag", runs[:1])


def test_attention_bench_times_every_kernel_on_small_shapes() -> None:
    """bench_executor --attention's measurement on shapes a 2-core machine runs in seconds,
    including a context that ends mid-block (the KV cache holds whole blocks)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_executor import attention_bench
    from executor.kernels import paged_attention_extension

    rows = attention_bench(threads=2, shapes=((4, 144), (2, 64)), dram_bytes=2**26)
    assert [(r["batch"], r["context"]) for r in rows] == [(4, 144), (2, 64)] * 2
    keys = {"dense_kv_bps", "paged_torch_kv_bps"} | (
        {"paged_cpp_kv_bps"} if paged_attention_extension() is not None else set())
    assert all(keys <= set(r) and all(r[k] > 0 for k in keys) for r in rows)


def test_a_run_past_its_time_limit_is_recorded_not_fatal(tmp_path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_executor import run_cli

    res = run_cli(["--model", "tiny-mixtral", "--dummy-weights", "--device", "cpu",
                   "--num-seqs", "4", "--prompt-len", "8", "--gen-len", "4"], tmp_path, "slow",
                  timeout_s=0.05)
    assert res["name"] == "slow" and res["error"] == "timed out after 0.05 s"


def test_grouped_experts_diag_times_both_kernels_on_the_cpu(tmp_path) -> None:
    """diag_grouped_experts.py on the tiny Mixtral: both kernels timed at every micro-batch
    size, their outputs equal to bf16 rounding."""
    result = _run("diag_grouped_experts.py", "--model", "tiny-mixtral", "--reps", "3",
                  "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "diag_grouped_experts.json").read_text())["rows"]
    assert [r["micro_batch"] for r in rows] == [1, 16, 64, 256]
    for r in rows:
        assert r["loop_s"] > 0 and r["grouped_s"] > 0 and r["max_abs_out"] > 0
        assert r["max_abs_diff"] <= 1e-2 * r["max_abs_out"]


def test_trace_diag_finds_the_staging_buffer_wait() -> None:
    """benchmarks/diag_trace_layers.py on a made-up trace of 2 layers, 2 micro-batches, double
    buffered: each visit's weights take 10 ms; the launching thread's loop starts as they are
    in and takes 10 ms; the GPU frees the buffer 2 ms after the last launch, and the copies of
    visit j + 2 start right then. So a visit comes every 11 ms, after 1 ms of idle link, and
    every visit checked waited for its buffer."""
    from benchmarks.diag_trace_layers import analyse

    ms, events = 1000.0, [{"name": "prefill", "ph": "X", "ts": 0.0, "dur": 1.0, "tid": "gpu",
                           "args": {}}]

    def span(name: str, tid: str, ts: float, dur: float, layer: int, mb: int | None) -> None:
        events.append({"name": name, "ph": "X", "ts": ts, "dur": dur, "tid": tid,
                       "args": {"layer": layer, "micro_batch": mb}})

    for j in range(8):
        layer, start = j % 2, 10 * ms + 11 * ms * j
        for page in range(2):   # two 5 ms copies
            span("weights_h2d", "h2d", start + page * 5 * ms, 5 * ms, layer, None)
        weights_in = start + 10 * ms
        for m in range(2):
            t = weights_in + 5 * ms * m
            span("attn_wait", "launcher", t, 0.1 * ms, layer, m)
            span("launch_post", "launcher", t + 0.1 * ms, 4.9 * ms, layer, m)
            span("post_attn", "gpu", t + 0.1 * ms, (4.9 + 2 * m) * ms, layer, m)
    result = analyse(events, buffers=2, tolerance_ms=0.5)
    assert result["micro_batches"] == 2 and result["layer_visits"] == 8
    assert result["visits_checked"] == 6 == result["buffer_bound_visits"]
    for key, value in (("period_ms", 11.0), ("weights_busy_ms", 10.0),
                       ("launcher_loop_ms", 10.0), ("loop_start_after_weights_in_ms", 0.0),
                       ("gpu_tail_after_last_launch_ms", 2.0),
                       ("link_idle_before_visit_ms", 1.0),
                       ("launcher_busy_per_visit_ms", 9.8),
                       ("launcher_attn_wait_per_visit_ms", 0.2)):
        assert result[key] == pytest.approx(value), key
