"""The derived figures of this folder's README, from its committed traces and tables (measures
nothing). Run from the repository root:

    python benchmarks/results/h200_2026-12-01_s4/analyze.py

1. N=1024's launcher track in call 1 (median per micro-batch and layer, busy time).
2. N=1024's launcher busy time per layer over the model's GPU stage without interference, per
   call, with the op counts of the executor each call ran (calls 1-2: 41 / 3 / 27 / 19 per
   micro-batch in bf16, before 069f53e; calls 3-4: those at HEAD).
3. n_ub=16's prefill: GPU time per item and the GPU idle between items (calls 2 and 3).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import hrm.roofline as R  # noqa: E402
from hrm.hardware import Interference, load_profile  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.validate import config_of_row, predicted  # noqa: E402

HERE = Path(__file__).resolve().parent
OLD_OPS = (41, 3, 27, 19)   # OPS_ATTENTION_IN, _OUT, OPS_MOE_ROUTING, OPS_PER_EXPERT before 069f53e


def events(path: Path) -> tuple[list[dict], list[list[float]]]:
    doc = json.loads(gzip.decompress(path.read_bytes()))
    return [e for e in doc["traceEvents"] if e.get("ph") == "X"], doc["decode_windows_s"]


def launcher_spans() -> None:
    ev, _ = events(HERE / "call1/validate/validation_trace_N=1024.json.gz")
    spans = [e for e in ev if e["tid"] == "launcher"]
    for name in ("launch_pre", "handoff_send", "attn_wait", "handoff_receive", "launch_post"):
        durs = [e["dur"] for e in spans if e["name"] == name]
        print(f"  {name:16s} median {statistics.median(durs):7.0f} us, "
              f"total {sum(durs) / 1e3:7.1f} ms")
    start, end = min(e["ts"] for e in spans), max(e["ts"] + e["dur"] for e in spans)
    busy = sum(e["dur"] for e in spans if e["name"] != "attn_wait")
    print(f"  busy {busy / 1e3:.1f} ms of {(end - start) / 1e3:.1f} ms")


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def launcher_over_model() -> None:
    spec = dataclasses.replace(load_model_spec("mixtral-8x7b"), num_layers=4)
    at_head = (R.OPS_ATTENTION_IN, R.OPS_ATTENTION_OUT, R.OPS_MOE_ROUTING, R.OPS_PER_EXPERT)
    for call, ops in (("call1", OLD_OPS), ("call2", OLD_OPS), ("call3", at_head),
                      ("call4", at_head)):
        R.OPS_ATTENTION_IN, R.OPS_ATTENTION_OUT, R.OPS_MOE_ROUTING, R.OPS_PER_EXPERT = ops
        hw = load_profile(HERE / call / "h200-session.toml")
        solo = dataclasses.replace(hw, interference=Interference())
        grid = HERE / call / "validate"
        stages = {(r["config"], r["stage"]): float(r["measured_s"] or "nan")
                  for r in rows(grid / "validation_stages.csv")}
        row = next(r for r in rows(grid / "validation_configs.csv") if r["config"] == "N=1024")
        model_s = predicted(spec, solo, config_of_row(row))["stages"]["gpu"]
        launcher_s = stages["N=1024", "launcher (host, measured)"]
        print(f"  {call}: launcher {launcher_s * 1e3:.1f} ms / model {model_s * 1e3:.1f} ms = "
              f"{launcher_s / model_s:.2f} (profile: op {hw.gpu.op_overhead_s * 1e6:.1f} us, "
              f"hand-off {hw.gpu.attention_handoff_s * 1e6:.0f} us, GPU factor "
              f"{hw.interference.gpu:.2f})")
    R.OPS_ATTENTION_IN, R.OPS_ATTENTION_OUT, R.OPS_MOE_ROUTING, R.OPS_PER_EXPERT = at_head


def prefill_gaps() -> None:
    for call in ("call2", "call3"):
        ev, windows = events(HERE / call / "validate/validation_trace_n_ub=16.json.gz")
        gpu = sorted((e for e in ev if e["tid"] == "gpu" and e["ts"] < windows[0][0] * 1e6),
                     key=lambda e: e["ts"])
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(gpu, gpu[1:], strict=False)]
        gpu_us = statistics.median(e["dur"] for e in gpu)
        print(f"  {call}: {len(gpu)} items, GPU median {gpu_us:.0f} us, gaps median "
              f"{statistics.median(gaps):.0f} us, total {sum(gaps) / 1e3:.1f} ms")


if __name__ == "__main__":
    print("1. call 1, N=1024, launcher track")
    launcher_spans()
    print("2. N=1024: launcher busy per layer / the model's GPU stage without interference")
    launcher_over_model()
    print("3. n_ub=16 prefill")
    prefill_gaps()
