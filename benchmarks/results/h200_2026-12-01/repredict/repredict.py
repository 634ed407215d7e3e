"""The model at HEAD on this session's measurements (nothing measured again): every executor,
static and continuous benchmark run of calls 3 and 4, and call 3's validation grid, predicted
with the limits each run had, under two profiles:

  measured  call 1's profile, the one the runs were predicted with (staging copy 11.4 GB/s,
            timed into one pinned buffer as large as the source)
  refit     the same samples with the staging copy timed again as the executor does it, into a
            ring of pinned pages (call 6: 20.0 GB/s); `hardware_profiles/h200-machine.toml`

A continuous run is re-predicted over its own passes, which the scheduler's dry run
(executor.scheduler.simulate) reproduces: the run recorded the pass count it made, checked here.
Writes repredict.json next to this file.

    python benchmarks/results/h200_2026-12-01/repredict/repredict.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks.repredict_runs import run_prediction  # noqa: E402
from executor.weights import read_model  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.validate import config_of_row, pct_error, predicted  # noqa: E402

PROFILES = {"measured": RUNS / "call1_profile_validate" / "h200-machine.toml",
            "refit": RUNS / "call6_staging_copy" / "h200-machine.toml"}
BENCHES = [RUNS / "call3_alias_validate_executor" / "executor" / "executor_bench_2layers.json",
           RUNS / "call4_continuous_executor" / "executor" / "executor_bench_2layers.json",
           RUNS / "call4_continuous_executor" / "continuous" / "continuous_bench_1layers.json"]
GRID = RUNS / "call3_alias_validate_executor" / "validate"


bench_rows = []
for bench in BENCHES:
    for run in json.loads(bench.read_text())["runs"]:
        if "command" not in run:  # the accelerate baseline has no prediction
            continue
        row = {"source": str(bench.relative_to(RUNS)), "run": run["name"],
               "measured_tok_s": run["throughput_tok_s"],
               "predicted_tok_s_then": run["predicted_throughput_tok_s"]}
        for name, profile in PROFILES.items():
            tok_s = run_prediction(run, profile)
            row[f"predicted_tok_s_{name}"] = tok_s
            row[f"error_pct_{name}"] = pct_error(tok_s, run["throughput_tok_s"])
        row["error_pct_then"] = pct_error(row["predicted_tok_s_then"], row["measured_tok_s"])
        bench_rows.append(row)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))

summary = json.loads((GRID / "validation_summary.json").read_text())
spec, _ = read_model(str(GRID / "validation.config.json"))
grid_rows = []
for r in pd.read_csv(GRID / "validation_configs.csv").to_dict("records"):
    config = config_of_row(r)
    row = {"config": r["config"], "role": r["role"], "measured_tok_s": r["measured_tok_s"],
           "predicted_tok_s_then": r["predicted_tok_s"]}
    for name, profile in PROFILES.items():
        hw = load_profile(profile).with_memory(gpu_memory_bytes=summary["gpu_mem_limit_bytes"],
                                               cpu_memory_bytes=summary["cpu_mem_limit_bytes"])
        row[f"error_pct_{name}"] = pct_error(predicted(spec, hw, config)["predicted_tok_s"],
                                             r["measured_tok_s"])
    grid_rows.append(row)
errors = {name: [abs(x[f"error_pct_{name}"]) for x in grid_rows if x["role"] == "grid"]
          for name in PROFILES}
out = {"profiles": {k: str(v.relative_to(ROOT)) for k, v in PROFILES.items()},
       "benchmark_runs": bench_rows,
       "validation_grid": {"source": str(GRID.relative_to(ROOT)),
                           **{f"throughput_mape_{k}": sum(v) / len(v) for k, v in errors.items()},
                           **{f"worst_abs_pct_error_{k}": max(v) for k, v in errors.items()},
                           "rows": grid_rows}}
write_json_atomic(HERE / "repredict.json", out)
print(json.dumps({k: v for k, v in out["validation_grid"].items() if k != "rows"}, indent=1))
