"""Continuous vs static scheduling on the GPU machine: Mixtral-8x7B shapes, random bf16 weights,
GPU capped at 16 GiB, the three synthetic workloads (executor/scheduler.py, hrm/continuous.py).

For each workload (mtbench, rag, reasoning), in one device session:
  static      `hrm run --scheduler static` with the cgopipe policy `hrm optimize` finds,
  continuous  `hrm run --scheduler continuous` with the policy `optimize_continuous` finds,
on sequences of the same seeded generator (--synthetic KIND, --ignore-eos): the static run one
batch of N (every batch of a static job runs the same way), the continuous run a job of a few
times its running set (so that ramp-up and drain are a small part). Both policies are optimized
for the full model (32 layers) under the full limits, and run on the first L layers with the
per-layer share of the limits (bench_executor's scaling: GPU cap minus what the missing layers
would hold, L/32 of the CPU memory and of the pinned budget), so a run sees the full model's KV
capacity in tokens and each pass carries the full model's tokens. Useful throughput counts each
sequence's own generation budget (the static engine generates max(g) for every sequence of a
reasoning batch; the tokens past a sequence's budget are not counted).

Run (one device session):
    python benchmarks/bench_continuous.py --layers 1 --out $OUT
Results: benchmarks/results/continuous_bench_<L>layers.json (every run's result.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_executor import (  # noqa: E402
    FULL_LAYERS,
    add_deadline_options,
    add_host_mem_option,
    executor_plan,
    fit_to_executor,
    host_memory,
    layer_bench,
    layer_gpu_bytes,
    run_cli,
)
from executor.cli import pin_budget_bytes  # noqa: E402
from hrm.continuous import optimize_continuous  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.optimize import optimize  # noqa: E402
from hrm.units import GiB  # noqa: E402
from hrm.workload import synthetic_workload  # noqa: E402

#: sequences offered to the optimizers (the batch / running set is then limited by memory)
OPTIMIZER_NUM_SEQS = 20000
#: generation cap of the reasoning workload in this benchmark (its lognormal reaches 1024)
REASONING_GEN_CAP = 256


def continuous_gpu_cap(spec, policy, gpu_bytes: float, layers: int) -> float:
    """The full model's GPU limit minus what its 32 - L missing layers would hold (their dense
    weights and resident experts)."""
    w = 2  # bf16
    dense_layer = (spec.dense_params() - spec.embedding_params()) * w / spec.num_layers
    resident_layer = policy.weights_gpu_fraction * spec.routed_expert_bytes_per_layer("bf16")
    return gpu_bytes - (FULL_LAYERS - layers) * (dense_layer + resident_layer)


def check_layer_plan(layer_config: Path, policy, prompt_lens: list[int], gen_len: int,
                     cpu_cap_bytes: float) -> None:
    """Exit with the reason where the L-layer model's executor memory plan exceeds the CPU
    limit the run gets (what `hrm run` would refuse after the benchmark had started)."""
    from executor.weights import read_model

    spec_l, _ = read_model(str(layer_config))
    plan = executor_plan(spec_l, policy, prompt_lens, gen_len)
    if sum(plan.cpu.values()) > cpu_cap_bytes:
        sys.exit(f"the {spec_l.num_layers}-layer plan needs {sum(plan.cpu.values()) / GiB:.2f} "
                 f"GiB of CPU memory, the run gets {cpu_cap_bytes / GiB:.2f} GiB: {plan.cpu}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--workloads", nargs="+", default=["mtbench", "rag", "reasoning"])
    ap.add_argument("--seqs-per-running", type=float, default=3.0,
                    help="sequences of the continuous run, in multiples of its running set")
    ap.add_argument("--gen-len", type=int, default=128, help="mtbench and rag")
    ap.add_argument("--gpu-mem", type=float, default=16.0, help="GiB, for the full model")
    ap.add_argument("--hardware", default="h100-machine")
    add_host_mem_option(ap)
    add_deadline_options(ap)
    ap.add_argument("--trace", action="store_true",
                    help="write each continuous run's Chrome trace next to its result")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the `hrm run` commands (policies, caps) without running them")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    spec = load_model_spec("mixtral-8x7b")
    config = json.loads((ROOT / "hrm" / "model_configs" / "mixtral-8x7b.json").read_text())
    host_bytes, hw = host_memory(args.host_mem, load_profile(args.hardware), args.pin_gib)
    if args.dry_run and not args.host_mem:   # plan as if on the profiled machine
        host_bytes = hw.cpu.memory_bytes
    cpu_full = min(host_bytes, hw.cpu.memory_bytes)
    bench = layer_bench(config, args.layers, hw, host_bytes, args.out, "continuous")
    limits = bench.limits
    hw_full = hw.with_memory(gpu_memory_bytes=args.gpu_mem * GiB, cpu_memory_bytes=cpu_full,
                             pinned_max_bytes=pin_budget_bytes(hw, host_bytes))

    started = time.perf_counter()
    for kind in args.workloads:
        gen_cap = REASONING_GEN_CAP if kind == "reasoning" else args.gen_len
        wl = synthetic_workload(kind, OPTIMIZER_NUM_SEQS, gen_cap)
        cont = optimize_continuous(spec, hw_full, wl)
        static = optimize(spec, hw_full, wl)
        for scheduler, opt in (("static", static), ("continuous", cont)):
            num_seqs = static.policy.batch_size if scheduler == "static" else \
                round(args.seqs_per_running * cont.prediction.running_seqs)
            job = synthetic_workload(kind, num_seqs, gen_cap)
            if time.perf_counter() - started > args.deadline_s:
                break
            if scheduler == "static":
                lens = list(synthetic_workload(kind, opt.policy.batch_size, gen_cap).prompt_lens)
                policy, plan = fit_to_executor(spec, opt.policy, lens, job.gen_len,
                                               args.gpu_mem * GiB, cpu_full)
                gpu_cap = args.gpu_mem * GiB - (FULL_LAYERS - args.layers) * \
                    layer_gpu_bytes(spec, plan)
            else:
                policy, plan = opt.policy, None   # the continuous engine parks nothing
                gpu_cap = continuous_gpu_cap(spec, policy, args.gpu_mem * GiB, args.layers)
            cpu_cap = bench.cpu_limit_bytes(plan)
            policy_path = bench.workdir / f"policy_{scheduler}_{kind}.json"
            policy.save(policy_path)
            profile_path = bench.layer_profile(gpu_cap, cpu_cap, f"{scheduler}-{kind}")
            cli_args = ["--model", str(bench.layer_config), "--dummy-weights", "--device", "cuda",
                        "--cpu-mem", f"{cpu_cap / GiB:.4f}",
                        "--pin-mem", f"{limits['pin_bytes'] / GiB:.4f}", "--ignore-eos",
                        "--gpu-mem", f"{gpu_cap / GiB:.4f}", "--scheduler", scheduler,
                        "--policy", str(policy_path), "--hardware", str(profile_path),
                        "--synthetic", kind, "--num-seqs", str(num_seqs),
                        "--gen-len", str(gen_cap)]
            if args.trace and scheduler == "continuous":
                cli_args += ["--trace", str(args.out / f"trace_continuous_{kind}.json")]
            if args.dry_run:
                print(f"[{scheduler} {kind}] {policy.to_dict()}\n  hrm run {' '.join(cli_args)}")
                if scheduler == "static":   # the check `hrm run` makes before loading
                    check_layer_plan(bench.layer_config, policy, lens, gen_cap, cpu_cap)
                continue
            res = run_cli(cli_args, bench.workdir, f"{scheduler}_{kind}", args.run_timeout_s)
            res["workload_kind"] = kind
            res["full_model_prediction"] = opt.prediction.to_dict()
            if "throughput_tok_s" in res:
                total_s = res["prefill_s"] + res["decode_s"]
                res["useful_tokens"] = job.generated_tokens()
                res["useful_throughput_tok_s"] = job.generated_tokens() / total_s
                res["full_model_tok_s_estimate"] = \
                    res["useful_throughput_tok_s"] * args.layers / FULL_LAYERS
            bench.results.append(res)
            bench.save()
        if not args.dry_run:
            print(compare(kind, bench.results))
    bench.save()
    print(f"wrote {bench.summary_path}")


def compare(kind: str, runs: list[dict]) -> str:
    """One workload's continuous / static line: useful tokens/s of the static run against the
    continuous run's whole job and its steady state (the passes between ramp-up and drain,
    `hrm.continuous.steady_window`: what a job of many times the running set sustains)."""
    by = {r.get("scheduler"): r for r in runs if r.get("workload_kind") == kind
          and "useful_throughput_tok_s" in r}
    if set(by) != {"static", "continuous"}:
        return f"[{kind}] no comparison: a run failed or was not started (--deadline-s)"
    static, cont = by["static"]["useful_throughput_tok_s"], by["continuous"]
    job = cont["useful_throughput_tok_s"]
    line = f"[{kind}] static {static:,.0f} tok/s; continuous job {job:,.0f} ({job / static:.2f}x)"
    steady = cont.get("steady")
    if steady:
        line += (f", steady state {steady['throughput_tok_s']:,.0f} "
                 f"({steady['throughput_tok_s'] / static:.2f}x; passes {steady['passes'][0]}-"
                 f"{steady['passes'][1]} of {cont['continuous']['passes']})")
    return line


if __name__ == "__main__":
    main()
