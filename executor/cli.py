"""`hrm run`: offline batch generation under a policy, measured next to the HRM's prediction.

result.json holds the measured throughput (generated tokens / (prefill + decode wall time)), phase
times, busy time and utilization of the GPU, CPU-attention, link and copy-thread tracks during
decode, bytes moved, peak memory, the policy as realized (page granularity) and the prediction
of `hrm.cost.predict` for the same model, hardware profile, workload and policy.

With --gpus K > 1 (or a policy with num_gpus = K) the run is K processes, one per GPU, each with
its shard of the model (executor/distributed.py); memory caps hold per GPU, the CPU memory and
pinned budget are split evenly, and rank 0 reports (peak memory per rank).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import random
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from hrm.errors import HardwareProfileError, HRMError, InfeasibleError, PolicyError
from hrm.hardware import HardwareProfile, load_profile
from hrm.io import write_json_atomic, write_text_atomic
from hrm.units import GiB
from hrm.workload import Workload, synthetic_workload


class PromptError(HRMError):
    """A prompts file is missing or malformed."""


def read_prompts(path: Path, tokenizer_dir: Path | None) -> list[list[int]]:
    """JSONL prompts: each line a list of token ids, {"tokens": [...]}, or {"text": "..."} (text
    needs a local tokenizer directory)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: cannot read prompts: {exc}") from None
    tokenizer, prompts = None, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            if tokenizer_dir is None:
                raise PromptError(f"{path}:{number}: a text prompt needs --tokenizer DIR")
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            item = tokenizer(item["text"])["input_ids"]
        elif isinstance(item, dict):
            item = item.get("tokens")
        if not (isinstance(item, list) and item and
                all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)):
            raise PromptError(f"{path}:{number}: expected a non-empty list of token ids, "
                              '{"tokens": [...]} or {"text": "..."}')
        prompts.append(item)
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts


def random_prompts(prompt_lens: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Uniformly random token ids (token values do not change the work of a forward pass)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in prompt_lens]


def machine_info(device: Any) -> dict[str, Any]:
    import torch

    cpu_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = device.type == "cuda"
    return {"gpu": torch.cuda.get_device_name(device) if cuda else None,
            "cpu": cpu_name, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "device": str(device), "hostname": platform.node()}


def host_memory_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


#: share of host memory the executor pins when no probed limit is known (the GPU machine pins
#: one 60 GB allocation of its 125 GiB and fails at 70 GB: shared/hardware/h100-machine.md)
DEFAULT_PIN_SHARE = 0.45


def pin_budget_bytes(hw: HardwareProfile | None, host_bytes: float | None = None) -> float:
    """Bytes the executor may pin: the profile's probed limit (`hrm profile`'s pin probe) when
    it has one, else DEFAULT_PIN_SHARE of host memory (`host_bytes`, default what the OS
    reports). The one budget that `hrm run`, `hrm validate` and the benchmarks give both the
    optimizer and the run."""
    if hw is not None and math.isfinite(hw.link.pinned_max_bytes):
        return hw.link.pinned_max_bytes
    return DEFAULT_PIN_SHARE * (host_memory_bytes() if host_bytes is None else host_bytes)


def run_command(
    model: str = typer.Option("mixtral-8x7b", "--model", help="shipped model name or config.json"),
    dummy_weights: bool = typer.Option(False, "--dummy-weights",
                                       help="random weights at the real shapes"),
    checkpoint: Path | None = typer.Option(None, "--checkpoint",
                                           help="local HF checkpoint dir (config + safetensors)"),
    policy_path: Path | None = typer.Option(None, "--policy", help="policy JSON"),
    optimize_policy: bool = typer.Option(False, "--optimize",
                                         help="run the policy `hrm optimize` finds"),
    hardware: str | None = typer.Option(None, "--hardware",
                                        help="hardware profile for --optimize and the prediction"),
    prompts_path: Path | None = typer.Option(None, "--prompts", help="JSONL prompts"),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="local tokenizer dir"),
    num_seqs: int | None = typer.Option(None, "--num-seqs", help="random prompts: how many"),
    prompt_len: int | None = typer.Option(None, "--prompt-len", help="random prompts: length"),
    synthetic: str | None = typer.Option(
        None, "--synthetic", help="random prompts with the lengths of a synthetic workload "
        "(mtbench, rag, reasoning) instead of --prompt-len"),
    gen_len: int = typer.Option(..., "--gen-len", help="tokens to generate per prompt"),
    device_name: str = typer.Option("auto", "--device", help="cuda, cpu or auto"),
    gpu_mem: float | None = typer.Option(None, "--gpu-mem", help="GPU memory cap (GiB)"),
    cpu_mem: float | None = typer.Option(None, "--cpu-mem", help="CPU memory cap (GiB)"),
    pin_mem: float | None = typer.Option(
        None, "--pin-mem", help="pinned-memory budget for weights (GiB) [default: the profile's "
        "pinned max, else 45% of RAM]"),
    schedule: str | None = typer.Option(None, "--schedule",
                                        help="cgopipe | cgopipe-serial | layerwise"),
    scheduler: str = typer.Option(
        "static", "--scheduler", help="static (fixed batches) | continuous (decode + prefill "
        "tokens in every weight pass, KV blocks, preemption; executor/continuous.py)"),
    kv_blocks: int | None = typer.Option(
        None, "--kv-blocks", help="continuous: KV blocks [default: all the CPU memory holds]"),
    gpus: int | None = typer.Option(
        None, "--gpus", help="GPUs (one process each) [default: the policy's num_gpus]"),
    parallelism: str | None = typer.Option(
        None, "--parallelism", help="tp | ep with --gpus > 1 [default: the policy's]"),
    expert_kernel: str | None = typer.Option(
        None, "--expert-kernel", help="loop | grouped: decode's routed experts, a GEMM pair per "
        "expert or one grouped GEMM pair for all (torch._grouped_mm) [default: the policy's]"),
    staging_buffers: int | None = typer.Option(
        None, "--staging-buffers", min=2, help="GPU staging buffers of streamed expert layers "
        "(2: double buffering; each holds a layer's streamed experts) [default: the policy's]"),
    num_layers: int | None = typer.Option(None, "--num-layers",
                                          help="run only the first N layers (random weights)"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="generate gen_len tokens always"),
    trace: Path | None = typer.Option(None, "--trace", help="write a Chrome/Perfetto trace"),
    outputs_path: Path | None = typer.Option(None, "--outputs",
                                             help="outputs JSONL [default: next to -o]"),
    output: Path = typer.Option(..., "-o", "--output", help="result.json"),
    as_json: bool = typer.Option(False, "--json", help="print result.json"),
) -> None:
    """Run offline batch generation under a policy; measure it next to the HRM prediction."""
    import torch

    from executor.distributed import Shard, check_gpus, rank_cores, spawn
    from executor.engine import generate_on_rank, run_facts
    from executor.sampling import Sampling
    from executor.schedule import compute_threads
    from executor.trace import chrome_trace, decode_busy_s
    from executor.weights import read_model
    from hrm.cli import console, emit_json
    from hrm.policy import Policy

    if scheduler not in ("static", "continuous"):
        raise PolicyError(f"--scheduler must be static or continuous, got {scheduler!r}")
    if dummy_weights == (checkpoint is not None):
        raise HRMError("give exactly one of --dummy-weights and --checkpoint DIR")
    if (policy_path is None) == (not optimize_policy):
        raise HRMError("give exactly one of --policy FILE and --optimize")
    if optimize_policy and hardware is None:
        raise HardwareProfileError("--optimize needs --hardware PROFILE")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name not in ("cuda", "cpu") or (device_name == "cuda" and
                                              not torch.cuda.is_available()):
        raise HRMError(f"--device {device_name}: expected cuda (with a GPU present) or cpu")
    device = torch.device(device_name)
    spec, _ = read_model(checkpoint or model)
    if num_layers is not None:
        if checkpoint is not None or not 0 < num_layers <= spec.num_layers:
            raise HRMError(f"--num-layers must be in [1, {spec.num_layers}] and needs "
                           "--dummy-weights")
        model_arg = _truncated_config(model, num_layers, output)
        spec, _ = read_model(model_arg)
    else:
        model_arg = model

    if prompts_path is not None:
        if num_seqs is not None or prompt_len is not None:
            raise PromptError("give --prompts or --num-seqs/--prompt-len, not both")
        prompts = read_prompts(prompts_path, tokenizer)
    elif num_seqs and num_seqs > 0 and synthetic and prompt_len is None:
        lens = synthetic_workload(synthetic, num_seqs, gen_len, seed).prompt_lens
        prompts = random_prompts(list(lens), spec.vocab_size, seed)
    elif num_seqs and prompt_len and num_seqs > 0 and prompt_len > 0 and not synthetic:
        prompts = random_prompts([prompt_len] * num_seqs, spec.vocab_size, seed)
    else:
        raise PromptError("give --prompts FILE, or a positive --num-seqs N with either "
                          "--prompt-len P or --synthetic KIND")
    workload = Workload.from_lens([len(p) for p in prompts], gen_len)
    # continuous: each sequence's own budget (a reasoning workload's lengths), else gen_len
    gen_lens = list(synthetic_workload(synthetic, num_seqs, gen_len, seed).gen_lens or []) \
        if synthetic and prompts_path is None else []
    gen_lens = gen_lens or [gen_len] * len(prompts)

    gpu_total = torch.cuda.get_device_properties(device).total_memory if \
        device.type == "cuda" else float("inf")
    gpu_limit = min(gpu_total, gpu_mem * GiB) if gpu_mem else gpu_total
    cpu_limit = cpu_mem * GiB if cpu_mem else host_memory_bytes()
    hw = load_profile(hardware) if hardware else None
    if hw is not None:
        hw = hw.with_memory(gpu_memory_bytes=gpu_limit if gpu_limit < float("inf") else None,
                            cpu_memory_bytes=cpu_limit)
    pin_budget = pin_mem * GiB if pin_mem is not None else pin_budget_bytes(hw)
    if hw is not None:  # the optimizer and the prediction see the pinned budget the run uses
        hw = hw.with_memory(pinned_max_bytes=pin_budget)
    if optimize_policy:
        from hrm.optimize import optimize

        if scheduler == "continuous":
            from hrm.continuous import optimize_continuous

            policy = optimize_continuous(spec, hw, Workload.from_lens(
                [len(p) for p in prompts], gen_lens)).policy
        else:
            policy = optimize(spec, hw, workload, schedule=schedule or "cgopipe").policy
    else:
        policy = Policy.load(policy_path)
        if schedule:
            attn = "gpu" if schedule == "layerwise" else policy.attn_decode_device
            policy = replace(policy, schedule=schedule, attn_decode_device=attn,
                             kv_gpu_fraction=policy.kv_gpu_fraction if attn == "gpu" else 0.0)
    policy = replace(policy, num_gpus=gpus or policy.num_gpus,
                     parallelism=parallelism or policy.parallelism,
                     expert_kernel=expert_kernel or policy.expert_kernel,
                     staging_buffers=staging_buffers or policy.staging_buffers)
    world = policy.num_gpus
    if world > 1:
        if scheduler == "continuous":
            raise PolicyError("the continuous scheduler runs on one GPU; drop --gpus or use "
                              "--scheduler static")
        check_gpus(world, device.type)
        Shard(0, world, policy.parallelism).spec(spec)  # the model splits evenly, else raise

    config_eos = _eos(checkpoint or model_arg)
    common = dict(device=device, checkpoint=str(checkpoint) if checkpoint else None,
                  gpu_mem_bytes=gpu_limit, cpu_mem_bytes=cpu_limit / world,
                  pin_budget_bytes=pin_budget / world, sampling=Sampling(temperature, top_p, seed),
                  eos_token_id=None if ignore_eos else config_eos, seed=seed)
    continuous: dict[str, Any] = {}
    try:
        if scheduler == "continuous":
            from executor.continuous import run_continuous

            if device.type == "cuda" and gpu_limit < gpu_total:
                torch.cuda.set_per_process_memory_fraction(gpu_limit / gpu_total,
                                                           device.index or 0)
            engine, gen, continuous = run_continuous(model_arg, policy, prompts=prompts,
                                                     gen_lens=gen_lens, hw=hw,
                                                     num_blocks=kv_blocks, **common)
            facts = {"generation": gen, "load_s": continuous.pop("load_s"), **run_facts(engine)}
        elif world == 1:
            facts = generate_on_rank(Shard(), model_arg, policy, prompts, gen_len, common)
        else:
            facts = spawn(generate_on_rank, world, policy.parallelism, device.type, model_arg,
                          policy, prompts, gen_len, common)
    except torch.OutOfMemoryError as exc:
        raise InfeasibleError(f"the run exceeded the GPU memory cap of {gpu_limit / GiB:.1f} GiB "
                              f"({str(exc).splitlines()[0]}); lower micro_batch_size or "
                              "weights_gpu_fraction") from None

    gen = facts["generation"]
    generated = sum(len(o) for o in gen.outputs)
    total_s = gen.prefill_s + gen.decode_s
    decode_busy = decode_busy_s(gen.spans, gen.decode_windows)
    prediction = continuous.pop("prediction") if continuous else \
        _predict(spec, hw, workload, policy.in_whole_experts(spec.num_layers, spec.num_experts))
    result = {
        "schedule": policy.schedule,
        "scheduler": scheduler,
        **continuous,   # continuous: what the scheduler did (passes, preemptions, KV blocks)
        "model": spec.name,
        "num_layers": spec.num_layers,
        "weights": "random" if dummy_weights else str(checkpoint),
        "policy": policy.to_dict(),
        "num_gpus": world,
        "parallelism": policy.parallelism,
        "realized": facts["realized"],  # of rank 0's shard
        "workload": {"num_seqs": workload.num_seqs, "prompt_len": workload.prompt_len,
                     "max_prompt_len": workload.max_prompt_len, "gen_len": gen_len},
        "generated_tokens": generated,
        "throughput_tok_s": generated / total_s,
        "predicted_throughput_tok_s": prediction["throughput_tok_s"] if prediction else None,
        "prefill_s": gen.prefill_s,
        "decode_s": gen.decode_s,
        "predicted_prefill_s": prediction["prefill_s"] if prediction else None,
        "predicted_decode_s": prediction["decode_s"] if prediction else None,
        "decode_busy_s": decode_busy,
        "decode_utilization": {t: (b / gen.decode_s if gen.decode_s else 0.0)
                               for t, b in decode_busy.items()},
        "bytes_moved": gen.bytes_moved,
        "peak_gpu_mem_bytes": max(facts["peak_gpu_mem_bytes_per_rank"]),
        "peak_gpu_mem_bytes_per_rank": facts["peak_gpu_mem_bytes_per_rank"],
        "peak_cpu_mem_bytes": sum(facts["peak_cpu_mem_bytes_per_rank"]),
        "peak_cpu_mem_bytes_per_rank": facts["peak_cpu_mem_bytes_per_rank"],
        "gpu_mem_limit_bytes": gpu_limit if gpu_limit < float("inf") else None,
        "gpu_mem_plan_bytes": facts["gpu_mem_plan_bytes"],  # per GPU (rank 0)
        "cpu_mem_plan_bytes": facts["cpu_mem_plan_bytes"],  # per rank (rank 0)
        "load_s": facts["load_s"],
        # untimed warm-up generate before the measured run (Engine.warm_up; CUDA only)
        "warmup_s": facts.get("warmup_s", 0.0),
        "prediction": prediction,
        "hardware_profile": hw.name if hw else None,
        "machine": dict(machine_info(device), pipeline_torch_threads=compute_threads(
            len(rank_cores(0, world)))),
        "command": shlex.join(["hrm", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    outputs_path = outputs_path or output.with_suffix(".outputs.jsonl")
    decode = _detokenizer(tokenizer)
    write_text_atomic(outputs_path, "".join(
        json.dumps({"index": i, "tokens": o} | ({"text": decode(o)} if decode else {})) + "\n"
        for i, o in enumerate(gen.outputs)))
    if trace:
        write_json_atomic(trace, {"traceEvents": chrome_trace(gen.spans),
                                  "displayTimeUnit": "ms"})
    write_json_atomic(output, result)
    if as_json:
        emit_json(result)
        return
    pred = result["predicted_throughput_tok_s"]
    console.print(f"{policy.schedule}: {result['throughput_tok_s']:.2f} tok/s measured, "
                  + (f"{pred:.2f} tok/s predicted" if pred else "no prediction (no --hardware)")
                  + f"; prefill {gen.prefill_s:.2f} s, decode {gen.decode_s:.2f} s -> {output}")
    steady = result.get("steady")
    if steady:
        first, last = steady["passes"]
        steady_pred = steady.get("predicted_throughput_tok_s")
        console.print(f"  steady state, passes {first}-{last} of "
                      f"{result['continuous']['passes']}: {steady['throughput_tok_s']:.2f} tok/s "
                      "measured"
                      + (f", {steady_pred:.2f} predicted" if steady_pred else ""))


def _detokenizer(tokenizer_dir: Path | None) -> Any:
    """token ids -> text with the local tokenizer, if one was given."""
    if tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir)).decode


def _eos(model: str | Path) -> int | None:
    from executor.weights import read_model

    eos = read_model(model)[1].get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def _truncated_config(model: str, num_layers: int, output: Path) -> str:
    """A copy of the model's config.json with only the first `num_layers` layers, written next
    to the result (it is part of what was run)."""
    from executor.weights import read_model

    spec, config = read_model(model)
    config = dict(config, num_hidden_layers=num_layers,
                  _name_or_path=f"{spec.name}-{num_layers}layers")
    path = output.with_suffix(".config.json")
    write_json_atomic(path, config)
    return str(path)


def _predict(spec: Any, hw: Any, workload: Workload, policy: Any) -> dict[str, Any] | None:
    """The HRM prediction for this run (`policy` as the executor realized it: whole experts),
    or None without a hardware profile."""
    if hw is None:
        return None
    from hrm.cost import predict

    try:
        return predict(spec, hw, workload, policy).to_dict()
    except (PolicyError, InfeasibleError) as exc:
        return {"throughput_tok_s": None, "prefill_s": None, "decode_s": None,
                "error": str(exc)}
