"""The derived figures of this folder's README, from its committed files (measures nothing).
Run from the repository root:

    python benchmarks/results/h200_2026-12-02f/analyze.py

1. The two full grids (call 1 on lease D, call 3 on lease E): MAPE, configurations within 5% /
   10%, those outside 12%, the optimizer gap over per-policy means (and first runs) with its
   margin over the best other policy, memory, CPU steal, and the pipeline calibration.
2. Call 1's launch-bound configurations: measured decode layer over the model's solo GPU stage
   (the factor those layers ran at) against the calibration's 1.47, which was bound by the link.
3. The staging copy in the interference benchmark (both profiles): alone, beside the three
   pipeline stages, beside the link alone, and the bench rate the factors divide.
4. Continuous vs static (calls 2 and 4): useful tokens/s measured and predicted, the whole job
   and the steady state (passes between ramp-up and drain), continuous / static.
5. The weight stream through the staging ring (static runs, one pass per decode step): the
   copy rate the copy thread reached, the profile's B_copy / f_copy, and the series rule
   p / B_pinned + o / B_copy with each, against the measured step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from hrm.hardware import load_profile  # noqa: E402

HERE = Path(__file__).resolve().parent
#: the lease each call ran on (calls 1-2 one machine, 3-4 the next)
LEASES = {"call1": "D", "call2": "D", "call3": "E", "call4": "E"}
#: the profile each continuous call ran on
PROFILE_OF = {"call2": "call1", "call4": "call3"}


def grid(call: str) -> None:
    summary = json.loads((HERE / call / "validate/validation_summary.json").read_text())
    rows = pd.read_csv(HERE / call / "validate/validation_configs.csv")
    err = rows[rows.role == "grid"].set_index("config").throughput_error_pct
    pooled = summary["optimizer_gap_pooled"]
    print(f"  {call} (lease {LEASES[call]}): MAPE {summary['throughput_mape']:.2f}% over "
          f"{summary['n_configs']}, {(err.abs() <= 5).sum()} within 5%, "
          f"{(err.abs() <= 10).sum()} within 10%, worst {summary['worst_config']['config']} "
          f"{summary['worst_config']['throughput_error_pct']:+.1f}%")
    for config, e in err[err.abs() > 12].items():
        print(f"     outside 12%: {config} {e:+.1f}%")
    print(f"     optimizer gap {summary['optimizer_gap_pct']:+.1f}% over means (first runs "
          f"{summary['optimizer_gap_single_run_pct']:+.1f}%); best other policy "
          f"{pooled['best_other_config']}, margin {pooled['margin_pct']:+.1f}%")
    for name, runs in pooled["runs_per_policy"].items():
        if len(runs) > 1:
            print(f"       {name}: {', '.join(f'{t:,.0f}' for t in runs)} tok/s")
    print(f"     memory max {summary['mem_max_abs_pct_error']:.1f}% (GPU "
          f"{summary['gpu_mem_max_abs_pct_error']:.1f}%, CPU "
          f"{summary['cpu_mem_max_abs_pct_error']:.1f}%); CPU steal max "
          f"{summary['cpu_steal']['max_pct']:.2f}%")
    source = load_profile(HERE / call / "h200-session.toml").sources["interference.pipeline"]
    print(f"     calibration: {source.split('took ')[1]}")


def launch_bound_factor() -> None:
    stages = pd.read_csv(HERE / "call1/validate/validation_stages.csv")
    stages = stages[stages.role == "grid"].set_index(["config", "stage"])
    factor = load_profile(HERE / "call1/h200-session.toml").interference.pipeline
    for config in ("N=2048,prompt=256", "N=1024,prompt=512", "N=2048,prompt=512"):
        solo_s = stages.loc[(config, "gpu"), "predicted_s"] / factor   # the GPU stage binds
        layer_s = stages.loc[(config, "layer (overlap)"), "measured_s"]
        print(f"  {config}: measured layer {1e3 * layer_s:.0f} ms over solo GPU stage "
              f"{1e3 * solo_s:.0f} ms = {layer_s / solo_s:.2f} (calibration {factor:.2f})")


def staging_copy(call: str) -> None:
    raw = json.loads((HERE / call / "profile_raw.json").read_text())["measurements"]
    rates = {m["params"]["mode"]: m["work"] / m["times_s"][0] / 1e9 for m in raw
             if m["bench"] == "interference" and m["params"]["stage"] == "staging_copy"}
    hw = load_profile(HERE / call / "h200-session.toml")
    print(f"  {call}: alone {rates['solo']:.1f} GB/s, beside the three stages "
          f"{rates['beside']:.1f}, beside the link {rates['staging_copy+link']:.1f}; "
          f"pageable->pinned bench {hw.link.pageable_to_pinned_bps / 1e9:.1f} GB/s; "
          f"f_copy {hw.interference.staging_copy:.2f} / serial "
          f"{hw.interference.staging_copy_serial:.2f}")


def continuous(call: str) -> None:
    doc = json.loads((HERE / call / "continuous/continuous_bench_1layers.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    for w in ("mtbench", "rag", "reasoning"):
        s, c = runs[f"static_{w}"], runs[f"continuous_{w}"]
        static = s["useful_throughput_tok_s"]
        steady = c["steady"]
        print(f"  {call} {w}: static {static:,.0f} tok/s (predicted "
              f"{s['predicted_throughput_tok_s']:,.0f}, {pct(s)}); continuous job "
              f"{c['useful_throughput_tok_s']:,.0f} ({pct(c)}), "
              f"{c['useful_throughput_tok_s'] / static:.2f}x; steady state (passes "
              f"{steady['passes'][0]}-{steady['passes'][1]} of {c['continuous']['passes']}) "
              f"{steady['throughput_tok_s']:,.0f} (predicted "
              f"{steady['predicted_throughput_tok_s']:,.0f}, {pct(steady)}), "
              f"{steady['throughput_tok_s'] / static:.2f}x")


def pct(run: dict) -> str:
    """(predicted - measured) / measured of a run (or of its steady state)."""
    return f"{100 * (run['predicted_throughput_tok_s'] / run['throughput_tok_s'] - 1):+.1f}%"


def staged_stream(call: str) -> None:
    doc = json.loads((HERE / call / "continuous/continuous_bench_1layers.json").read_text())
    hw = load_profile(HERE / PROFILE_OF[call] / "h200-session.toml")
    piped_bps = hw.link.pageable_to_pinned_bps / hw.interference.staging_copy
    for run in doc["runs"]:
        if run["scheduler"] != "static":
            continue
        steps = run["workload"]["gen_len"] - 1
        pinned, staged = (run["realized"][k] for k in ("pinned_weight_bytes",
                                                        "pageable_weight_bytes"))
        copy_bps = run["bytes_moved"]["weights_h2d_staged"] / run["decode_busy_s"]["copy_thread"]
        pinned_s = pinned / hw.link.h2d_pinned_bps
        overlapped_s = max((pinned + staged) / hw.link.h2d_pinned_bps, staged / copy_bps)
        print(f"  {call} {run['name']}: step {1e3 * run['decode_s'] / steps:.1f} ms; copy "
              f"thread {copy_bps / 1e9:.1f} GB/s while busy, profile {piped_bps / 1e9:.1f}; "
              f"series rule {1e3 * (pinned_s + staged / copy_bps):.1f} ms at the run's rate, "
              f"{1e3 * (pinned_s + staged / piped_bps):.1f} at the profile's; the legs overlapped "
              f"(max, the run's rate) {1e3 * overlapped_s:.1f}")


def main() -> None:
    print("1. grids")
    for call in ("call1", "call3"):
        grid(call)
    print("2. call 1's launch-bound configurations")
    launch_bound_factor()
    print("3. the staging copy in the interference benchmark")
    for call in ("call1", "call3"):
        staging_copy(call)
    print("4. continuous vs static")
    for call in ("call2", "call4"):
        continuous(call)
    print("5. the weight stream through the staging ring (static runs)")
    for call in ("call2", "call4"):
        staged_stream(call)


if __name__ == "__main__":
    main()
