"""The derived figures of this folder's README, from its committed files (measures nothing).
Run from the repository root:

    python benchmarks/results/h200_2026-12-02c/analyze.py

1. CPU and GPU memory: the largest error per grid, before (2026-12-02b calls 1 and 3: the
   resident set against the model's pageable part) and after the pinned buffers were counted.
2. diag_pinned_memory (call 1): the resident-set growth of pinned tensors against
   hrm.cost.pinned_allocation_bytes.
3. The link's bulk-rate estimator: each grid's throughput MAPE with its committed profile and with
   that profile fitted again from its raw samples by today's rules (`hrm profile --from-raw`).
4. The per-expert loop's launch-bound decode layers on seven leases: measured layer / (K + H)
   (solo kernels K and host work H of the model), against what the lease's interference
   factors make of it, (f_g K + f_h H) / (K + H).
5. diag_interference (call 3): the GPU stage's slowdown beside each other stage alone.
6. How the executor calibration's shape was chosen, on the grids of calls 1-3 and of the
   earlier sessions: each lease's measured layer / (K + H) of one grid configuration taken as
   its GPU factor (f_g = f_h), the grid's MAPE over the other configurations, for four
   candidate configurations.
7. Call 4, the calibration's first test (a new lease): the grid with its profile as fitted
   (interference.pipeline measured), and with the factor left out (the microbenchmark's f_g,
   f_launch), by configuration group.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks.repredict_grid import repredict  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
GRIDS = {"12-02 c1": RESULTS / "h200_2026-12-02/call1",
         "12-02 c2": RESULTS / "h200_2026-12-02/call2",
         "12-02b c1": RESULTS / "h200_2026-12-02b/call1",
         "12-02b c3": RESULTS / "h200_2026-12-02b/call3",
         "12-02c c1": HERE / "call1", "12-02c c2": HERE / "call2", "12-02c c3": HERE / "call3"}
#: call 4's grid ran with the executor calibration in its profile (the factor's test)


def _solo_split():
    """hrm's K / H split per configuration (the 2026-12-02b analysis, reused)."""
    spec = importlib.util.spec_from_file_location(
        "analyze_12_02b", RESULTS / "h200_2026-12-02b/analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.solo_split


def memory_errors() -> None:
    print("1. largest memory error per grid (%)")
    for name in ("12-02b c1", "12-02b c3", "12-02c c1", "12-02c c2", "12-02c c3"):
        rows = pd.read_csv(GRIDS[name] / "validate/validation_configs.csv")
        rows = rows[rows.ran]
        cpu = rows.cpu_mem_error_pct.abs()
        print(f"  {name:10s} CPU {cpu.max():5.1f} ({rows.config[cpu.idxmax()]})  GPU "
              f"{rows.gpu_mem_error_pct.abs().max():4.1f}  configurations {len(rows)}")


def pinned_rss() -> None:
    print("2. pinned tensors in the resident set (MiB)")
    doc = json.loads((HERE / "call1/diag/diag_pinned_memory.json").read_text())
    for r in doc["rows"]:
        print("  " + "  ".join(f"{k.removesuffix('_bytes')} {v / 2**20:.1f}"
                               for k, v in r.items()))


def bulk_estimator() -> None:
    print("3. throughput MAPE (%): committed profile -> refitted from its raw samples today")
    with tempfile.TemporaryDirectory() as tmp:
        for name, call in GRIDS.items():
            if name == "12-02c c3":   # a 7-configuration subset, profiled at HEAD already
                continue
            refit = Path(tmp) / f"{name.replace(' ', '_')}.toml"
            subprocess.run([sys.executable, "-m", "hrm.cli", "profile", "--from-raw",
                            str(call / "profile_raw.json"), "-o", str(refit), "--name",
                            "h200-session"], check=True, capture_output=True, cwd=ROOT)
            before = repredict(call / "validate", call / "h200-session.toml")
            after = repredict(call / "validate", refit)
            b_before = load_profile(call / "h200-session.toml").link.h2d_pinned_bps / 1e9
            b_after = load_profile(refit).link.h2d_pinned_bps / 1e9
            print(f"  {name:10s} B_pinned {b_before:.1f} -> {b_after:.1f} GB/s   MAPE "
                  f"{before['throughput_mape']:.1f} -> {after['throughput_mape']:.1f}")


def launch_bound_loop() -> None:
    print("4. loop launch-bound decode layers: measured layer / (K + H), and the model's")
    solo_split = _solo_split()
    out = []
    for name, call in GRIDS.items():
        hw = load_profile(call / "h200-session.toml")
        f_g, f_h = hw.interference.gpu, hw.interference.launch
        configs = pd.read_csv(call / "validate/validation_configs.csv").set_index("config")
        stages = pd.read_csv(call / "validate/validation_stages.csv")
        for r in solo_split(call / "validate", call / "h200-session.toml"):
            c = configs.loc[r["config"]]
            loop = c.get("expert_kernel", "loop") == "loop" and c["schedule"] == "cgopipe"
            if not loop or c["attn_decode_device"] != "cpu" or c["role"] != "grid":
                continue
            link_ms = 1e3 * stages[(stages.config == r["config"])
                                   & (stages.stage == "h2d")].measured_s.iloc[0]
            if r["K_ms"] + r["H_ms"] < 0.7 * link_ms:   # the solo GPU stage well under the link
                continue
            model = (f_g * r["K_ms"] + f_h * r["H_ms"]) / (r["K_ms"] + r["H_ms"])
            out.append({"lease": name, "config": r["config"],
                        "measured": r["layer_over_solo"], "model": model})
    df = pd.DataFrame(out)
    table = df.pivot_table(index="config", columns="lease", values="measured")
    print(table.round(2).to_string())
    print("  per lease: mean measured ratio, the factors' ratio (mean)")
    for lease, g in df.groupby("lease", sort=False):
        print(f"    {lease:10s} measured {g.measured.mean():.2f}  factors {g.model.mean():.2f}"
              f"  configurations {len(g)}")
    print(f"  all: measured mean {df.measured.mean():.2f}, sd {statistics.stdev(df.measured):.2f}"
          f", range {df.measured.min():.2f}-{df.measured.max():.2f}; factors "
          f"{df.model.min():.2f}-{df.model.max():.2f}")


def pairwise_interference() -> None:
    print("5. diag_interference, call 3 (slowdown vs solo)")
    doc = json.loads((HERE / "call3/diag/diag_interference.json").read_text())
    for k, v in doc["factors"].items():
        print(f"  {k:40s} {v:.2f}")


def _repredict_with(grid: Path, profile: Path, interference: dict[str, float]) -> dict:
    """repredict with the profile's interference fields replaced."""
    hw = load_profile(profile)
    return repredict(grid, dataclasses.replace(
        hw, interference=dataclasses.replace(hw.interference, **interference)))


def _mape(result: dict, leave_out: str = "") -> tuple[float, float]:
    errors = [abs(r["throughput_error_pct"]) for r in result["rows"]
              if r["role"] == "grid" and r["config"] != leave_out]
    return sum(errors) / len(errors), max(errors)


def calibration_shape() -> None:
    print("6. a grid configuration's measured ratio as the lease's GPU factor: MAPE (worst) of "
          "the other configurations, HEAD's factors -> the ratio's")
    solo_split = _solo_split()
    for candidate in ("n_ub=16", "N=1024", "N=1024,prompt=512", "N=2048,prompt=256"):
        print(f"  {candidate}")
        for name, call in GRIDS.items():
            profile = call / "h200-session.toml"
            ratios = {r["config"]: r["layer_over_solo"]
                      for r in solo_split(call / "validate", profile)}
            if candidate not in ratios:
                continue
            ratio = ratios[candidate]
            head = _mape(repredict(call / "validate", profile), candidate)
            cal = _mape(_repredict_with(call / "validate", profile,
                                        {"gpu": ratio, "launch": ratio}), candidate)
            print(f"    {name:10s} ratio {ratio:.2f}  MAPE {head[0]:4.1f} -> {cal[0]:4.1f}  "
                  f"worst {head[1]:4.1f} -> {cal[1]:4.1f}")


def calibration_test() -> None:
    print("7. call 4: throughput error (%) with interference.pipeline, and without it")
    call = HERE / "call4"
    hw = load_profile(call / "h200-session.toml")
    print(f"  interference.pipeline {hw.interference.pipeline:.3f}; f_g "
          f"{hw.interference.gpu:.2f}, f_launch {hw.interference.launch:.2f}")
    with_it = repredict(call / "validate", call / "h200-session.toml")
    without = _repredict_with(call / "validate", call / "h200-session.toml", {"pipeline": 0.0})
    configs = pd.read_csv(call / "validate/validation_configs.csv").set_index("config")
    rows = pd.DataFrame({"with": {r["config"]: r["throughput_error_pct"]
                                  for r in with_it["rows"] if r["role"] == "grid"},
                         "without": {r["config"]: r["throughput_error_pct"]
                                     for r in without["rows"] if r["role"] == "grid"}})
    rows["bottleneck"] = configs.loc[rows.index, "bottleneck"]
    print(rows.round(1).to_string())
    for label, result in (("with", with_it), ("without", without)):
        mape, worst = _mape(result)
        within5 = sum(abs(r["throughput_error_pct"]) <= 5 for r in result["rows"]
                      if r["role"] == "grid")
        print(f"  {label:8s} MAPE {mape:.1f}%, worst {worst:.1f}%, {within5} of "
              f"{len(rows)} within 5%")
    gpu = rows[rows.bottleneck == "gpu"]
    print(f"  GPU-bound configurations: mean |error| {gpu['with'].abs().mean():.1f}% with, "
          f"{gpu['without'].abs().mean():.1f}% without ({len(gpu)})")


def main() -> None:
    memory_errors()
    pinned_rss()
    bulk_estimator()
    launch_bound_loop()
    pairwise_interference()
    calibration_shape()
    calibration_test()


if __name__ == "__main__":
    main()
