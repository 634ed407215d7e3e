"""Re-measure one benchmark of a profile run: the pageable -> pinned staging copy
(`hrm.profile.staging_copy`), into a raw sample file written by `hrm profile --raw-json`, whose
other samples are kept; `hrm profile --from-raw OUT` then fits the profile again.

    python3 benchmarks/remeasure_staging_copy.py --raw profile_raw.json --out profile_raw2.json

Used when the benchmark's method changed after a profile was measured (2026-12-01: it copied
into one pinned buffer as large as the source, the executor copies into a ring of pinned pages).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hrm.io import write_text_atomic  # noqa: E402
from hrm.profile import FULL, staging_copy  # noqa: E402

BENCH = "pageable_to_pinned"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, required=True, help="raw samples of `hrm profile`")
    ap.add_argument("--out", type=Path, required=True, help="the raw samples with the new ones")
    args = ap.parse_args()
    raw = json.loads(args.raw.read_text())
    old = [m for m in raw["measurements"] if m["bench"] == BENCH]
    if not old:
        sys.exit(f"{args.raw} has no {BENCH} samples (a CPU stand-in profile?)")
    nbytes = max(int(m["params"]["bytes"]) for m in old)
    new = staging_copy(nbytes, FULL.reps).to_dict()
    raw["measurements"] = [m for m in raw["measurements"] if m["bench"] != BENCH] + [new]
    raw.setdefault("remeasured", []).append({
        "bench": BENCH, "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "old_rates_bps": [m["work"] / t for m in old for t in m["times_s"]],
        "new_rates_bps": [new["work"] / t for t in new["times_s"]]})
    write_text_atomic(args.out, json.dumps(raw, indent=1))
    rates = sorted(raw["remeasured"][-1]["new_rates_bps"])
    print(f"{BENCH}: median {rates[len(rates) // 2] / 1e9:.1f} GB/s over {len(rates)} copies of "
          f"{nbytes / 2**30:.2f} GiB -> {args.out}")


if __name__ == "__main__":
    main()
