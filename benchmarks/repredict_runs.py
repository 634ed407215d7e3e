"""Re-predict recorded `hrm run` benchmark runs with today's model (measures nothing).

Each run of a bench_executor.py / bench_continuous.py result JSON (those with a recorded
`hrm run` command; the accelerate baseline has none) is predicted with the limits it ran under
and the policy as it realized it (whole experts per layer). A continuous run is predicted over
its own passes, which the scheduler's dry run (executor.scheduler.simulate) reproduces; the pass
count the run recorded is checked, and its steady state (the passes it recorded as such) is
predicted too.

    python benchmarks/repredict_runs.py --bench RESULT.json [--bench ...] --hardware A.toml \\
        [--hardware B.toml] -o repredict_runs.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from executor.scheduler import simulate  # noqa: E402
from executor.weights import read_model  # noqa: E402
from hrm.continuous import pass_model, predict_passes  # noqa: E402
from hrm.cost import predict  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.roofline import KV_BLOCK_TOKENS  # noqa: E402
from hrm.units import GiB  # noqa: E402
from hrm.validate import pct_error  # noqa: E402
from hrm.workload import Workload, synthetic_workload  # noqa: E402


def options(command: str) -> dict[str, str]:
    """--flag value pairs of a recorded `hrm run` command."""
    words = shlex.split(command)
    return {w[2:]: v for w, v in zip(words, words[1:] + [""], strict=True) if w.startswith("--")}


def run_prediction(run: dict[str, Any], profile: Path) -> tuple[float, float | None]:
    """Tokens/s the model predicts for one recorded `hrm run`, with its limits, and for a
    continuous run's steady state (the passes it recorded as such; None elsewhere)."""
    opt = options(run["command"])
    spec = replace(read_model("mixtral-8x7b")[0], num_layers=run["num_layers"],
                   name=run["model"])
    hw = load_profile(profile).with_memory(gpu_memory_bytes=float(opt["gpu-mem"]) * GiB,
                                           cpu_memory_bytes=float(opt["cpu-mem"]) * GiB,
                                           pinned_max_bytes=float(opt["pin-mem"]) * GiB)
    synthetic = synthetic_workload(opt["synthetic"], int(opt["num-seqs"]), int(opt["gen-len"]))
    # the policy as the run realized it (whole experts per layer), as `hrm run` predicts today
    realized = replace(Policy.from_dict(run["policy"]),
                       weights_gpu_fraction=run["realized"]["weights_gpu_fraction"])
    if run["scheduler"] == "static":
        workload = Workload.from_lens(list(synthetic.prompt_lens), int(opt["gen-len"]))
        return predict(spec, hw, workload, realized).throughput_tok_s, None
    gens = list(synthetic.gen_lens or [synthetic.gen_len] * synthetic.num_seqs)
    workload = Workload.from_lens(list(synthetic.prompt_lens), gens)
    passes, _ = simulate(list(synthetic.prompt_lens), gens,
                         num_blocks=run["continuous"]["kv_blocks"],
                         block_tokens=KV_BLOCK_TOKENS, token_budget=realized.batch_size)
    if len(passes) != run["continuous"]["passes"]:
        raise SystemExit(f"{run['name']}: the dry run makes {len(passes)} passes, the run "
                         f"made {run['continuous']['passes']}")
    model, shapes = pass_model(spec, hw, workload, realized), [p.shape() for p in passes]
    steady = None
    if run.get("steady"):
        first, last = run["steady"]["passes"]
        steady = predict_passes(model, shapes[first:last + 1]).throughput_tok_s
    return predict_passes(model, shapes).throughput_tok_s, steady


def repredict_runs(bench: Path, profiles: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per predictable run of `bench`: measured, predicted then and under each profile."""
    rows = []
    for run in json.loads(bench.read_text())["runs"]:
        if "command" not in run:
            continue
        row = {"source": str(bench), "run": run["name"], "measured_tok_s": run["throughput_tok_s"],
               "predicted_tok_s_then": run["predicted_throughput_tok_s"],
               "error_pct_then": pct_error(run["predicted_throughput_tok_s"],
                                           run["throughput_tok_s"])}
        steady = run.get("steady")
        if steady:
            row["steady_measured_tok_s"] = steady["throughput_tok_s"]
        for name, profile in profiles.items():
            tok_s, steady_tok_s = run_prediction(run, profile)
            row[f"predicted_tok_s_{name}"] = tok_s
            row[f"error_pct_{name}"] = pct_error(tok_s, run["throughput_tok_s"])
            if steady_tok_s is not None:
                row[f"steady_predicted_tok_s_{name}"] = steady_tok_s
                row[f"steady_error_pct_{name}"] = pct_error(steady_tok_s,
                                                            steady["throughput_tok_s"])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, action="append", required=True)
    ap.add_argument("--hardware", type=Path, action="append", required=True)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    profiles = {p.parent.name or p.stem: p for p in args.hardware}
    rows = [row for bench in args.bench for row in repredict_runs(bench, profiles)]
    for row in rows:
        print(f"{row['run']:<24} measured {row['measured_tok_s']:8.1f} tok/s  " + "  ".join(
            f"{k.removeprefix('error_pct_')} {v:+.1f}%" for k, v in row.items()
            if k.startswith(("error_pct_", "steady_error_pct_"))))
    write_json_atomic(args.output, {
        "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "profiles": {k: str(v) for k, v in profiles.items()}, "runs": rows})


if __name__ == "__main__":
    main()
