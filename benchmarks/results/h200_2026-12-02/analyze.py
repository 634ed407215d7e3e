"""The derived figures of this folder's README, from its committed files (measures nothing).
Run from the repository root:

    python benchmarks/results/h200_2026-12-02/analyze.py

1. Each grid predicted by the model at HEAD with its own lease's profile (call 4 returned no
   CSV: its configurations are read from validate.log's table), and by the variant tried and
   rejected this session: the GPU stage's host work slowed by f_launch, its kernels not at all.
2. The 16-row Mixtral expert GEMM in each call's profile: timed from its start event (call 1,
   before 17747ce, dispatch included) or queued behind a sleep kernel (calls 2 and 4).
3. N=1024's launcher track (median per micro-batch and layer) and its busy time per layer over
   the model's GPU stage without interference (calls 1 and 2).
4. Call 3's benchmark runs (a lease that was not profiled) predicted at HEAD with the profiles
   of calls 2 and 4 and the shipped h200-machine.
5. n_ub=16's prefill in call 2: the GPU track's items (the first ones pay the first use of the
   micro-batch shape), the steady ones, and the GPU idle between items.
6. In each grid, the optimizer's CGOPipe policy over N=1024 under the layerwise schedule.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import hrm.cost as C  # noqa: E402
from benchmarks.repredict_grid import repredict  # noqa: E402
from benchmarks.repredict_runs import repredict_runs  # noqa: E402
from executor.weights import read_model  # noqa: E402
from hrm.hardware import Interference, load_profile  # noqa: E402
from hrm.validate import config_of_row, pct_error, predicted  # noqa: E402

HERE = Path(__file__).resolve().parent
SOLO_GPU_OP_TIME = C.gpu_op_time_s


def host_only_gpu_op_time(hw, op, kernel_factor: float = 1.0, host_factor: float = 1.0):
    """The rejected variant: the kernels at their solo speed whatever the overlap."""
    return SOLO_GPU_OP_TIME(hw, op, 1.0, host_factor)


def log_rows(log: Path) -> list[dict[str, str]]:
    """The configurations of `hrm validate`'s printed table (config, policy, measured tok/s)."""
    rows = []
    for line in log.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.startswith("│") and len(cells) == 11 and cells[1].isdigit():
            rows.append({"config": cells[0], "batch_size": cells[1],
                         "micro_batch_size": cells[2], "attn_decode_device": cells[3],
                         "weights_gpu_fraction": cells[4], "schedule": cells[5],
                         "prompt_len": cells[6], "gen_len": cells[7],
                         "measured_tok_s": float(cells[9])})
    return rows


def log_grid_errors(call: str) -> dict[str, float]:
    """Throughput errors (%) at HEAD of a grid known only from its validate.log; the limits are
    the same rule's as call 2's (same machine kind, same --full-model-gpu-mem)."""
    limits = json.loads((HERE / "call2/validate/validation_summary.json").read_text())
    spec, _ = read_model(str(HERE / call / "validate/validation.config.json"))
    hw = load_profile(HERE / call / "h200-session.toml").with_memory(
        gpu_memory_bytes=limits["gpu_mem_limit_bytes"],
        cpu_memory_bytes=limits["cpu_mem_limit_bytes"])
    return {r["config"]: pct_error(predicted(spec, hw, config_of_row(r))["predicted_tok_s"],
                                   r["measured_tok_s"])
            for r in log_rows(HERE / call / "validate.log")}


def grid_errors(call: str) -> dict[str, float]:
    if (HERE / call / "validate/validation_configs.csv").exists():
        res = repredict(HERE / call / "validate", HERE / call / "h200-session.toml")
        return {r["config"]: r["throughput_error_pct"] for r in res["rows"]}
    return log_grid_errors(call)


def summarize(errors: dict[str, float]) -> str:
    grid = {k: abs(v) for k, v in errors.items() if k != "optimizer"}
    worst = max(grid, key=grid.get)
    return (f"MAPE {statistics.mean(grid.values()):.1f}% over {len(grid)}, worst "
            f"{errors[worst]:+.1f}% ({worst}), within 5% / 10%: "
            f"{sum(e <= 5 for e in grid.values())} / {sum(e <= 10 for e in grid.values())}")


def grids() -> None:
    for call in ("call1", "call2", "call4"):
        errors = grid_errors(call)
        print(f"  {call} HEAD:      {summarize(errors)}")
        print("     " + " ".join(f"{k}:{v:+.1f}" for k, v in errors.items()))
        if call == "call1":   # its profile timed GEMMs with their dispatch: the variant is moot
            continue
        C.gpu_op_time_s = host_only_gpu_op_time
        try:
            print(f"  {call} host-only: {summarize(grid_errors(call))}")
        finally:
            C.gpu_op_time_s = SOLO_GPU_OP_TIME


def gemm_16_rows() -> None:
    for call in ("call1", "call2", "call4"):
        raw = json.loads((HERE / call / "profile_raw.json").read_text())["measurements"]
        us = [statistics.median(m["times_s"]) * 1e6 for m in raw if m["bench"] == "gpu_gemm"
              and m["params"]["model"] == "mixtral-8x7b" and m["params"]["rows"] == 16]
        print(f"  {call}: 16-row up/down GEMMs, medians {', '.join(f'{u:.1f}' for u in us)} us")


def launcher() -> None:
    spec = load_model_spec_4layers()
    for call in ("call1", "call2"):
        events, windows = read_trace(HERE / call / "validate/validation_trace_N=1024.json.gz")
        spans = [e for e in events if e["tid"] == "launcher"
                 and any(a * 1e6 <= e["ts"] <= b * 1e6 for a, b in windows)]
        medians = {n: statistics.median(e["dur"] for e in spans if e["name"] == n)
                   for n in ("launch_pre", "handoff_send", "attn_wait", "handoff_receive",
                             "launch_post")}
        hw = load_profile(HERE / call / "h200-session.toml")
        solo = dataclasses.replace(hw, interference=Interference())
        stages = {(r["config"], r["stage"]): r["measured_s"] for r in csv.DictReader(
            (HERE / call / "validate/validation_stages.csv").open())}
        row = next(r for r in csv.DictReader((HERE / call / "validate/validation_configs.csv")
                                             .open()) if r["config"] == "N=1024")
        model_s = predicted(spec, solo, config_of_row(row))["stages"]["gpu"]
        launcher_s = float(stages["N=1024", "launcher (host, measured)"])
        print(f"  {call}: medians " + ", ".join(f"{k} {v:.0f} us" for k, v in medians.items())
              + f"; launcher {launcher_s * 1e3:.1f} ms / model {model_s * 1e3:.1f} ms per layer = "
              f"{launcher_s / model_s:.2f} (profile: op {hw.gpu.op_overhead_s * 1e6:.1f} us, "
              f"hand-off {hw.gpu.attention_handoff_s * 1e6:.0f} us, f_gpu "
              f"{hw.interference.gpu:.2f}, f_launch {hw.interference.launch:.2f})")


def read_trace(path: Path) -> tuple[list[dict], list[list[float]]]:
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    return [e for e in doc["traceEvents"] if e.get("ph") == "X"], doc["decode_windows_s"]


def prefill_items() -> None:
    events, windows = read_trace(HERE / "call2/validate/validation_trace_n_ub=16.json.gz")
    gpu = sorted((e for e in events if e["tid"] == "gpu" and e["ts"] < windows[0][0] * 1e6),
                 key=lambda e: e["ts"])
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(gpu, gpu[1:], strict=False)]
    steady = [e["dur"] / 1e3 for e in gpu[7:]]
    first = [e["dur"] / 1e3 for e in gpu[:7]]
    median, (q1, _, q3) = statistics.median(steady), statistics.quantiles(steady)
    print(f"  {len(gpu)} items; the first seven {', '.join(f'{d:.1f}' for d in first)} ms; from "
          f"the eighth: median {median:.2f} ms, quartiles {q1:.2f}-{q3:.2f} ms; the first seven "
          f"above that median: {sum(d - median for d in first):.0f} ms; gaps between items: "
          f"median {statistics.median(gaps):.0f} us")
    wait = next(e for e in events if e["tid"] == "weights_wait" and e["ts"] >= gpu[0]["ts"])
    print(f"  of the first item, {wait['dur'] / 1e3:.1f} ms waiting for the first layer's weights")


def cgopipe_over_layerwise() -> None:
    for call in ("call1", "call2", "call4"):
        measured = {r["config"]: r["measured_tok_s"]
                    for r in log_rows(HERE / call / "validate.log")}
        best, layerwise = measured["optimizer"], measured["N=1024,schedule=layerwise"]
        print(f"  {call}: {best:,.0f} / {layerwise:,.0f} = {best / layerwise:.2f}x")


def load_model_spec_4layers():
    spec, _ = read_model(str(HERE / "call2/validate/validation.config.json"))
    return spec


def bench_runs() -> None:
    profiles = {"call2": HERE / "call2/h200-session.toml",
                "call4": HERE / "call4/h200-session.toml",
                "shipped": ROOT / "hardware_profiles/h200-machine.toml"}
    for bench in ("continuous/continuous_bench_1layers.json",
                  "executor/executor_bench_2layers.json"):
        for r in repredict_runs(HERE / "call3" / bench, profiles):
            print(f"  {r['run']:<20} {r['measured_tok_s']:7.0f} tok/s; error at HEAD with "
                  + ", ".join(f"{k} {r[f'error_pct_{k}']:+.1f}%" for k in profiles))


if __name__ == "__main__":
    print("1. grids at HEAD, each on its own lease's profile")
    grids()
    print("2. 16-row expert GEMMs as profiled")
    gemm_16_rows()
    print("3. N=1024's launcher track")
    launcher()
    print("4. call 3's benchmark runs")
    bench_runs()
    print("5. n_ub=16's prefill items, call 2")
    prefill_items()
    print("6. the optimizer's policy over N=1024,schedule=layerwise")
    cgopipe_over_layerwise()
