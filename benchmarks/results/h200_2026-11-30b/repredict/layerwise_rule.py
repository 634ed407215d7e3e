"""Re-predict call 2's layerwise runs under the serial-schedule rule of hrm.cost after 2026-11-30
(layer_s = the other stages + max(t_h2d, t_copy) instead of their sum), from the stage times the
runs recorded with their prediction; nothing else of the prediction changes. Writes
layerwise_rule.json next to this file.

    python benchmarks/results/h200_2026-11-30b/repredict/layerwise_rule.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(ROOT))

from hrm.cost import schedule_layer_s  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402

BENCH = HERE.parent / "call2_continuous_executor" / "executor" / "executor_bench_2layers.json"


def layer_s(stages: dict[str, float]) -> float:
    times = {"gpu": stages["gpu_s"], "cpu_attn": stages["cpu_attn_s"], "d2h": stages["d2h_s"],
             "h2d": stages["h2d_s"], "copy_thread": stages["copy_thread_s"]}
    return schedule_layer_s(times, overlapped=False)


rows = []
for run in json.loads(BENCH.read_text())["runs"]:
    if run.get("schedule") != "layerwise":
        continue
    pred, layers = run["prediction"], run["num_layers"]
    n, batch = run["workload"]["gen_len"], run["policy"]["batch_size"]
    decode, prefill = pred["stages"]["decode_layer"], pred["stages"]["prefill_layer"]
    step_s = pred["decode_step_s"] - layers * (decode["layer_s"] - layer_s(decode))
    prefill_s = pred["prefill_s"] - layers * (prefill["layer_s"] - layer_s(prefill))
    tok_s = batch * n / (prefill_s + (n - 1) * step_s)
    rows.append({"run": run["name"], "measured_tok_s": run["throughput_tok_s"],
                 "predicted_tok_s_then": pred["throughput_tok_s"],
                 "predicted_tok_s_now": tok_s,
                 "error_pct_then": 100 * (pred["throughput_tok_s"] / run["throughput_tok_s"] - 1),
                 "error_pct_now": 100 * (tok_s / run["throughput_tok_s"] - 1)})
    print(json.dumps(rows[-1]))
write_json_atomic(HERE / "layerwise_rule.json", {"source": str(BENCH.relative_to(ROOT)),
                                                 "rows": rows})
