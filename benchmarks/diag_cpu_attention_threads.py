"""Diagnosis: how fast the executor's CPU attention call runs on a worker thread while the other
pipeline threads are busy, one load at a time. The validation traces of 2026-12-01 showed
`cpu_attn` taking 7.3 ms (median) per micro-batch of 64 x 136 bf16 tokens in the base
configuration, where the 2026-11-30 traces had 2.4 ms for the same call.

Scenarios (each a loop of the call for --window-s seconds, KV bytes/s from the median call):
  main         the call on the main thread
  worker       the call on a worker thread (the executor's CPUWorker), main thread asleep
  +launch      worker, while the main thread launches small GPU ops back to back (GIL, a core)
  +link        worker, while a link thread streams pinned 64 MiB H2D copies and waits for each
               with Event.synchronize (as executor.schedule.WeightLink does)
  +both        both loads
each at the executor's thread count (executor.schedule.compute_threads) and at other counts;
then, at the executor's thread count, where the KV is read from (2026-12-01, third session: the
validation grid's cpu_attn spans ran 1.4-1.9x the profile's curve, in serial schedules too):
  worker cold          calls rotate over KV caches of --cold-gib together (DRAM, not the LLC:
                       the profile's attn_cold_bytes)
  worker gap           the same KV each call, --gap-ms asleep between calls (the worker waits
                       for the next micro-batch's q/k/v: idle OpenMP threads)
  worker cold+gap      both

    python3 benchmarks/diag_cpu_attention_threads.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.schedule import compute_threads  # noqa: E402
from hrm.io import write_text_atomic  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.profile import decode_attention_call  # noqa: E402


def timed_loop(call, window_s: float, gap_s: float = 0.0) -> list[float]:
    call()
    times, end = [], time.perf_counter() + window_s
    while time.perf_counter() < end:
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def launch_load(stop: threading.Event) -> None:
    """Small GPU ops queued back to back from Python (the launching thread's pattern)."""
    x = torch.zeros(64, 4096, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(100):
            x.add_(1.0)
        torch.cuda.current_stream().synchronize()


def link_load(stop: threading.Event) -> None:
    """Pinned 64 MiB H2D copies on a stream of their own, each waited for by Event.synchronize."""
    host = torch.empty(64 * 2**20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    stream = torch.cuda.Stream()
    while not stop.is_set():
        with torch.cuda.stream(stream):
            dev.copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        event.synchronize()


def scenario(call, kv_bytes: float, loads: list, on_worker: bool, window_s: float,
             gap_s: float = 0.0) -> dict:
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(stop,), daemon=True) for load in loads]
    for t in threads:
        t.start()
    time.sleep(0.2)
    try:
        if on_worker:
            with ThreadPoolExecutor(1) as pool:
                times = pool.submit(timed_loop, call, window_s, gap_s).result()
        else:
            times = timed_loop(call, window_s, gap_s)
    finally:
        stop.set()
        for t in threads:
            t.join()
    median = statistics.median(times)
    return {"calls": len(times), "median_s": median, "kv_gbps": kv_bytes / median / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=136)
    ap.add_argument("--cold-gib", type=float, default=1.0)
    ap.add_argument("--gap-ms", type=float, default=1.0)
    ap.add_argument("--kv-only", action="store_true",
                    help="only the cold / gap scenarios (where the KV is read from)")
    args = ap.parse_args()
    spec = load_model_spec("mixtral-8x7b")
    cuda = torch.cuda.is_available()
    default_threads = compute_threads()
    results = []
    counts = () if args.kv_only else (default_threads, 6, 8, 12, 14,
                                          len(os.sched_getaffinity(0)))
    for threads in sorted(set(counts)):
        torch.set_num_threads(threads)
        call, kv_bytes = decode_attention_call(spec, args.batch, args.context, "bf16")
        runs = [("main", [], False), ("worker", [], True)]
        if cuda:
            runs += [("+launch", [launch_load], True), ("+link", [link_load], True),
                     ("+both", [launch_load, link_load], True)]
        for name, loads, on_worker in runs:
            row = {"threads": threads, "scenario": name,
                   **scenario(call, kv_bytes, loads, on_worker, args.window_s)}
            print(json.dumps(row), flush=True)
            results.append(row)
    torch.set_num_threads(default_threads)
    warm = decode_attention_call(spec, args.batch, args.context, "bf16")
    cold = decode_attention_call(spec, args.batch, args.context, "bf16", args.cold_gib * 2**30)
    for name, (call, kv_bytes), gap_s in (("worker", warm, 0.0), ("worker cold", cold, 0.0),
                                          ("worker gap", warm, args.gap_ms / 1e3),
                                          ("worker cold+gap", cold, args.gap_ms / 1e3)):
        row = {"threads": default_threads, "scenario": name,
               **scenario(call, kv_bytes, [], True, args.window_s, gap_s)}
        print(json.dumps(row), flush=True)
        results.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "diag_cpu_attention_threads", "batch": args.batch,
           "context": args.context, "kv_dtype": "bf16", "executor_threads": default_threads,
           "results": results, "cold_gib": args.cold_gib, "gap_ms": args.gap_ms,
           "lscpu_caches": subprocess.run(["lscpu", "-C"], capture_output=True,
                                          text=True).stdout,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "cores": len(os.sched_getaffinity(0)),
                       "gpu": torch.cuda.get_device_name() if cuda else None,
                       "torch": torch.__version__, "cuda": torch.version.cuda,
                       "omp_env": {k: v for k, v in os.environ.items()
                                   if k.startswith(("OMP_", "GOMP_", "KMP_"))}},
           "command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat()}
    write_text_atomic(args.out / "diag_cpu_attention_threads.json", json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
