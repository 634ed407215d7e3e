"""Diagnosis from a measured CGOPipe trace (`hrm run --trace`, CPU decode attention): per decode
layer visit, how the weight stream and the launching thread meet at the staging buffers.

For each layer visit j (weights of one layer streamed once): t_j, the end of its last weight
copy; W_j, its first to last weight copy and the copies' busy time; the launching thread's loop
for that layer, from its first attention wait (S_j) to the end of its last post-attention launch
(E_j); the GPU's end of that layer's last post-attention (G_j), which frees the layer's staging
buffer; the launching thread's busy time per visit (its spans but the attention waits) and its
attention waits; and, with b buffers, whether visit j + b's first copy started right after G_j
(within `--tolerance-ms`) while the link had been idle: the staging-buffer wait. Medians over the
decode.
Measures nothing new; reads the trace.

    python3 benchmarks/diag_trace_layers.py TRACE.json[.gz] [--buffers 2] [-o RESULT.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hrm.io import write_json_atomic  # noqa: E402

#: weight copies of one layer visit closer than this (us) belong to the same visit
VISIT_GAP_US = 20_000


def load_events(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def weight_visits(events: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Consecutive weight copies of one layer, grouped: start, end, busy (us), layer."""
    visits: list[dict[str, float]] = []
    for e in sorted((e for e in events if e["name"] == "weights_h2d"), key=lambda e: e["ts"]):
        layer, end = e["args"]["layer"], e["ts"] + e["dur"]
        if visits and visits[-1]["layer"] == layer and e["ts"] - visits[-1]["end"] < VISIT_GAP_US:
            visits[-1]["end"], visits[-1]["busy"] = end, visits[-1]["busy"] + e["dur"]
        else:
            visits.append({"layer": layer, "start": e["ts"], "end": end, "busy": e["dur"]})
    return visits


def analyse(events: list[dict[str, Any]], buffers: int, tolerance_ms: float) -> dict[str, Any]:
    decode_start = max((e["ts"] + e["dur"] for e in events if e["name"] == "prefill"), default=0)
    events = [e for e in events if e["ts"] >= decode_start]
    visits = weight_visits(events)

    def track(name: str, tid: str) -> list[dict[str, Any]]:
        return sorted((e for e in events if e["name"] == name and e["tid"] == tid),
                      key=lambda e: e["ts"])

    waits, launches, posts = (track("attn_wait", "launcher"), track("launch_post", "launcher"),
                              track("post_attn", "gpu"))
    n_ub = len({e["args"]["micro_batch"] for e in launches})
    loops = []
    for i in range(len(launches) // n_ub):
        group = slice(i * n_ub, (i + 1) * n_ub)
        loops.append({"layer": launches[group][0]["args"]["layer"], "S": waits[group][0]["ts"],
                      "E": launches[group][-1]["ts"] + launches[group][-1]["dur"],
                      "G": posts[group][-1]["ts"] + posts[group][-1]["dur"]})
    rows = []
    for loop in loops:   # the visit whose weights this loop's experts read
        mine = [i for i, v in enumerate(visits)
                if v["layer"] == loop["layer"] and v["end"] < loop["G"]]
        if not mine or mine[-1] + buffers >= len(visits):
            continue
        i = mine[-1]
        later, before = visits[i + buffers], visits[i + buffers - 1]
        rows.append({"x_us": loop["S"] - visits[i]["end"], "loop_us": loop["E"] - loop["S"],
                     "gpu_tail_us": loop["G"] - loop["E"],
                     "next_start_after_release_us": later["start"] - loop["G"],
                     "link_idle_before_us": later["start"] - before["end"]})
    tol_us = tolerance_ms * 1e3
    buffer_bound = sum(1 for r in rows if abs(r["next_start_after_release_us"]) < tol_us
                       and r["link_idle_before_us"] > tol_us)

    launcher = [e for e in events if e["tid"] == "launcher"]
    waited_us = sum(e["dur"] for e in launcher if e["name"] == "attn_wait")
    busy_us = sum(e["dur"] for e in launcher) - waited_us

    def median_ms(values: list[float]) -> float:
        return statistics.median(values) / 1e3 if values else float("nan")

    return {
        "layer_visits": len(visits), "micro_batches": n_ub, "buffers": buffers,
        "period_ms": median_ms([b["end"] - a["end"]
                                for a, b in zip(visits, visits[1:], strict=False)]),
        "weights_span_ms": median_ms([v["end"] - v["start"] for v in visits]),
        "weights_busy_ms": median_ms([v["busy"] for v in visits]),
        "launcher_loop_ms": median_ms([r["loop_us"] for r in rows]),
        "launcher_busy_per_visit_ms": busy_us / len(visits) / 1e3 if visits else float("nan"),
        "launcher_attn_wait_per_visit_ms": waited_us / len(visits) / 1e3 if visits else
        float("nan"),
        "loop_start_after_weights_in_ms": median_ms([r["x_us"] for r in rows]),
        "gpu_tail_after_last_launch_ms": median_ms([r["gpu_tail_us"] for r in rows]),
        "link_idle_before_visit_ms": median_ms([r["link_idle_before_us"] for r in rows]),
        "buffer_bound_visits": buffer_bound, "visits_checked": len(rows),
        "tolerance_ms": tolerance_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--buffers", type=int, default=2, help="the run's staging buffers")
    ap.add_argument("--tolerance-ms", type=float, default=0.5)
    ap.add_argument("-o", "--out", type=Path, help="result JSON")
    args = ap.parse_args()
    result = analyse(load_events(args.trace), args.buffers, args.tolerance_ms)
    for key, value in result.items():
        print(f"{key:34s} {value:.2f}" if isinstance(value, float) else f"{key:34s} {value}")
    if args.out:
        write_json_atomic(args.out, {"trace": str(args.trace), **result,
                                     "command": " ".join(["python3", *sys.argv]),
                                     "date": datetime.now(UTC).isoformat()})


if __name__ == "__main__":
    main()
