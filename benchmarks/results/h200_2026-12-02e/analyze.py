"""The derived figures of this folder's README, from its committed files (measures nothing).
Run from the repository root:

    python benchmarks/results/h200_2026-12-02e/analyze.py

1. The two full grids (calls 1 and 3): MAPE, configurations within 5% / 10%, the worst, those
   outside 12%, the optimizer gap over per-policy means and over first runs, memory, CPU steal,
   and the pipeline calibration's runs.
2. Call 1 against call 3 (two leases): per stage, measured busy time per decode layer.
3. The host-wait A/B (call 2): measured tokens/s of each configuration in the four runs, and the
   CPU steal of each run (/proc/stat, steal.log).
4. Continuous vs static (call 4): measured and predicted tokens/s, continuous / static in useful
   tokens; the static runs' staging copy rate against the profile's.
5. The KV gather for GPU attention: call 3's attn=gpu trace (launcher spans `kv_gather`) against
   its profile's rate, and, as a diagnostic only (the trace's rate is the validation data), the
   call 3 grid re-predicted at HEAD with that rate in place of the profile's.
6. The launch-bound loop configurations in micro-batches of 16 (n_ub=16, N=1024,prompt=512,
   N=2048,prompt=512: 16, 64, 128 micro-batches per layer) on the grids of seven leases: decode
   layer time per micro-batch, measured and predicted as run.
7. The weight stream with a staging ring: the series rule p / B_pinned + o / B_copy per decode
   step with the copy rate the run's copy thread reached and with its profile's, against the
   measured step: this session's static mtbench (1 layer) and 2026-12-02b call 4's CGOPipe
   (2 layers, issue 5).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks.repredict_grid import repredict  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.roofline import whole_block_tokens  # noqa: E402
from hrm.validate import cpu_jiffies_of, pooled_optimizer_gap, steal_pct  # noqa: E402

HERE = Path(__file__).resolve().parent


def grid(call: str) -> None:
    summary = json.loads((HERE / call / "validate/validation_summary.json").read_text())
    rows = pd.read_csv(HERE / call / "validate/validation_configs.csv")
    ran = rows[(rows.role == "grid") & rows.ran]
    err = ran.throughput_error_pct
    worst = summary["worst_config"]
    print(f"  {call}: MAPE {summary['throughput_mape']:.1f}% over {summary['n_configs']}, "
          f"{(err.abs() <= 5).sum()} within 5%, {(err.abs() <= 10).sum()} within 10%; worst "
          f"{worst['config']} {worst['throughput_error_pct']:+.1f}%")
    for _, r in ran[err.abs() > 12].iterrows():
        print(f"     outside 12%: {r.config} predicted {r.predicted_tok_s:,.0f} measured "
              f"{r.measured_tok_s:,.0f} ({r.throughput_error_pct:+.1f}%)")
    pooled = summary["optimizer_gap_pooled"]
    at_head = pooled_optimizer_gap(rows.to_dict("records"))   # margin_pct is newer than the run
    print(f"     optimizer gap {summary['optimizer_gap_pct']:+.1f}% over means (first runs "
          f"{summary['optimizer_gap_single_run_pct']:+.1f}%), best {pooled['best_config']}; "
          f"against the best other policy, {at_head['best_other_config']}: "
          f"{at_head['margin_pct']:+.1f}%; runs:")
    for name, runs in pooled["runs_per_policy"].items():
        if len(runs) > 1:
            print(f"       {name}: {', '.join(f'{t:,.0f}' for t in runs)}")
    print(f"     memory max {summary['mem_max_abs_pct_error']:.1f}% (GPU "
          f"{summary['gpu_mem_max_abs_pct_error']:.1f}%, CPU "
          f"{summary['cpu_mem_max_abs_pct_error']:.1f}%)")
    steal = summary.get("cpu_steal")
    print("     CPU steal: " + ("not measured (before 2053750)" if steal is None else
                                f"max {steal['max_pct']:.2f}%, over {steal['warn_pct']}%: "
                                f"{steal['configs_over_warn'] or 'none'}"))
    drift = summary["drift"]
    print(f"     drift (base again at the end): throughput {drift['ratios']['throughput']:.2f}x,"
          f" largest {drift['worst']} {drift['ratios'][drift['worst']]:.2f}x")
    source = (HERE / call / "h200-session.toml").read_text()
    cal = re.search(r"took ([\d.]+) ms per decode layer \(median of 3 runs: ([^)]*)\) against "
                    r"([\d.]+) ms", source)
    print(f"     calibration: runs {cal.group(2)}, solo {cal.group(3)} ms, pipeline factor "
          f"{float(cal.group(1)) / float(cal.group(3)):.3f}")


def stages() -> None:
    both = []
    for call in ("call1", "call3"):
        s = pd.read_csv(HERE / call / "validate/validation_stages.csv")
        s = s[s.role == "grid"].set_index(["config", "stage"]).measured_s.rename(call)
        both.append(s)
    table = pd.concat(both, axis=1)
    table["call1/call3"] = table.call1 / table.call3
    picked = ["base", "attn=gpu", "schedule=layerwise", "schedule=cgopipe-serial", "n_ub=16",
              "N=1024"]
    keep = table.loc[picked].reset_index()
    keep = keep[keep.stage.isin(["gpu", "cpu_attn", "h2d", "launcher (host, measured)",
                                 "layer (overlap)"])]
    keep[["call1", "call3"]] *= 1e3
    print(keep.round(2).to_string(index=False))


def ab() -> None:
    runs = ("spin.1", "sleep.1", "spin.2", "sleep.2")
    table = pd.DataFrame({run: pd.read_csv(HERE / "call2" / run / "validation_configs.csv")
                         .set_index("config").measured_tok_s for run in runs})
    print(table.round(0).to_string())
    lines = (HERE / "call2/steal.log").read_text().splitlines()
    for i, run in enumerate(runs):
        before, after = (cpu_jiffies_of(line) for line in lines[2 * i:2 * i + 2])
        print(f"  {run}: steal {steal_pct(before, after):.2f}% of all CPU time")


def continuous() -> None:
    runs = {}
    for part in ("mtbench_rag", "reasoning"):
        doc = json.loads((HERE / "call4" / part / "continuous/continuous_bench_1layers.json")
                         .read_text())
        runs.update({r["name"]: r for r in doc["runs"]})

    def err(r: dict) -> float:
        return 100 * (r["predicted_throughput_tok_s"] / r["throughput_tok_s"] - 1)

    for w in ("mtbench", "rag", "reasoning"):
        c, s = runs[f"continuous_{w}"], runs[f"static_{w}"]
        print(f"  {w}: static {s['throughput_tok_s']:,.0f} (predicted "
              f"{s['predicted_throughput_tok_s']:,.0f}, {err(s):+.1f}%), continuous "
              f"{c['throughput_tok_s']:,.0f} ({c['predicted_throughput_tok_s']:,.0f}, "
              f"{err(c):+.1f}%); continuous/static useful "
              f"{c['useful_throughput_tok_s'] / s['useful_throughput_tok_s']:.2f}x")
        steps = s["workload"]["gen_len"] - 1          # static: one weight pass per decode step
        staged_gbps = (s["realized"]["pageable_weight_bytes"] * steps
                       / s["decode_busy_s"]["copy_thread"] / 1e9)
        print(f"     static: the copy thread staged {staged_gbps:.1f} GB/s while busy; decode "
              f"step {1e3 * s['decode_s'] / steps:.1f} ms")
    profile = (HERE / "call3/h200-session.toml").read_text()
    p2p = re.search(r"\[link.pageable_to_pinned_bps\]\nvalue = ([\d.e+]+)", profile)
    print("  the profile's staging copy (pageable -> pinned): "
          f"{float(p2p.group(1)) / 1e9:.1f} GB/s")


def gather() -> None:
    grid = HERE / "call3/validate"
    trace = json.loads(gzip.decompress((grid / "validation_trace_attn=gpu.json.gz").read_bytes()))
    spans = [e["dur"] * 1e-6 for e in trace["traceEvents"]
             if e.get("ph") == "X" and e["name"] == "kv_gather"]
    rows = pd.read_csv(grid / "validation_configs.csv").set_index("config")
    context = int(rows.loc["attn=gpu", "prompt_len"] + rows.loc["attn=gpu", "gen_len"])
    per_token = 2 * 8 * 128 * 2                       # Mixtral-8x7B: K and V, 8 KV heads, bf16
    copied = 64 * whole_block_tokens(context) * per_token
    traced_bps = copied / statistics.median(spans)
    hw = load_profile(HERE / "call3/h200-session.toml")
    print(f"  attn=gpu trace: {len(spans)} gathers of {copied / 1e6:.1f} MB, median "
          f"{statistics.median(spans) * 1e3:.2f} ms = {traced_bps / 1e9:.1f} GB/s; the profile "
          f"{hw.link.kv_gather_bps / 1e9:.1f} GB/s")
    as_traced = dataclasses.replace(hw, link=dataclasses.replace(hw.link,
                                                                 kv_gather_bps=traced_bps))
    before, after = repredict(grid, hw), repredict(grid, as_traced)
    print(f"  diagnostic, the grid re-predicted with the traced rate: MAPE "
          f"{before['throughput_mape']:.1f}% -> {after['throughput_mape']:.1f}%, worst "
          f"{after['worst_config']} {after['worst_abs_pct_error']:.1f}%")
    old = {r["config"]: r["throughput_error_pct"] for r in before["rows"] if r["role"] == "grid"}
    for r in after["rows"]:
        if r["role"] == "grid" and abs(r["throughput_error_pct"] - old[r["config"]]) > 0.05:
            print(f"     {r['config']}: {old[r['config']]:+.1f}% -> "
                  f"{r['throughput_error_pct']:+.1f}%")


def per_micro_batch() -> None:
    shapes = {"n_ub=16": 16, "N=1024,prompt=512": 64, "N=2048,prompt=512": 128}
    results = HERE.parent
    grids = {"12-02b c1": "h200_2026-12-02b/call1", "12-02b c3": "h200_2026-12-02b/call3",
             "12-02c c4": "h200_2026-12-02c/call4", "12-02d c1": "h200_2026-12-02d/call1",
             "12-02d c4": "h200_2026-12-02d/call4", "12-02e c1": "h200_2026-12-02e/call1",
             "12-02e c3": "h200_2026-12-02e/call3"}
    for name, path in grids.items():
        stages = pd.read_csv(results / path / "validate/validation_stages.csv")
        layer = stages[(stages.role == "grid") & (stages.stage == "layer (overlap)")]
        layer = layer.set_index("config")
        measured = [1e3 * layer.loc[c, "measured_s"] / n for c, n in shapes.items()]
        predicted = [1e3 * layer.loc[c, "predicted_s"] / n for c, n in shapes.items()]
        print(f"  {name}: measured ms per micro-batch at 16/64/128 "
              f"{' / '.join(f'{m:.2f}' for m in measured)}, predicted "
              f"{' / '.join(f'{p:.2f}' for p in predicted)}")


def staged_stream() -> None:
    e = json.loads((HERE / "call4/mtbench_rag/continuous/continuous_bench_1layers.json")
                   .read_text())
    b = json.loads((HERE.parent / "h200_2026-12-02b/call4/executor/executor_bench_2layers.json")
                   .read_text())
    cases = {"12-02e static mtbench, 1 layer": (
                 next(r for r in e["runs"] if r["name"] == "static_mtbench"),
                 HERE / "call3/h200-session.toml"),
             "12-02b CGOPipe gen 64, 2 layers": (
                 next(r for r in b["runs"] if r["name"] == "cgopipe_g64"),
                 HERE.parent / "h200_2026-12-02b/call4/h200-session.toml")}
    for name, (run, profile) in cases.items():
        hw = load_profile(profile)
        steps = run["workload"]["gen_len"] - 1
        pinned, staged = (run["realized"][k] for k in ("pinned_weight_bytes",
                                                        "pageable_weight_bytes"))
        copy_bps = staged * steps / run["decode_busy_s"]["copy_thread"]
        pinned_s = pinned / hw.link.h2d_pinned_bps
        print(f"  {name}: step {1e3 * run['decode_s'] / steps:.0f} ms measured; series rule "
              f"{1e3 * (pinned_s + staged / copy_bps):.0f} ms with the run's copy rate "
              f"({copy_bps / 1e9:.1f} GB/s), "
              f"{1e3 * (pinned_s + staged / hw.link.pageable_to_pinned_bps):.0f} ms with the "
              f"profile's ({hw.link.pageable_to_pinned_bps / 1e9:.1f} GB/s)")


def main() -> None:
    print("1. grids")
    for call in ("call1", "call3"):
        grid(call)
    print("2. measured busy time per decode layer (ms), call 1 vs call 3")
    stages()
    print("3. host-wait A/B (call 2), measured tokens/s")
    ab()
    print("4. continuous vs static (call 4)")
    continuous()
    print("5. the KV gather for GPU attention (call 3)")
    gather()
    print("6. decode layer per micro-batch of 16, launch-bound loop configurations")
    per_micro_batch()
    print("7. the weight stream through the staging ring, per decode step")
    staged_stream()


if __name__ == "__main__":
    main()
