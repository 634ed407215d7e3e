"""`hrm`: the command-line interface (typer + rich).

Every command takes `--json` for machine-readable output. Bad input (unknown model, malformed
profile, infeasible limits, ...) raises an `HRMError`; `main` prints its message on one line and
exits with code 2, never with a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from hrm.errors import HRMError

app = typer.Typer(
    name="hrm",
    help="Hierarchical Roofline Model for offloaded MoE inference: profile a machine, find the "
         "best offloading policy, run it, and compare predicted with measured throughput.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
#: width of tables written to a pipe or file (rich's default of 80 columns would squeeze them);
#: a terminal keeps its own width, and COLUMNS still overrides both
PIPE_WIDTH = 140
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH)
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    """Print `data` as JSON on stdout (the `--json` output of every command)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# ---- commands ----------------------------------------------------------------------------------
# Each command lives in the module of its concept and is registered here. Modules that need torch
# import it inside the command function, so `hrm --help` stays fast.

# -- modeling commands: models, hardware, predict, optimize, roofline --
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="shipped model name or config.json "
                                                             "path (see `hrm models`)")]
HardwareOpt = Annotated[str, typer.Option("--hardware", "-H", help="shipped profile name or TOML "
                                                                   "path (see `hrm hardware`)")]
PromptOpt = Annotated[int, typer.Option("--prompt-len", help="mean prompt length (tokens)")]
GenOpt = Annotated[int, typer.Option("--gen-len", help="tokens generated per sequence")]
NumSeqsOpt = Annotated[int, typer.Option("--num-seqs", help="sequences in the job (the batch "
                                                            "is then limited by memory)")]
GpuMemOpt = Annotated[float | None, typer.Option("--gpu-mem", help="cap GPU memory (GiB)")]
CpuMemOpt = Annotated[float | None, typer.Option("--cpu-mem", help="cap CPU memory (GiB)")]
GpusOpt = Annotated[int | None, typer.Option(
    "--gpus", help="GPUs to spread the layers over (tensor or expert parallel; default 1, or "
                   "the --policy's); --gpu-mem is per GPU")]
DtypeOpt = Annotated[str, typer.Option(help="bf16 | fp16 | fp8 | int8")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="cgopipe | cgopipe-serial | "
                                                             "layerwise")]
SchedulerOpt = Annotated[str, typer.Option("--scheduler", help="static (fixed batches) | "
                                           "continuous (KV-capacity-aware, hrm.continuous)")]
SyntheticOpt = Annotated[str | None, typer.Option(
    "--synthetic", help="mtbench | rag | reasoning: --num-seqs sequences with the lengths of a "
                        "seeded synthetic workload (--prompt-len is then ignored, --gen-len "
                        "caps reasoning)")]


def _inputs(model: str, hardware: str, prompt_len: int, gen_len: int, num_seqs: int,
            gpu_mem: float | None, cpu_mem: float | None, synthetic: str | None = None
            ) -> tuple[Any, Any, Any]:
    """Load the model spec, the (memory-capped) hardware profile and the workload."""
    from hrm.hardware import load_profile
    from hrm.model import load_model_spec
    from hrm.units import GiB
    from hrm.workload import Workload, synthetic_workload

    spec = load_model_spec(model)
    hw = load_profile(hardware).with_memory(
        gpu_memory_bytes=None if gpu_mem is None else gpu_mem * GiB,
        cpu_memory_bytes=None if cpu_mem is None else cpu_mem * GiB)
    if synthetic:
        return spec, hw, synthetic_workload(synthetic, num_seqs, gen_len)
    return spec, hw, Workload(num_seqs=num_seqs, prompt_len=prompt_len, gen_len=gen_len)


def _continuous(spec: Any, hw: Any, workload: Any, policy: Any, schedule: str, as_json: bool,
                title: str, output: Path | None = None, weight_dtype: str = "bf16",
                kv_dtype: str = "bf16") -> None:
    """`--scheduler continuous`: the report of hrm.continuous (bound, what binds, dry run,
    static comparison)."""
    from hrm.continuous import continuous_report, print_continuous_report
    from hrm.policy import Policy

    doc = continuous_report(spec, hw, workload, policy=policy, schedule=schedule,
                            weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    if output is not None:
        Policy.from_dict(doc["policy"]).save(output)
    if as_json:
        emit_json(doc)
    else:
        print_continuous_report(doc, title)


def _check_gpus(hw: Any, gpus: int | None, scheduler: str) -> None:
    """The machine has `gpus` GPUs; continuous scheduling is modeled on one."""
    if gpus is None:
        return
    if gpus < 1:
        raise HRMError(f"--gpus must be >= 1, got {gpus}")
    hw.check_gpus(gpus)
    if gpus > 1 and scheduler == "continuous":
        raise HRMError("--scheduler continuous is modeled on one GPU: leave out --gpus")


def _check_scheduler(scheduler: str) -> None:
    from hrm.errors import PolicyError

    if scheduler not in ("static", "continuous"):
        raise PolicyError(f"--scheduler must be static or continuous, got {scheduler!r}")


def _print_prediction(pred: Any, title: str) -> None:
    from rich.table import Table

    from hrm.units import fmt_bytes

    p, mem = pred.policy, pred.memory
    table = Table(title=title, show_header=False)
    table.add_row("policy", f"N={p.batch_size} (mu={p.micro_batch_size} x n_ub="
                  f"{p.num_micro_batches}), decode attention on {p.attn_decode_device}, "
                  f"r_w={p.weights_gpu_fraction:.3f}, r_c={p.kv_gpu_fraction:.3f}, "
                  f"schedule {p.schedule}, weights {p.weight_dtype}, KV {p.kv_dtype}, "
                  f"experts {p.expert_kernel}"
                  + (f", {p.num_gpus} GPUs {p.parallelism}" if p.num_gpus > 1 else ""))
    table.add_row("throughput", f"{pred.throughput_tok_s:,.1f} generated tokens/s")
    table.add_row("time per batch", f"prefill {pred.prefill_s:.2f} s + decode {pred.decode_s:.2f}"
                  f" s ({pred.decode_step_s * 1e3:.1f} ms per step)")
    d = pred.decode_layer
    table.add_row("decode layer", f"GPU {d.gpu_s * 1e3:.2f} ms | CPU attention "
                  f"{d.cpu_attn_s * 1e3:.2f} ms | H2D {d.h2d_s * 1e3:.2f} ms | D2H "
                  f"{d.d2h_s * 1e3:.2f} ms | copy thread {d.copy_thread_s * 1e3:.2f} ms | one "
                  f"micro-batch's chain {d.chain_s * 1e3:.2f} ms -> {d.layer_s * 1e3:.2f} ms")
    if p.num_gpus > 1:
        table.add_row("communication", f"all-reduce {d.comm_s * 1e3:.3f} ms per decode layer "
                      f"(in the GPU stage), {pred.prefill_layer.comm_s * 1e3:.3f} ms per prefill "
                      f"layer; {p.parallelism}: "
                      + ("heads and expert widths split" if p.parallelism == "tp"
                         else "heads split, whole experts dealt round-robin"))
    table.add_row("bottleneck", f"{pred.bottleneck} (next stage {pred.bottleneck_slack:.2f}x "
                  "faster)")
    table.add_row("GPU memory" + (" per GPU" if p.num_gpus > 1 else ""),
                  f"{_used(mem.gpu_bytes, mem.gpu_capacity_bytes)} of "
                  f"{fmt_bytes(mem.gpu_capacity_bytes)} usable")
    table.add_row("CPU memory", f"{_used(mem.cpu_bytes, mem.cpu_capacity_bytes)} of "
                  f"{fmt_bytes(mem.cpu_capacity_bytes)} usable ({fmt_bytes(mem.pinned_bytes)} "
                  "pinned)")
    for note in pred.notes:
        table.add_row("note", note)
    console.print(table)


@app.command("models")
def models_command(as_json: JsonOpt = False) -> None:
    """List the shipped model configs with their sizes."""
    from rich.table import Table

    from hrm.model import load_model_spec, shipped_models
    from hrm.units import KiB

    rows = []
    for name in shipped_models():
        spec = load_model_spec(name)
        rows.append({"name": name, "model_type": spec.model_type, "layers": spec.num_layers,
                     "experts": spec.num_experts, "top_k": spec.top_k,
                     "params": spec.total_params(), "active_params": spec.active_params_per_token(),
                     "bf16_bytes": spec.total_bytes("bf16"),
                     "dense_bf16_bytes": spec.dense_bytes("bf16"),
                     "experts_per_layer_bf16_bytes": spec.routed_expert_bytes_per_layer("bf16"),
                     "kv_bytes_per_token_bf16": spec.kv_bytes_per_token("bf16")})
    if as_json:
        emit_json(rows)
        return
    table = Table(title="shipped models (bf16)")
    for col in ("model", "type", "layers", "E / k", "params", "active", "size", "dense",
                "experts/layer", "KV/token"):
        table.add_column(col, justify="left" if col in ("model", "type") else "right")
    for r in rows:
        table.add_row(r["name"], r["model_type"], str(r["layers"]),
                      f"{r['experts']} / {r['top_k']}",
                      f"{r['params'] / 1e9:.1f} B", f"{r['active_params'] / 1e9:.1f} B",
                      f"{r['bf16_bytes'] / 1e9:.1f} GB", f"{r['dense_bf16_bytes'] / 1e9:.2f} GB",
                      f"{r['experts_per_layer_bf16_bytes'] / 1e9:.2f} GB",
                      f"{r['kv_bytes_per_token_bf16'] / KiB:.0f} KiB")
    console.print(table)


@app.command("hardware")
def hardware_command(as_json: JsonOpt = False) -> None:
    """List the shipped hardware profiles with their tiers."""
    from rich.table import Table

    from hrm.hardware import load_profile, shipped_profiles

    rows = []
    for name in shipped_profiles():
        hw = load_profile(name)
        rows.append({"name": name, "gpu": hw.gpu.name, "gpus": hw.interconnect.num_gpus,
                     "allreduce_bus_bps": hw.interconnect.allreduce_bus_bps,
                     "gpu_mem_bytes": hw.gpu.memory_bytes,
                     "gpu_bf16_flops": hw.gpu.flops("bf16"),
                     "hbm_bps": hw.gpu.hbm_bandwidth_bps, "cpu": hw.cpu.name,
                     "cpu_cores": hw.cpu.cores, "cpu_mem_bytes": hw.cpu.memory_bytes,
                     "dram_bps": hw.cpu.dram_bandwidth_bps,
                     "h2d_pinned_bps": hw.link.h2d_pinned_bps,
                     "pinned_max_bytes": hw.link.pinned_max_bytes, "curves": sorted(hw.curves)})
    if as_json:
        emit_json(rows)
        return
    table = Table(title="shipped hardware profiles")
    for col in ("profile", "GPU", "GPUs", "GPU mem", "bf16", "HBM", "CPU cores",
                "CPU mem", "DRAM", "PCIe H2D", "curves"):
        table.add_column(col, justify="left" if col in ("profile", "GPU", "curves") else "right")
    for r in rows:
        gpus = str(r["gpus"]) + (f" ({r['allreduce_bus_bps'] / 1e9:.0f} GB/s)"
                                 if r["gpus"] > 1 else "")
        table.add_row(r["name"], r["gpu"], gpus, f"{r['gpu_mem_bytes'] / 1e9:.0f} GB",
                      f"{r['gpu_bf16_flops'] / 1e12:.0f} TFLOP/s", f"{r['hbm_bps'] / 1e9:.0f} GB/s",
                      str(r["cpu_cores"]), f"{r['cpu_mem_bytes'] / 1e9:.0f} GB",
                      f"{r['dram_bps'] / 1e9:.0f} GB/s", f"{r['h2d_pinned_bps'] / 1e9:.1f} GB/s",
                      ", ".join(r["curves"]) or "-")
    console.print(table)


@app.command("predict")
def predict_command(model: ModelOpt, hardware: HardwareOpt, prompt_len: PromptOpt,
                    gen_len: GenOpt, num_seqs: NumSeqsOpt = 10000,
                    policy: Annotated[Path | None, typer.Option(
                        "--policy", help="policy JSON (default: the optimized policy)")] = None,
                    gpu_mem: GpuMemOpt = None, cpu_mem: CpuMemOpt = None,
                    trace: Annotated[Path | None, typer.Option(
                        "--trace", help="write the predicted timeline of two decode layers as "
                                        "a Chrome/Perfetto trace")] = None,
                    scheduler: SchedulerOpt = "static", synthetic: SyntheticOpt = None,
                    gpus: GpusOpt = None, as_json: JsonOpt = False) -> None:
    """Predict throughput, stage times, bottleneck and memory of a policy."""
    from dataclasses import replace

    from hrm.cost import check_fits, predict, timeline
    from hrm.io import write_json_atomic
    from hrm.optimize import optimize
    from hrm.policy import Policy

    _check_scheduler(scheduler)
    spec, hw, workload = _inputs(model, hardware, prompt_len, gen_len, num_seqs, gpu_mem,
                                 cpu_mem, synthetic)
    _check_gpus(hw, gpus, scheduler)
    if scheduler == "continuous":
        if trace is not None:
            raise HRMError("--trace draws a static decode step; leave it out with "
                           "--scheduler continuous")
        return _continuous(spec, hw, workload, policy and Policy.load(policy), "cgopipe",
                           as_json, f"continuous scheduling, {spec.name} on {hw.name}: "
                           f"{workload.name or 'fixed lengths'}")
    if policy is None:
        pred = optimize(spec, hw, workload, num_gpus=gpus or 1).prediction
    else:
        pol = Policy.load(policy)
        if gpus is not None:
            pol = replace(pol, num_gpus=gpus)
        check_fits(spec, hw, workload, pol)
        pred = predict(spec, hw, workload, pol)
    if trace is not None:
        write_json_atomic(trace, {"traceEvents": timeline(spec, hw, workload, pred.policy),
                                  "displayTimeUnit": "ms"})
    if as_json:
        emit_json(pred.to_dict())
    else:
        _print_prediction(pred, f"{spec.name} on {hw.name}: prompt {prompt_len}, gen {gen_len}")


@app.command("optimize")
def optimize_command(model: ModelOpt, hardware: HardwareOpt, prompt_len: PromptOpt,
                     gen_len: GenOpt, num_seqs: NumSeqsOpt = 10000,
                     output: Annotated[Path | None, typer.Option(
                         "--output", "-o", help="write the policy JSON here")] = None,
                     schedule: ScheduleOpt = "cgopipe",
                     method: Annotated[str, typer.Option(help="milp | brute")] = "milp",
                     weight_dtype: DtypeOpt = "bf16", kv_dtype: DtypeOpt = "bf16",
                     gpu_mem: GpuMemOpt = None, cpu_mem: CpuMemOpt = None,
                     compare: Annotated[bool, typer.Option(
                         help="also optimize the other schedules")] = True,
                     scheduler: SchedulerOpt = "static", synthetic: SyntheticOpt = None,
                     gpus: GpusOpt = None, as_json: JsonOpt = False) -> None:
    """Find the policy with the highest predicted throughput that fits in memory (with --gpus,
    the parallelism too: tensor or expert parallel)."""
    from rich.table import Table

    from hrm.errors import InfeasibleError, PolicyError
    from hrm.optimize import compare_schedules, optimize
    from hrm.policy import SCHEDULES

    if schedule not in SCHEDULES:
        raise PolicyError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_scheduler(scheduler)
    spec, hw, workload = _inputs(model, hardware, prompt_len, gen_len, num_seqs, gpu_mem,
                                 cpu_mem, synthetic)
    _check_gpus(hw, gpus, scheduler)
    if scheduler == "continuous":
        return _continuous(spec, hw, workload, None, schedule, as_json,
                           f"best continuous policy for {spec.name} on {hw.name}: "
                           f"{workload.name or 'fixed lengths'}", output, weight_dtype, kv_dtype)
    result = optimize(spec, hw, workload, schedule=schedule, method=method,
                      weight_dtype=weight_dtype, kv_dtype=kv_dtype, num_gpus=gpus or 1)
    others = {}
    if compare:
        others = compare_schedules(spec, hw, workload, weight_dtype=weight_dtype,
                                   kv_dtype=kv_dtype, num_gpus=gpus or 1)
    if output is not None:
        result.policy.save(output)
    if as_json:
        doc = result.prediction.to_dict()
        doc.update({"method": result.method, "solve_s": result.solve_s,
                    "candidates": result.num_candidates,
                    "schedules": {s: ({"error": str(r)} if isinstance(r, InfeasibleError) else
                                      {"throughput_tok_s": r.prediction.throughput_tok_s,
                                       "policy": r.policy.to_dict(),
                                       "bottleneck": r.prediction.bottleneck})
                                  for s, r in others.items()}})
        emit_json(doc)
        return
    _print_prediction(result.prediction, f"best {schedule} policy for {spec.name} on {hw.name}: "
                      f"prompt {prompt_len}, gen {gen_len} ({result.method}, "
                      f"{result.num_candidates} candidates, {result.solve_s:.2f} s)")
    if others:
        table = Table(title="what each schedule buys (each with its own best policy)")
        for col in ("schedule", "tokens/s", "vs layerwise", "N", "mu", "attention", "r_w",
                    "bottleneck"):
            table.add_column(col)
        base = others.get("layerwise")
        base_tok_s = None if isinstance(base, InfeasibleError) else base.prediction.throughput_tok_s
        for name, r in others.items():
            if isinstance(r, InfeasibleError):
                table.add_row(name, "does not fit", "", "", "", "", "", str(r))
                continue
            gain = f"{r.prediction.throughput_tok_s / base_tok_s:.2f}x" if base_tok_s else "-"
            table.add_row(name, f"{r.prediction.throughput_tok_s:,.1f}", gain,
                          str(r.policy.batch_size), str(r.policy.micro_batch_size),
                          r.policy.attn_decode_device, f"{r.policy.weights_gpu_fraction:.3f}",
                          r.prediction.bottleneck)
        console.print(table)
    if output is not None:
        console.print(f"policy written to {output}")


@app.command("roofline")
def roofline_command(model: ModelOpt, hardware: HardwareOpt,
                     output: Annotated[Path, typer.Option("--output", "-o",
                                                          help="PNG/SVG/PDF path")],
                     batch_size: Annotated[int, typer.Option(help="N for the operators")] = 1024,
                     micro_batch_size: Annotated[int, typer.Option(help="mu")] = 128,
                     context_len: Annotated[float, typer.Option(
                         help="decode context (tokens)")] = 512.0,
                     gpu_mem: GpuMemOpt = None, cpu_mem: CpuMemOpt = None,
                     as_json: JsonOpt = False) -> None:
    """Plot the Hierarchical Roofline Model with a decode layer's operators on it."""
    from hrm.errors import WorkloadError
    from hrm.plots import plot_roofline
    from hrm.roofline import summarize

    if min(batch_size, micro_batch_size, context_len) <= 0:
        raise WorkloadError("--batch-size, --micro-batch-size and --context-len must be > 0")
    spec, hw, _ = _inputs(model, hardware, 1, 1, 1, gpu_mem, cpu_mem)
    points = summarize(spec, hw, batch_size=batch_size, micro_batch_size=micro_batch_size,
                       context_len=context_len)
    plot_roofline(points, output)
    if as_json:
        emit_json({**points.to_dict(), "output": str(output)})
    else:
        console.print(f"roofline of {spec.name} on {hw.name} written to {output}")
        for name, value in points.turning_batch_sizes.items():
            console.print(f"  decode expert FFN stops being link bound at N = {value:,.0f} "
                          f"({name})")

from hrm.profile import profile_command  # noqa: E402

app.command("profile")(profile_command)

from executor.cli import run_command  # noqa: E402  (torch is imported inside the command)

app.command("run")(run_command)

from hrm.validate import validate_command  # noqa: E402  (torch is imported inside)

app.command("validate")(validate_command)


def _used(need_bytes: float, capacity_bytes: float) -> str:
    """The bytes a policy needs; a policy the solver filled to its limit (within its tolerance,
    hrm.cost.MEMORY_CHECK_TOLERANCE) shows the limit, not a rounding above it."""
    from hrm.cost import MEMORY_CHECK_TOLERANCE
    from hrm.units import fmt_bytes

    if capacity_bytes < need_bytes <= capacity_bytes * (1 + MEMORY_CHECK_TOLERANCE):
        need_bytes = capacity_bytes
    return fmt_bytes(need_bytes)


def main() -> None:
    """Console-script entry point. Typer handles usage errors itself (message + exit 2); an
    HRMError from a command becomes a one-line error and exit code 2, never a traceback."""
    try:
        app()
    except HRMError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
