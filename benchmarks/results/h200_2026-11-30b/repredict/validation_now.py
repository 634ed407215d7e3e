"""Today's model (the code at HEAD) on call 4's validation measurements: every configuration
re-predicted with the profile and memory limits that run used; the measurements are unchanged.
Writes validation_now.json next to this file.

    python benchmarks/results/h200_2026-11-30b/repredict/validation_now.py
"""

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from executor.weights import read_model  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.validate import config_of_row, pct_error, predicted  # noqa: E402

RUN = HERE.parent / "call4_host_list" / "validate"
summary = json.loads((RUN / "validation_summary.json").read_text())
spec, _ = read_model(str(RUN / "validation.config.json"))
hw = load_profile(ROOT / "hardware_profiles" / "h200-machine.toml").with_memory(
    gpu_memory_bytes=summary["gpu_mem_limit_bytes"],
    cpu_memory_bytes=summary["cpu_mem_limit_bytes"])
rows = []
for r in pd.read_csv(RUN / "validation_configs.csv").to_dict("records"):
    if not r["ran"]:
        continue
    config = config_of_row(r)
    p = predicted(spec, hw, config)
    rows.append({"config": r["config"], "role": r["role"], "measured_tok_s": r["measured_tok_s"],
                 "predicted_tok_s_then": r["predicted_tok_s"],
                 "predicted_tok_s_now": p["predicted_tok_s"],
                 "error_pct_now": pct_error(p["predicted_tok_s"], r["measured_tok_s"]),
                 "gpu_mem_error_pct_then": r["gpu_mem_error_pct"],
                 "gpu_mem_error_pct_now": pct_error(p["predicted_gpu_mem_bytes"],
                                                    r["measured_gpu_mem_bytes"])})
grid_rows = [x for x in rows if x["role"] == "grid"]
errors = [abs(x["error_pct_now"]) for x in grid_rows]
out = {"source": str(RUN.relative_to(ROOT)), "n_configs": len(grid_rows),
       "throughput_mape_now": sum(errors) / len(errors), "worst_abs_pct_error_now": max(errors),
       "gpu_mem_max_abs_pct_error_now": max(abs(x["gpu_mem_error_pct_now"]) for x in rows
                                            if not math.isnan(x["gpu_mem_error_pct_now"])),
       "rows": rows}
write_json_atomic(HERE / "validation_now.json", out)
print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
