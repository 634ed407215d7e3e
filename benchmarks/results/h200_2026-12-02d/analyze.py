"""The derived figures of this folder's README, from its committed files (measures nothing).
Run from the repository root:

    python benchmarks/results/h200_2026-12-02d/analyze.py

1. diag_kv_gather (calls 1 and 2): one 64-sequence micro-batch's KV gather (host) and its DMA,
   alone.
2. GPU attention in the pipeline: per micro-batch, the launching thread's gather (launcher
   track, kv_gather), the DMA on the compute stream (kv_dma track) and the launching thread's
   two spans, from the traces of calls 1 and 3.
3. Call 1's grid (profiled at 10dbbc7, before the model change) re-predicted at HEAD: with its
   profile as measured (its kv_gather timed the old way: a ragged batch, in bytes held) and with
   the gather rate that lease's diag_kv_gather measured the new way (uniform contexts, bytes
   copied), against the prediction it ran with.
4. Call 3's grid (profiled and run at a1250e2): CPU attention's measured / predicted busy time
   in the order the grid ran, and the errors before and after it returned to the model.
5. Call 4's grid (profiled and run at a1250e2, the change's test): as run; with the model before
   the change (475b28a, in a temporary git worktree, same profile); at HEAD with the profile's
   executor calibration left out (the microbenchmark's factors).
6. The optimizer check on every grid of 2026-12-02 with the expert kernel column (call 3 of
   2026-12-02c ran 7 configurations, the others the full grid): where the
   optimizer's policy is a grid point (hrm.validate.optimizer_twin), the two runs' spread.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks.repredict_grid import repredict  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.validate import optimizer_twin  # noqa: E402

HERE = Path(__file__).resolve().parent
GPU_ATTENTION = ("attn=gpu", "N=64,attn=gpu", "N=1024,attn=gpu", "schedule=layerwise",
                 "N=1024,schedule=layerwise")


def diag_gather() -> None:
    print("1. diag_kv_gather: one micro-batch (64 x 137 tokens, bf16), alone")
    for call in ("call1", "call2"):
        print(f"  {call}: " + (HERE / call / "diag/diag_kv_gather.log").read_text().strip())


def _decode_spans(path: Path) -> dict[tuple[str, str], list[float]]:
    """Durations (ms) per (track, name) of the decode spans of one trace file."""
    with gzip.open(path) as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("ph") == "X" and e["args"].get("layer") is not None]
    prefill_end = max((e["ts"] + e["dur"] for e in events if e["name"] == "prefill"), default=0)
    out = collections.defaultdict(list)
    for e in events:
        if e["ts"] >= prefill_end:
            out[(e["tid"], e["name"])].append(e["dur"] / 1e3)
    return out


def pipeline_spans() -> None:
    print("2. GPU attention in the pipeline, ms per micro-batch (mean over decode)")
    keys = [("launcher", "kv_gather"), ("kv_dma", "kv_h2d"), ("launcher", "launch_pre"),
            ("launcher", "launch_post"), ("cpu_attention", "kv_append")]
    print("  " + " " * 38 + "  ".join(f"{n:>11s}" for _, n in keys))
    for call in ("call1", "call3"):
        for config in GPU_ATTENTION:
            path = HERE / call / f"validate/validation_trace_{config.replace(',', '_')}.json.gz"
            if not path.exists():
                continue
            spans = _decode_spans(path)
            means = [sum(spans[k]) / len(spans[k]) if spans[k] else float("nan") for k in keys]
            print(f"  {call} {config:32s}" + "  ".join(f"{m:11.2f}" for m in means))


def call1_repredicted() -> None:
    print("3. call 1's grid: throughput error (%) as run (10dbbc7) and re-predicted at HEAD")
    grid, profile = HERE / "call1/validate", HERE / "call1/h200-session.toml"
    hw = load_profile(profile)
    # the log's "gather 2.20 ms (22.9 GB/s copied, ...)": call 1's diag wrote no JSON
    rate = float((HERE / "call1/diag/diag_kv_gather.log").read_text().split("(")[1]
                 .split(" GB/s")[0]) * 1e9
    new = dataclasses.replace(hw, link=dataclasses.replace(hw.link, kv_gather_bps=rate))
    ran = pd.read_csv(grid / "validation_configs.csv").set_index("config")
    variants = {"profile as measured": repredict(grid, hw),
                f"kv_gather {rate / 1e9:.1f} GB/s (diag)": repredict(grid, new)}
    print(f"  {'config':30s} {'as run':>8s}" + "".join(f"{k:>30s}" for k in variants))
    rows = {k: {r['config']: r['throughput_error_pct'] for r in v['rows']}
            for k, v in variants.items()}
    for config in GPU_ATTENTION + ("schedule=cgopipe-serial",):
        print(f"  {config:30s} {ran.loc[config, 'throughput_error_pct']:+8.1f}"
              + "".join(f"{rows[k][config]:+30.1f}" for k in variants))
    grid_rows = ran[ran.role == "grid"]
    print(f"  {'MAPE':30s} {grid_rows.throughput_error_pct.abs().mean():8.1f}"
          + "".join(f"{v['throughput_mape']:30.1f}" for v in variants.values()))
    print(f"  {'worst':30s} {grid_rows.throughput_error_pct.abs().max():8.1f}"
          + "".join(f"{v['worst_abs_pct_error']:30.1f}" for v in variants.values())
          + f"   ({', '.join(v['worst_config'] for v in variants.values())})")


def call3_disturbance() -> None:
    print("4. call 3: CPU attention measured / predicted, in the order the grid ran")
    grid = HERE / "call3/validate"
    configs = pd.read_csv(grid / "validation_configs.csv")
    stages = pd.read_csv(grid / "validation_stages.csv")
    cpu = stages[stages.stage == "cpu_attn"].set_index("config")
    for _, r in configs.iterrows():
        c = cpu.loc[r.config]
        ratio = c.measured_s / c.predicted_s if c.predicted_s > 0 else float("nan")
        print(f"  {r.config:30s} cpu_attn {ratio:5.2f}   throughput "
              f"{r.throughput_error_pct:+6.1f}%")
    grid_rows = configs[configs.role == "grid"].reset_index(drop=True)
    after = grid_rows.index >= grid_rows.index[grid_rows.config == "n_ub=8,r_w=0.03,gen=32"][0]
    err = grid_rows.throughput_error_pct.abs()
    print(f"  MAPE all {err.mean():.1f}% ({len(err)}); before the return {err[~after].mean():.1f}%"
          f" ({(~after).sum()}); from n_ub=8,r_w=0.03,gen=32 on {err[after].mean():.1f}% "
          f"({after.sum()}), worst {err[after].max():.1f}%")


#: the commit before this session's model change
BEFORE = "475b28a"
_OLD_REPREDICT = """
import json, sys
from pathlib import Path
from benchmarks.repredict_grid import repredict
r = repredict(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps(r))
"""


def _repredict_at(commit: str, grid: Path, profile: Path) -> dict:
    """benchmarks/repredict_grid.py's errors with the model of `commit` (a git worktree)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), commit],
                       cwd=ROOT, check=True, capture_output=True)
        try:
            out = subprocess.run([sys.executable, "-c", _OLD_REPREDICT, str(grid), str(profile)],
                                 cwd=tree, check=True, capture_output=True, text=True,
                                 env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           check=True, capture_output=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def call4_test() -> None:
    print("5. call 4 (the test lease): throughput error (%)")
    grid, profile = HERE / "call4/validate", HERE / "call4/h200-session.toml"
    hw = load_profile(profile)
    uncalibrated = dataclasses.replace(
        hw, interference=dataclasses.replace(hw.interference, pipeline=None))
    ran = pd.read_csv(grid / "validation_configs.csv").set_index("config")
    variants = {f"model at {BEFORE}": _repredict_at(BEFORE, grid, profile),
                "HEAD, no calibration": repredict(grid, uncalibrated)}
    rows = {k: {r["config"]: r["throughput_error_pct"] for r in v["rows"]}
            for k, v in variants.items()}
    print(f"  pipeline factor {hw.interference.pipeline:.2f} (f_g {hw.interference.gpu:.2f}, "
          f"f_launch {hw.interference.launch:.2f})")
    print(f"  {'config':30s} {'as run':>8s}" + "".join(f"{k:>24s}" for k in variants))
    for config in ran[ran.role == "grid"].index:
        print(f"  {config:30s} {ran.loc[config, 'throughput_error_pct']:+8.1f}"
              + "".join(f"{rows[k][config]:+24.1f}" for k in variants))
    grid_rows = ran[ran.role == "grid"]
    err = grid_rows.throughput_error_pct.abs()
    print(f"  {'MAPE':30s} {err.mean():8.1f}"
          + "".join(f"{v['throughput_mape']:24.1f}" for v in variants.values()))
    print(f"  {'worst':30s} {err.max():8.1f}"
          + "".join(f"{v['worst_abs_pct_error']:24.1f}" for v in variants.values()))
    print(f"  {'within 5%':30s} {(err <= 5).sum():8d}"
          + "".join(f"{v['within_5pct']:24d}" for v in variants.values()))


def optimizer_twins() -> None:
    print("6. the optimizer's policy as a grid point: the same policy's two runs")
    for grid in sorted(HERE.parent.glob("h200_2026-12-02*/call*/validate/validation_configs.csv")):
        rows = pd.read_csv(grid).to_dict("records")
        if "expert_kernel" not in rows[0] or not any(r["role"] == "optimizer" for r in rows):
            continue
        gap = json.loads((grid.parent / "validation_summary.json").read_text())[
            "optimizer_gap_pct"]
        twin = optimizer_twin(rows)
        where = grid.parent.parent.relative_to(HERE.parent)
        print(f"  {str(where):26s} gap {gap:+5.1f}%  " + (
            f"twin {twin['config']}: spread {twin['spread_pct']:+5.1f}%" if twin else "no twin"))


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    diag_gather()
    pipeline_spans()
    call1_repredicted()
    call3_disturbance()
    call4_test()
    optimizer_twins()
