"""The derived figures of this folder's README, from its committed files (measures nothing).
Run from the repository root:

    python benchmarks/results/h200_2026-12-02b/analyze.py

1. N=1024's launching thread per micro-batch (median span of each kind) in the loop and grouped
   traces of calls 1 (grouped path with bincount's sync) and 3 (without it).
2. Per configuration of calls 1 and 3: the model's solo kernels K and host work H of the GPU stage
   (no interference) beside the measured GPU, launcher and layer times per decode layer.
3. The interference variant tried offline and not adopted: the GPU stage solo, slowed by
   (f_launch - 1) t_cpu_attn (only while CPU attention runs), against the model at HEAD, on the
   four grids with CSVs of 2026-12-02 (calls 1, 2) and of this session (calls 1, 3).
4. Continuous / static (call 2) and CGOPipe / layerwise (call 4) throughput ratios.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

import hrm.cost as C  # noqa: E402
from benchmarks.repredict_grid import repredict  # noqa: E402
from executor.weights import read_model  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.validate import config_of_row  # noqa: E402

HERE = Path(__file__).resolve().parent
SPANS = ("launch_pre", "handoff_send", "attn_wait", "handoff_receive", "launch_post")


def launcher_medians(trace: Path) -> dict[str, float]:
    """Median duration (us) of each launcher span kind over the decode windows."""
    with gzip.open(trace) as f:
        doc = json.load(f)
    windows = doc["decode_windows_s"]
    spans = [e for e in doc["traceEvents"] if e.get("ph") == "X" and e["tid"] == "launcher"
             and any(a * 1e6 <= e["ts"] <= b * 1e6 for a, b in windows)]
    return {n: statistics.median(e["dur"] for e in spans if e["name"] == n) for n in SPANS}


def solo_split(grid: Path, profile: Path) -> list[dict]:
    """K and H (s per decode layer, no interference) of each configuration's GPU stage."""
    summary = json.loads((grid / "validation_summary.json").read_text())
    spec, _ = read_model(str(grid / "validation.config.json"))
    hw = load_profile(profile)
    stages = pd.read_csv(grid / "validation_stages.csv")
    out = []
    for r in pd.read_csv(grid / "validation_configs.csv").to_dict("records"):
        config = config_of_row(r, summary["grid"])
        ops = C._layer_ops(spec, config.workload, config.policy, "decode", "moe")
        gpu_ops = [op for op in ops if C._stage_of(op, config.policy.schedule == "cgopipe")
                   == "gpu"]
        k = sum(C._op_time(hw, op, (1.0, 0.0)).const for op in gpu_ops)
        h = sum(C._op_time(hw, op, (1.0, 1.0)).const for op in gpu_ops) - k
        m = stages[stages.config == r["config"]].set_index("stage")["measured_s"]
        launcher = m.get("launcher", m.get("launcher (host, measured)"))
        out.append({"config": r["config"], "K_ms": 1e3 * k, "H_ms": 1e3 * h,
                    "gpu_ms": 1e3 * m["gpu"], "launcher_ms": 1e3 * launcher,
                    "layer_ms": 1e3 * m["layer (overlap)"],
                    "layer_over_solo": m["layer (overlap)"] / (k + h)})
    return out


def overlap_variant_mape(grids: list[tuple[Path, Path]]) -> dict[str, list]:
    head_factors, head_interfered = C.gpu_factors, C.interfered
    out = {"head": [repredict(g, p)["throughput_mape"] for g, p in grids], "overlap": []}
    try:
        for g, p in grids:
            hw = load_profile(p)
            f = hw.interference.launch or hw.interference.gpu

            def interfered(stages, factors, f=f):
                res = head_interfered(stages, factors)
                cpu = stages.get("cpu_attn")
                for s in ("gpu", "launcher"):
                    if cpu is not None and s in stages:
                        res[s] = stages[s] + cpu * (f - 1.0)
                return res
            C.gpu_factors, C.interfered = (lambda hw: (1.0, 1.0)), interfered
            r = repredict(g, p)
            out["overlap"].append((r["throughput_mape"], r["worst_config"],
                                   r["worst_abs_pct_error"]))
    finally:
        C.gpu_factors, C.interfered = head_factors, head_interfered
    return out


def main() -> None:
    print("1. N=1024 launcher spans per micro-batch (median us)")
    for call in ("call1", "call3"):
        for name in ("N=1024", "N=1024_kernel=grouped"):
            med = launcher_medians(HERE / call / "validate" / f"validation_trace_{name}.json.gz")
            print(f"  {call} {name:22s} " + "  ".join(f"{k} {v:.0f}" for k, v in med.items())
                  + f"  sum {sum(med.values()):.0f}")
    print("2. solo K, H vs measured (ms per decode layer)")
    for call in ("call1", "call3"):
        rows = solo_split(HERE / call / "validate", HERE / call / "h200-session.toml")
        print(f"  {call}")
        for r in rows:
            print(f"    {r['config']:30s} K {r['K_ms']:6.1f} H {r['H_ms']:6.1f} | gpu "
                  f"{r['gpu_ms']:6.1f} launcher {r['launcher_ms']:6.1f} layer {r['layer_ms']:6.1f}"
                  f" layer/(K+H) {r['layer_over_solo']:.2f}")
    print("3. interference variant (MAPE %), grids 12-02 call 1, call 2, 12-02b call 1, call 3")
    older = ROOT / "benchmarks/results/h200_2026-12-02"
    grids = [(older / c / "validate", older / c / "h200-session.toml") for c in ("call1", "call2")]
    grids += [(HERE / c / "validate", HERE / c / "h200-session.toml") for c in ("call1", "call3")]
    for k, v in overlap_variant_mape(grids).items():
        print(f"  {k}: {v}")
    print("4. throughput ratios")
    runs = {r["name"]: r for r in json.loads(
        (HERE / "call2/continuous/continuous_bench_1layers.json").read_text())["runs"]}
    def err(r: dict) -> float:
        return 100 * (r["predicted_throughput_tok_s"] / r["throughput_tok_s"] - 1)

    for w in ("mtbench", "rag", "reasoning"):
        c, s = runs[f"continuous_{w}"], runs[f"static_{w}"]
        ratio = c["useful_throughput_tok_s"] / s["useful_throughput_tok_s"]
        print(f"  {w}: continuous/static {ratio:.2f}  (prediction error static {err(s):+.1f}%,"
              f" continuous {err(c):+.1f}%)")
    ex = {r["name"]: r for r in json.loads(
        (HERE / "call4/executor/executor_bench_2layers.json").read_text())["runs"]}
    ratio = ex["cgopipe_g64"]["throughput_tok_s"] / ex["layerwise_g64"]["throughput_tok_s"]
    print(f"  cgopipe/layerwise g64: {ratio:.2f} (prediction error cgopipe "
          f"{err(ex['cgopipe_g64']):+.1f}%, layerwise {err(ex['layerwise_g64']):+.1f}%)")

if __name__ == "__main__":
    main()
