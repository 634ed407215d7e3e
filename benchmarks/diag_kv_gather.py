"""Diagnosis: where GPU attention over a CPU KV cache spends its time, the cost model's
'kv_gather' and 'kv_h2d' terms (hrm/cost.py `transfer_time`).

One decode micro-batch of the validation grid (64 sequences, Mixtral-8x7B's KV heads, bf16,
uniform contexts of `--context` tokens: the grid's prompts are of one length) is gathered from
a CPU block cache (executor.kv_cache.KVCache.gather_host, into pinned memory) and copied to the
GPU, as the executor's launching thread does. Timed separately: the host gather, and the two
DMAs (CUDA events on their stream); each alone and beside a weight stream (16 MiB pinned pages
copied back to back on another stream from a 2 GiB ring, as the executor's prefetch does in a
link-bound layer). The rates are given per byte copied (whole blocks: every row to the last
block) and per byte of KV the sequences hold.

    python3 benchmarks/diag_kv_gather.py --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from executor.kv_cache import KVCache  # noqa: E402
from executor.weights import read_model  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.roofline import whole_block_tokens  # noqa: E402


def measure(caches: list[KVCache], batch: int, length: int, device: torch.device, reps: int
            ) -> dict[str, list[float]]:
    """Per rep: host gather seconds, DMA seconds (events on a side stream), and the two in a
    row (host gather, then the DMA waited for)."""
    stream = torch.cuda.Stream(device)
    out: dict[str, list[float]] = {"gather_s": [], "dma_s": [], "gather_then_dma_s": []}
    for i in range(reps + 2):
        cache = caches[i % len(caches)]
        t0 = time.perf_counter()
        k, v = cache.gather_host(0, slice(0, batch), length, pinned=True)
        t1 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            kd, vd = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
            end.record(stream)
        end.synchronize()
        t2 = time.perf_counter()
        if i >= 2:
            out["gather_s"].append(t1 - t0)
            out["dma_s"].append(start.elapsed_time(end) / 1e3)
            out["gather_then_dma_s"].append(t2 - t0)
        del kd, vd
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=136)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=10,
                        help="torch threads (the executor's launching thread's)")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.set_num_threads(args.threads)
    spec, _ = read_model("mixtral-8x7b")
    one = dataclasses.replace(spec, num_layers=1)
    length = args.context + 1
    caps = [length] * args.batch
    caches = [KVCache.allocate(one, caps, torch.bfloat16, torch.device("cpu"), float("inf"), "CPU")
              for _ in range(16)]
    for c in caches:
        for t in c.k[0] + c.v[0]:
            t.normal_()
    per_token = 2 * spec.num_kv_heads * spec.head_dim * 2
    held_bytes = args.batch * length * per_token
    copied_bytes = args.batch * whole_block_tokens(length) * per_token
    res = measure(caches, args.batch, length, device, args.reps)
    med = {k: statistics.median(v) for k, v in res.items()}
    row = {"median_s": med, "samples_s": res,
           "gather_bps_copied": copied_bytes / med["gather_s"],
           "gather_bps_held": held_bytes / med["gather_s"],
           "dma_bps": copied_bytes / med["dma_s"]}
    print(f"alone: gather {med['gather_s'] * 1e3:.2f} ms "
          f"({copied_bytes / med['gather_s'] / 1e9:.1f} GB/s copied, "
          f"{held_bytes / med['gather_s'] / 1e9:.1f} held), DMA {med['dma_s'] * 1e3:.2f} ms "
          f"({copied_bytes / med['dma_s'] / 1e9:.1f} GB/s), both "
          f"{med['gather_then_dma_s'] * 1e3:.2f} ms", flush=True)
    write_json_atomic(args.out / "diag_kv_gather.json", {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0), "batch": args.batch, "context": args.context,
        "threads": args.threads, "copied_bytes": copied_bytes, "held_bytes": held_bytes,
        "alone": row})


if __name__ == "__main__":
    main()
