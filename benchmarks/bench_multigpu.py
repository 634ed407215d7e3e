"""Multi-GPU benchmark: `hrm run` on 1 GPU, then on 2 GPUs (tp, then ep while the deadline
allows), measured next to the HRM prediction at the same policy and num_gpus.

Setup: Mixtral-8x22B shapes, random bf16 weights, only the first --layers decoder layers (default
4; host memory fills at ~3 s per 8 GiB and pins at ~0.6 s/GB, so the layer count is what fits a
short session, and it is stated in the result), each GPU capped at --gpu-mem GiB (16), MTBench-
like prompts (~100 tokens, synthetic lengths), --gen-len 16. The policy is fixed on the command
line (--batch-size, --micro-batch-size, --weights-gpu-fraction; every run uses it, only num_gpus
and parallelism change) or found by `hrm run --optimize` for each run (--optimize).

The prediction of a K-GPU run needs a --hardware profile with an [interconnect] tier of at least
K GPUs (hrm/hardware.py): the default is the datasheet `h100` profile (no H200 profile is
shipped; the measured `h100-machine` one has 1 GPU), so the prediction is of an H100 box, stated
in the result; with a 1-GPU profile the K-GPU runs carry the prediction's error instead.

Every run is a fresh `hrm run` process group (its ranks, pinned memory and GPU caps die with it),
killed when it would pass --deadline-s; the JSON (machine, command, date, every run's
result.json, the 1 -> 2 GPU scaling measured and predicted) is rewritten atomically after each
run, so a timeout still leaves the finished runs.

GPU machine (one session, ~400 s):  python benchmarks/bench_multigpu.py --out $OUT
CPU smoke test:  python benchmarks/bench_multigpu.py --device cpu --model tiny-mixtral --layers 2 \\
                   --num-seqs 8 --batch-size 8 --micro-batch-size 4 --gen-len 4 --out /tmp/mg
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hrm.io import write_json_atomic  # noqa: E402
from hrm.policy import Policy  # noqa: E402

#: seconds kept back from the deadline for writing the results
DEADLINE_MARGIN_S = 5.0
#: a run is not started with less time than this left
MIN_RUN_S = 30.0


def machine(device: str) -> dict[str, Any]:
    """GPUs, versions, cores and host memory of this machine."""
    import torch

    from executor.cli import host_memory_bytes, machine_info

    cuda = device == "cuda"
    return dict(machine_info(torch.device(device)),
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                if cuda else [],
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                host_memory_bytes=host_memory_bytes())


def run_hrm(args: list[str], workdir: Path, name: str, timeout_s: float) -> dict[str, Any]:
    """`hrm run ARGS` in its own process group, killed with its ranks after `timeout_s`."""
    result = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "hrm.cli", "run", *args, "-o", str(result)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log += f"\nkilled after {timeout_s:.0f} s (deadline)"
    wall_s = time.perf_counter() - start
    print(f"[{name}] rc={proc.returncode} {wall_s:.0f} s {log.strip()[-600:]}", flush=True)
    if proc.returncode != 0:
        return {"name": name, "error": log.strip()[-2000:], "command": shlex.join(cmd),
                "process_wall_s": wall_s}
    data = json.loads(result.read_text())
    return dict(data, name=name, process_wall_s=wall_s)


def scaling(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput of each multi-GPU run over the 1-GPU run, measured and predicted."""
    base = next((r for r in runs if r.get("num_gpus") == 1 and "error" not in r), None)
    if base is None:
        return {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {r["name"]: {"measured": ratio(r["throughput_tok_s"], base["throughput_tok_s"]),
                        "predicted": ratio(r["predicted_throughput_tok_s"],
                                           base["predicted_throughput_tok_s"])}
            for r in runs if r.get("num_gpus", 1) > 1 and "error" not in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="mixtral-8x22b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--gpu-mem", type=float, default=16.0, help="GiB per GPU")
    parser.add_argument("--num-seqs", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--weights-gpu-fraction", type=float, default=0.0)
    parser.add_argument("--optimize", action="store_true",
                        help="each run uses the policy `hrm run --optimize` finds")
    parser.add_argument("--hardware", default="h100",
                        help="profile for the prediction (and --optimize)")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU runs")
    parser.add_argument("--parallelisms", default="tp,ep")
    parser.add_argument("--deadline-s", type=float, default=380.0)
    parser.add_argument("--run-timeout-s", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    start = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"multigpu_{a.model}_{a.layers}layers_gen{a.gen_len}.json"

    common = ["--model", a.model, "--dummy-weights", "--num-layers", str(a.layers),
              "--device", a.device, "--gpu-mem", str(a.gpu_mem), "--synthetic", "mtbench",
              "--num-seqs", str(a.num_seqs), "--gen-len", str(a.gen_len), "--ignore-eos",
              "--hardware", a.hardware, "--seed", str(a.seed)]
    if a.optimize:
        common.append("--optimize")
    else:
        policy = Policy(batch_size=a.batch_size, micro_batch_size=a.micro_batch_size,
                        weights_gpu_fraction=a.weights_gpu_fraction)
        policy.save(a.out / "policy.json")
        common += ["--policy", str(a.out / "policy.json")]
    plan = [("gpus1", ["--gpus", "1"])] + [
        (f"gpus{a.gpus}_{p}", ["--gpus", str(a.gpus), "--parallelism", p])
        for p in a.parallelisms.split(",")]

    doc: dict[str, Any] = {
        "benchmark": "multi-GPU executor: 1 GPU vs. K GPUs (tp, ep)",
        "model": a.model, "layers": a.layers,
        "note": f"random bf16 weights, first {a.layers} decoder layers only; GPU memory capped "
                f"at {a.gpu_mem} GiB per GPU; prediction from hrm.cost.predict with profile "
                f"{a.hardware!r} at each run's policy and num_gpus",
        "machine": machine(a.device), "command": shlex.join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": [], "skipped": [], "scaling": {}}
    write_json_atomic(path, doc)
    for name, extra in plan:
        left_s = a.deadline_s - (time.monotonic() - start) - DEADLINE_MARGIN_S
        if left_s < MIN_RUN_S:
            doc["skipped"].append({"name": name, "reason": f"{left_s:.0f} s left of the deadline"})
            continue
        doc["runs"].append(run_hrm(common + extra, a.out, name, min(a.run_timeout_s, left_s)))
        doc["scaling"] = scaling(doc["runs"])
        write_json_atomic(path, doc)
    write_json_atomic(path, doc)
    print(json.dumps({"results": str(path), "scaling": doc["scaling"],
                      "skipped": doc["skipped"]}, indent=1))


if __name__ == "__main__":
    main()
