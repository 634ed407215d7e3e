"""Diagnosis: how torch's pinned host allocator shows in the process's resident set, the basis
of `hrm validate`'s CPU memory measurement (hrm/validate.py, `release_cached_memory`) and of
the cost model's pinned buffer sizes (`hrm.cost.pinned_allocation_bytes`).

For each request size: the resident-set growth (VmRSS) when a pinned tensor of that size is
allocated fresh, when it is freed (the allocator keeps the block), when the same size is asked
for again (served from the cache), and when the cache is emptied.

    python3 benchmarks/diag_pinned_memory.py --out DIR
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hrm.cost import pinned_allocation_bytes  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.validate import proc_status_bytes, release_cached_memory  # noqa: E402

MiB = 2**20
#: request sizes (MiB): powers of two, just above one, and in between
REQUESTS_MIB = (16, 37.5, 64, 65, 100, 1024)


def rss() -> int:
    return proc_status_bytes("VmRSS") or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.empty(1, device=device)   # the CUDA context first: its own host memory is not measured
    release_cached_memory(device)
    rows = []
    for mib in REQUESTS_MIB:
        n = int(mib * MiB)
        before = rss()
        t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        fresh = rss() - before
        del t
        freed = rss() - before
        t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        again = rss() - before
        del t
        release_cached_memory(device)
        emptied = rss() - before
        row = {"request_bytes": n, "model_bytes": pinned_allocation_bytes(n),
               "rss_growth_fresh_bytes": fresh, "rss_growth_after_free_bytes": freed,
               "rss_growth_reused_bytes": again, "rss_growth_after_empty_cache_bytes": emptied}
        rows.append(row)
        print("  ".join(f"{k} {v / MiB:.1f} MiB" for k, v in row.items()))
    write_json_atomic(args.out / "diag_pinned_memory.json", {
        "benchmark": "diag_pinned_memory", "rows": rows,
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cuda": torch.version.cuda},
        "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat()})


if __name__ == "__main__":
    main()
