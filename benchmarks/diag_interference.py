"""Diagnosis: the profile's overlap-interference benchmark alone (`hrm.profile.interference`
with the full profile's stages and windows), and the factors it fits: link, GPU, CPU attention
and the GPU thread's kernel launches (`interference.launch`); besides all stages together, the
GPU stage beside each other stage alone (PAIRS), to see which one slows it.

    python3 benchmarks/diag_interference.py --out DIR [--window-s 2.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hrm.io import write_json_atomic  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.profile import (  # noqa: E402
    FULL,
    executor_attention_threads,
    interference,
    interference_stages,
    torch_threads,
)

#: the GPU stage with one other stage at a time
PAIRS = (("gpu", "link"), ("gpu", "cpu_attention"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--window-s", type=float, default=FULL.interference_window_s)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = load_model_spec("mixtral-8x7b")
    with torch_threads(executor_attention_threads(torch.get_num_threads())):
        ms = interference(interference_stages(FULL, spec, device), args.window_s, PAIRS)
    rate = {(m.bench, m.params["stage"], m.params["mode"]): m.rate for m in ms}
    factors = {f"{stage}{'' if bench == 'interference' else ' launches'} ({mode})":
               rate[bench, stage, "solo"] / rate[bench, stage, mode]
               for bench, stage, mode in rate if mode != "solo"}
    print(json.dumps(factors, indent=1))
    write_json_atomic(args.out / "diag_interference.json", {
        "benchmark": "diag_interference", "window_s": args.window_s, "factors": factors,
        "measurements": [dataclasses.asdict(m) for m in ms],
        "machine": {"gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                    "torch": torch.__version__, "cuda": torch.version.cuda},
        "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat()})


if __name__ == "__main__":
    main()
