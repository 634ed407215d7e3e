"""Why do attention outputs reach the GPU late? Latency of a small pinned H2D copy (one
micro-batch's attention output) while weight pages stream, as in the executor's CGOPipe.

On 2026-11-30 the validation trace showed the output copy of a micro-batch running up to 40 ms
after its CPU attention ended (median 5 ms), which serialized the GPU and CPU stages. Scenarios,
each timed from the host (enqueue to completion of the small copy):
  idle            nothing else on the GPU
  weights         16 MiB pinned pages on another stream, at most 64 MiB queued (the executor's
                  throttle, executor.schedule.WEIGHT_BYTES_IN_FLIGHT)
  weights+gated   as above, and the weights stream waits for an event of a busy compute stream
                  before each 256 MiB (the executor's wait for a staging buffer's last use)

Run it once as is and once with CUDA_DEVICE_MAX_CONNECTIONS=32 (the default of 8 hardware queues
can put two streams in one queue, so that one stream's wait holds the other's work back):
    python benchmarks/diag_copy_lag.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.schedule import WEIGHT_BYTES_IN_FLIGHT  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402

MiB = 2**20
PAGE_BYTES = 16 * MiB
GATE_BYTES = 256 * MiB
ACT_BYTES = 1024 * 4096 * 2        # 1024 tokens of Mixtral's hidden size in bf16


def stream_weights(src: torch.Tensor, dst: torch.Tensor, stream: torch.cuda.Stream,
                   stop: threading.Event, gate: list | None) -> None:
    """Copy src to dst in pages, at most WEIGHT_BYTES_IN_FLIGHT queued, until `stop`."""
    page = PAGE_BYTES // src.element_size()
    queued: deque = deque()
    in_flight = 0
    with torch.cuda.stream(stream):
        while not stop.is_set():
            for start in range(0, src.numel(), page):
                if gate is not None and (start * src.element_size()) % GATE_BYTES == 0 and gate:
                    stream.wait_event(gate[-1])
                while queued and in_flight >= WEIGHT_BYTES_IN_FLIGHT:
                    event, nbytes = queued.popleft()
                    event.synchronize()
                    in_flight -= nbytes
                dst[start:start + page].copy_(src[start:start + page], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                queued.append((event, PAGE_BYTES))
                in_flight += PAGE_BYTES
                if stop.is_set():
                    break
    stream.synchronize()


def busy_compute(stop: threading.Event, gate: list) -> None:
    """GEMMs on the default stream, an event after each burst (the gate the weights wait for)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        event = torch.cuda.Event()
        event.record()
        gate.append(event)
        event.synchronize()


def copy_latencies_s(samples: int) -> list[float]:
    src = torch.empty(ACT_BYTES // 2, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    stream = torch.cuda.Stream()
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        event.synchronize()
        out.append(time.perf_counter() - t0)
        time.sleep(0.002)
    return out


def scenario(name: str, samples: int) -> dict:
    stop, gate, threads = threading.Event(), [], []
    if name != "idle":
        src = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        threads.append(threading.Thread(target=stream_weights, args=(
            src, dst, torch.cuda.Stream(), stop, gate if name == "weights+gated" else None)))
    if name == "weights+gated":
        threads.append(threading.Thread(target=busy_compute, args=(stop, gate)))
    for t in threads:
        t.start()
    time.sleep(0.2)
    lat = copy_latencies_s(samples)
    stop.set()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    lat_ms = sorted(x * 1e3 for x in lat)
    return {"scenario": name, "samples": samples, "median_ms": statistics.median(lat_ms),
            "p90_ms": lat_ms[int(0.9 * len(lat_ms))], "max_ms": lat_ms[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("diag_copy_lag needs a CUDA GPU")
    connections = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default (8)")
    rows = []
    for name in ("idle", "weights", "weights+gated"):
        rows.append(scenario(name, args.samples) | {"cuda_device_max_connections": connections})
        print(json.dumps(rows[-1]), flush=True)
    tag = "default" if connections.startswith("default") else connections
    write_json_atomic(args.out / f"diag_copy_lag_connections_{tag}.json", {
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cuda": torch.version.cuda},
        "command": " ".join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows})


if __name__ == "__main__":
    main()
