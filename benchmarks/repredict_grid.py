"""Re-predict measured `hrm validate` grids with today's model (measures nothing).

For each grid directory (validation_configs.csv, validation_stages.csv, validation_summary.json,
validation.config.json as `hrm validate` writes them) and each hardware profile given, the cost
model at HEAD predicts every configuration under the limits the grid ran with; the script
writes, per profile, the throughput MAPE, the worst configuration, and per configuration the
throughput and per-stage errors against the grid's measurements.

    python benchmarks/repredict_grid.py --grid DIR [--grid DIR2] --hardware A.toml \\
        [--hardware B.toml] -o repredict.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from executor.weights import read_model  # noqa: E402
from hrm.hardware import HardwareProfile, load_profile  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.validate import config_of_row, pct_error, predicted  # noqa: E402


def repredict(grid: Path, profile: Path | HardwareProfile) -> dict:
    """Errors of the model at HEAD under `profile` (a profile file, or a profile already loaded)
    on the measured grid in `grid`."""
    summary = json.loads((grid / "validation_summary.json").read_text())
    spec, _ = read_model(str(grid / "validation.config.json"))
    loaded = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    hw = loaded.with_memory(gpu_memory_bytes=summary["gpu_mem_limit_bytes"],
                                           cpu_memory_bytes=summary["cpu_mem_limit_bytes"])
    stages = pd.read_csv(grid / "validation_stages.csv")
    rows = []
    for r in pd.read_csv(grid / "validation_configs.csv").to_dict("records"):
        if not r["ran"]:
            continue
        pred = predicted(spec, hw, config_of_row(r, summary["grid"]))
        measured = stages[(stages.config == r["config"])
                          & (stages.role == r["role"])].set_index("stage")["measured_s"]
        row = {"config": r["config"], "role": r["role"], "measured_tok_s": r["measured_tok_s"],
               "predicted_tok_s": pred["predicted_tok_s"],
               "throughput_error_pct": pct_error(pred["predicted_tok_s"], r["measured_tok_s"]),
               "prefill_error_pct": pct_error(pred["predicted_prefill_s"],
                                              r["measured_prefill_s"]),
               "layer_error_pct": pct_error(pred["predicted_layer_s"], r["measured_layer_s"]),
               "bottleneck": pred["bottleneck"]}
        for stage, p_s in pred["stages"].items():
            m_s = float(measured.get(stage, math.nan))
            row[f"{stage}_error_pct"] = pct_error(p_s, m_s) if m_s > 0 else math.nan
        rows.append(row)
    grid_rows = [x for x in rows if x["role"] == "grid"]
    errors = [abs(x["throughput_error_pct"]) for x in grid_rows]
    worst = max(grid_rows, key=lambda x: abs(x["throughput_error_pct"]))
    return {"grid": str(grid), "profile": str(profile) if isinstance(profile, Path)
            else profile.name, "n_configs": len(grid_rows),
            "throughput_mape": sum(errors) / len(errors),
            "within_10pct": sum(e <= 10 for e in errors),
            "within_5pct": sum(e <= 5 for e in errors),
            "worst_config": worst["config"], "worst_abs_pct_error": abs(
                worst["throughput_error_pct"]), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=Path, action="append", required=True)
    ap.add_argument("--hardware", type=Path, action="append", required=True)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    results = []
    for grid in args.grid:
        for profile in args.hardware:
            res = repredict(grid, profile)
            results.append(res)
            print(f"{grid} on {profile.name}: MAPE {res['throughput_mape']:.1f}%, worst "
                  f"{res['worst_abs_pct_error']:.1f}% ({res['worst_config']}), within 10% / 5%: "
                  f"{res['within_10pct']} / {res['within_5pct']} of {res['n_configs']}")
            for row in res["rows"]:
                print(f"  {row['config']:<30} {row['throughput_error_pct']:+6.1f}%  stages " +
                      " ".join(f"{k.removesuffix('_error_pct')} {v:+.0f}%" for k, v in row.items()
                               if k.endswith("_error_pct") and k != "throughput_error_pct"
                               and not math.isnan(v)))
    write_json_atomic(args.output, {
        "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results})


if __name__ == "__main__":
    main()
