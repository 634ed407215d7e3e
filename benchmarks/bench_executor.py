"""Executor benchmark on the GPU machine: Mixtral-8x7B shapes, random bf16 weights, GPU capped at
16 GiB, MTBench-like prompts (~100 tokens), gen 32/64/128/256:

  (1) cgopipe with the policy `hrm optimize` finds for the machine's profile,
  (2) layerwise with the policy `hrm optimize --schedule layerwise` finds (its best batch size
      under the same model),
  (3) Hugging Face transformers + accelerate `cpu_offload`, best of a few batch sizes.

Layers: with --layers L < 32 the model keeps the first L decoder layers, and the limits keep one
layer's view of the full model: the policy is optimized for all 32 layers under 16 GiB (r_w then
lowered, if needed, until the executor's own memory plan fits), and the L-layer run gets a GPU
cap of 16 GiB minus what the 32 - L missing layers would hold (dense weights, resident experts,
GPU KV), L/32 of the CPU memory and L/32 of the pinned budget. Throughput
of the full model is then about measured * L/32 (reported as `full_model_tok_s_estimate`, an
extrapolation, not a measurement). accelerate moves one layer at a time, so its cap is the
unscaled 16 GiB.

Run (one device session):  python benchmarks/bench_executor.py --layers 4 --out $OUT
Results: one JSON with every run's result.json (benchmarks/results/executor_*.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.cli import host_memory_bytes, pin_budget_bytes  # noqa: E402
from hrm.hardware import HardwareProfile, load_profile, save_profile  # noqa: E402
from hrm.io import write_json_atomic  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.optimize import optimize  # noqa: E402
from hrm.profile import time_calls  # noqa: E402
from hrm.units import GiB  # noqa: E402
from hrm.workload import synthetic_workload  # noqa: E402

FULL_LAYERS = 32
#: sequences offered to the optimizer: the batch it picks is then run once
OPTIMIZER_NUM_SEQS = 4096


#: entries of the executor's CPU memory plan that do not grow with the number of layers
LAYER_INDEPENDENT_CPU = ("prefill parking (pinned)",)


def scaled_limits(layers: int, host_bytes: float, pinned_bytes: float) -> dict[str, float]:
    """The L/32 share of the CPU memory and the pinned budget (both hold per-layer data)."""
    f = layers / FULL_LAYERS
    return {"cpu_mem_bytes": host_bytes * f, "pin_bytes": pinned_bytes * f}


@dataclass
class LayerBench:
    """The first L decoder layers of Mixtral-8x7B that a benchmark runs, the L/32 share of the
    machine they get, and the summary JSON rewritten (atomically) after every run."""

    layers: int
    hw: HardwareProfile
    limits: dict[str, float]
    workdir: Path
    layer_config: Path
    summary_path: Path
    results: list[dict] = field(default_factory=list)

    def save(self) -> None:
        write_json_atomic(self.summary_path, {"layers": self.layers, "limits": self.limits,
                                              "hardware_profile": self.hw.name,
                                              "runs": self.results})

    def cpu_limit_bytes(self, plan: Any = None) -> float:
        """The L-layer run's CPU limit: L/32 of what the full model's layers may use, plus the
        buffers of `plan` (the executor's memory plan) that every model holds once whatever its
        depth (LAYER_INDEPENDENT_CPU): (host - fixed) L / 32 + fixed."""
        fixed = sum(plan.cpu.get(k, 0.0) for k in LAYER_INDEPENDENT_CPU) if plan else 0.0
        return self.limits["cpu_mem_bytes"] + fixed * (1 - self.layers / FULL_LAYERS)

    def layer_profile(self, gpu_cap_bytes: float, cpu_bytes: float, name: str) -> Path:
        """The profile with the L-layer run's GPU cap, CPU limit and pinned share, saved for
        `hrm run --hardware` (so the prediction it writes uses the same limits)."""
        hw = self.hw.with_memory(gpu_memory_bytes=gpu_cap_bytes, cpu_memory_bytes=cpu_bytes)
        hw = hw.with_memory(pinned_max_bytes=self.limits["pin_bytes"])
        path = self.workdir / f"{self.hw.name}-{name}.toml"
        save_profile(hw, path)
        return path


def add_host_mem_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--host-mem", type=float, default=None,
                    help="GiB of host memory the full model may use (default: what the OS "
                         "reports; hosts whose memory grows on use report too little at start)")
    ap.add_argument("--pin-gib", type=float, default=None,
                    help="GiB the full model may pin (default: the profile's probed limit, "
                         "else executor.cli.DEFAULT_PIN_SHARE of host memory; the pin probe "
                         "pinned >= 72 GiB on the H200 machine, hardware_profiles/"
                         "h200-machine.toml)")


def host_memory(host_mem_gib: float | None, hw: HardwareProfile, pin_gib: float | None = None
                ) -> tuple[float, HardwareProfile]:
    """Host bytes the full model may use (--host-mem, else what the OS reports) and the profile
    with that CPU memory when --host-mem is given (the profile's CPU memory is what the host
    showed when it was profiled), and with the pinned limit --pin-gib when given (what
    `pin_budget_bytes` then gives the optimizer and the runs)."""
    if pin_gib:
        hw = hw.with_memory(pinned_max_bytes=pin_gib * GiB)
    if not host_mem_gib:
        return host_memory_bytes(), hw
    return host_mem_gib * GiB, hw.with_memory(cpu_memory_bytes=host_mem_gib * GiB)


def layer_bench(config: dict, layers: int, hw: HardwareProfile, host_bytes: float, out: Path,
                name: str) -> LayerBench:
    """Write the L-layer config into a fresh work dir and size the L-layer limits."""
    limits = scaled_limits(layers, min(host_bytes, hw.cpu.memory_bytes),
                           pin_budget_bytes(hw, host_bytes))
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    layer_config = workdir / f"mixtral-8x7b-{layers}layers.json"
    layer_config.write_text(json.dumps(dict(config, num_hidden_layers=layers,
                                            _name_or_path=f"mixtral-8x7b-{layers}layers")))
    return LayerBench(layers, hw, limits, workdir, layer_config,
                      out / f"{name}_bench_{layers}layers.json")


def executor_plan(spec, policy, prompt_lens: list[int], gen_len: int):
    """The executor's memory plan of `policy` on `spec` (what `hrm run` checks before loading)."""
    from executor.engine import plan_memory
    from executor.weights import resident_experts_per_layer

    return plan_memory(spec, policy, resident_experts_per_layer(spec, policy.weights_gpu_fraction),
                       prompt_lens, gen_len)


def fit_to_executor(spec, policy, prompt_lens: list[int], gen_len: int, gpu_bytes: float,
                    cpu_bytes: float):
    """The policy with r_w lowered (one expert of the model at a time) until the executor's own
    memory plan fits the full model's limits (the executor keeps two whole-layer staging buffers
    and counts its activation workspace, which the cost model may size differently)."""
    step = 1 / (spec.num_layers * spec.num_experts)
    while True:
        plan = executor_plan(spec, policy, prompt_lens, gen_len)
        fits = sum(plan.gpu.values()) <= gpu_bytes and sum(plan.cpu.values()) <= cpu_bytes
        if fits or policy.weights_gpu_fraction <= 0:
            return policy, plan
        policy = replace(policy, weights_gpu_fraction=max(0.0, policy.weights_gpu_fraction - step))


def layer_gpu_bytes(spec, plan) -> float:
    """GPU bytes one decoder layer adds under a plan (dense layer weights, resident experts,
    GPU KV): what dropping a layer frees."""
    per_layer_dense = (plan.gpu["dense weights"] - spec.embedding_params() * 2) / spec.num_layers
    return per_layer_dense + (plan.gpu["resident experts"] + plan.gpu["KV cache"]) / spec.num_layers


def add_deadline_options(ap: argparse.ArgumentParser) -> None:
    """--deadline-s and --run-timeout-s, so that a device call returns what finished."""
    ap.add_argument("--deadline-s", type=float, default=float("inf"),
                    help="start no new run after this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=None,
                    help="kill a run that takes longer than this (default: no limit)")


def run_cli(args: list[str], workdir: Path, name: str, timeout_s: float | None = None) -> dict:
    """`hrm run` in a fresh process (its pinned memory and GPU cap die with it), killed after
    `timeout_s` (the record then says so, and the benchmark goes on)."""
    result = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "hrm.cli", "run", *args, "-o", str(result)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"[{name}] killed after {timeout_s:g} s", flush=True)
        return {"name": name, "error": f"timed out after {timeout_s:g} s",
                "command": " ".join(cmd)}
    wall = time.perf_counter() - start
    print(f"[{name}] rc={proc.returncode} {wall:.0f}s {proc.stdout.strip()[-300:]}"
          f"{proc.stderr.strip()[-600:]}", flush=True)
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr or proc.stdout).strip()[-2000:],
                "command": " ".join(cmd)}
    data = json.loads(result.read_text())
    data["name"], data["process_wall_s"] = name, wall
    return data


def accelerate_run(config: dict, layers: int, prompt_lens: list[int], gen_len: int,
                   batch: int, gpu_cap_bytes: float) -> dict:
    """transformers + accelerate cpu_offload: weights in CPU memory, each module's weights moved
    to the GPU when it runs. Random weights are a repeated random tile (fast init)."""
    import torch
    from accelerate import cpu_offload
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    from executor.weights import RANDOM_STD, _fill_tiled

    cfg = MixtralConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    cfg.num_hidden_layers = layers
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    tile = (torch.randn((1 << 22) + 7) * RANDOM_STD).to(torch.bfloat16)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name:
                p.fill_(1.0)
            else:
                _fill_tiled(p.view(-1), tile)
    model.model.rotary_emb = MixtralRotaryEmbedding(config=cfg)
    model.eval()
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_cap_bytes / total), 0)
    cpu_offload(model, execution_device=device)
    lens = prompt_lens[:batch]
    width = max(lens)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (len(lens), width), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):  # left padding
        mask[i, width - n:] = 1

    def generate(new_tokens: int) -> torch.Tensor:
        return model.generate(ids.to(device), attention_mask=mask.to(device),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)

    try:
        with torch.inference_mode():
            warm_start = time.perf_counter()
            generate(2)   # untimed warm-up, as the executor's (Engine.warm_up)
            warmup_s = time.perf_counter() - warm_start
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = generate(gen_len)
    except torch.OutOfMemoryError as exc:
        return {"schedule": "accelerate", "batch_size": batch, "gen_len": gen_len,
                "error": f"out of memory: {str(exc).splitlines()[0]}"}
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - width) * len(lens)
    return {"schedule": "accelerate", "num_layers": layers, "batch_size": batch,
            "gen_len": gen_len, "generated_tokens": generated, "total_s": elapsed,
            "warmup_s": warmup_s,
            "throughput_tok_s": generated / elapsed,
            "full_model_tok_s_estimate": generated / elapsed * layers / FULL_LAYERS,
            "peak_gpu_mem_bytes": torch.cuda.max_memory_allocated(device),
            "gpu_mem_limit_bytes": gpu_cap_bytes,
            "mean_prompt_len": sum(lens) / len(lens)}


#: (batch, longest context) of the attention benchmark: decode micro-batches of short and long
#: contexts, and one long-context call with few sequences
ATTENTION_SHAPES = ((64, 144), (64, 1024), (256, 512), (1024, 256), (8, 8192))


def block_pool(k_blocks, v_blocks, lens: list[int]):
    """The per-block tensors [rows_j, Hkv, T, D] scattered over a shuffled pool [N, Hkv, T, D]
    (seeded), and each sequence's block table."""
    import torch

    owners = [(b, j) for j, blk in enumerate(k_blocks) for b in range(blk.shape[0])]
    slot_of = dict(zip(owners, torch.randperm(len(owners), generator=torch.Generator()
                                              .manual_seed(0)).tolist(), strict=True))
    pools = []
    for blocks in (k_blocks, v_blocks):
        pool = torch.empty(len(owners), *blocks[0].shape[1:], dtype=blocks[0].dtype)
        for (b, j), slot in slot_of.items():
            pool[slot] = blocks[j][b]
        pools.append(pool)
    tables = [[slot_of[(b, j)] for j in range(len(k_blocks)) if (b, j) in slot_of]
              for b in range(len(lens))]
    return pools[0], pools[1], tables


def attention_bench(threads: int | None = None, shapes=ATTENTION_SHAPES,
                    dram_bytes: int = 4 * GiB) -> list[dict]:
    """CPU decode attention at decode shapes (32 q / 8 kv heads, D=128): KV bytes read per
    second of the dense kernel and of both paged kernels (torch ops and C++, ragged lengths),
    next to the DRAM read bandwidth of a torch sum over `dram_bytes` (the roof)."""
    import torch

    from executor.kernels import (
        cpu_decode_attention,
        cpu_decode_attention_table,
        gather_blocks,
        paged_attention_cpp,
        paged_attention_extension,
        paged_attention_torch,
    )
    from executor.kv_cache import BLOCK_TOKENS

    if threads:
        torch.set_num_threads(threads)
    extension = paged_attention_extension()

    def best_s(fn, reps: int = 5) -> float:
        return min(time_calls(fn, reps, "cpu"))

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        big = torch.ones(dram_bytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
        dram_bps = big.numel() * big.element_size() / best_s(lambda b=big: b.sum())
        del big
        for batch, seq in shapes:
            q = torch.randn(batch, 32, 128).to(dtype)
            padded = -(-seq // BLOCK_TOKENS) * BLOCK_TOKENS   # the cache holds whole blocks
            k, v = (torch.randn(batch, 8, padded, 128).to(dtype) for _ in "kv")
            kv_bytes = 2 * k[:, :, :seq].numel() * k.element_size()
            lens = sorted((seq - (i * 7) % (seq // 4) for i in range(batch)), reverse=True)
            ragged_bytes = kv_bytes * sum(lens) / (batch * seq)
            kb, vb = ([x[:sum(1 for n in lens if n > j * BLOCK_TOKENS), :,
                         j * BLOCK_TOKENS:(j + 1) * BLOCK_TOKENS].contiguous()
                       for j in range(-(-lens[0] // BLOCK_TOKENS))] for x in (k, v))
            row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "context": seq,
                   "dram_read_bps": dram_bps, "threads": torch.get_num_threads(),
                   "dense_kv_bps": kv_bytes / best_s(
                       lambda q=q, k=k[:, :, :seq], v=v[:, :, :seq]: cpu_decode_attention(q, k, v)),
                   "paged_torch_kv_bps": ragged_bytes / best_s(
                       lambda q=q, k=kb, v=vb, n=lens: paged_attention_torch(q, k, v, n))}
            if extension is not None:
                row["paged_cpp_kv_bps"] = ragged_bytes / best_s(
                    lambda q=q, k=kb, v=vb, n=lens: paged_attention_cpp(extension, q, k, v, n))
                row["paged_cpp_fraction_of_dram"] = row["paged_cpp_kv_bps"] / dram_bps
                # the continuous scheduler's cache: the same blocks scattered over a pool,
                # read through block tables, against gathering them first (its old path)
                pool_k, pool_v, tables = block_pool(kb, vb, lens)
                row["pool_cpp_kv_bps"] = ragged_bytes / best_s(
                    lambda q=q, k=pool_k, v=pool_v, t=tables, n=lens:
                    cpu_decode_attention_table(q, k, v, t, n))
                row["pool_gather_then_cpp_kv_bps"] = ragged_bytes / best_s(
                    lambda q=q, k=pool_k, v=pool_v, t=tables, n=lens: paged_attention_cpp(
                        extension, q, *gather_blocks(k, v, t, n), n))
                del pool_k, pool_v
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            del q, k, v, kb, vb
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=FULL_LAYERS)
    ap.add_argument("--gen-lens", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--gpu-mem", type=float, default=16.0, help="GiB, for the full model")
    ap.add_argument("--hardware", default="h100")
    add_host_mem_option(ap)
    ap.add_argument("--accelerate-gen-lens", type=int, nargs="*", default=[32])
    ap.add_argument("--accelerate-batches", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--only", nargs="*", default=["cgopipe", "layerwise", "accelerate"])
    ap.add_argument("--staging-buffers", type=int, nargs="+", default=[2],
                    help="CGOPipe runs with each of these numbers of GPU staging buffers "
                         "(policy staging_buffers; 2: the optimizer's double buffering)")
    ap.add_argument("--trace", action="store_true",
                    help="keep the trace of each schedule's first run")
    add_deadline_options(ap)
    ap.add_argument("--attention", action="store_true",
                    help="only benchmark CPU decode attention (no GPU needed)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.attention:
        import platform

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        write_json_atomic(args.out / "executor_cpu_attention.json", {
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count()},
            "command": " ".join([sys.executable, *sys.argv]), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "rows": attention_bench()})
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_executor needs a CUDA GPU")
    spec = load_model_spec("mixtral-8x7b")
    config = json.loads((ROOT / "hrm" / "model_configs" / "mixtral-8x7b.json").read_text())
    host_bytes, hw = host_memory(args.host_mem, load_profile(args.hardware), args.pin_gib)
    bench = layer_bench(config, args.layers, hw, host_bytes, args.out, "executor")
    limits, workdir, results = bench.limits, bench.workdir, bench.results
    # the optimizer sees the pinned budget the runs get (bench.limits' is its L/32 share)
    hw_full = hw.with_memory(gpu_memory_bytes=args.gpu_mem * GiB,
                             cpu_memory_bytes=min(host_bytes, hw.cpu.memory_bytes),
                             pinned_max_bytes=pin_budget_bytes(hw, host_bytes))
    common = ["--model", str(bench.layer_config), "--dummy-weights", "--device", "cuda",
              "--pin-mem", f"{limits['pin_bytes'] / GiB:.4f}", "--ignore-eos",
              "--synthetic", "mtbench"]

    started = time.perf_counter()
    runs = [("cgopipe", b) for b in args.staging_buffers] + [("layerwise", 2)]
    for gen_len in args.gen_lens:
        wl = synthetic_workload("mtbench", OPTIMIZER_NUM_SEQS, gen_len)
        optimized: dict[str, Any] = {}
        for schedule, buffers in runs:
            if schedule not in args.only or time.perf_counter() - started > args.deadline_s:
                continue
            # the policy is optimized for the full model under the full limits, then run on
            # the first L layers with the per-layer share of the limits (with more staging
            # buffers than the optimizer's two, r_w comes down until they fit)
            if schedule not in optimized:   # once per schedule, whatever the staging buffers
                optimized[schedule] = optimize(spec, hw_full, wl, schedule=schedule)
            opt = optimized[schedule]
            lens = list(synthetic_workload("mtbench", opt.policy.batch_size, gen_len).prompt_lens)
            policy, plan = fit_to_executor(spec, replace(opt.policy, staging_buffers=buffers),
                                           lens, gen_len, args.gpu_mem * GiB,
                                           hw_full.cpu.memory_bytes)
            tag = schedule if buffers == 2 else f"{schedule}_b{buffers}"
            policy_path = workdir / f"policy_{tag}_g{gen_len}.json"
            policy.save(policy_path)
            gpu_cap_l = args.gpu_mem * GiB - (FULL_LAYERS - args.layers) * \
                layer_gpu_bytes(spec, plan)
            cpu_cap_l = bench.cpu_limit_bytes(plan)
            caps = ["--gpu-mem", f"{gpu_cap_l / GiB:.4f}", "--cpu-mem", f"{cpu_cap_l / GiB:.4f}"]
            profile_path = bench.layer_profile(gpu_cap_l, cpu_cap_l, f"{tag}-g{gen_len}")
            extra = ["--trace", str(args.out / f"executor_trace_{tag}.json")] \
                if args.trace and gen_len == args.gen_lens[0] else []
            res = run_cli([*common, *caps, "--policy", str(policy_path), "--hardware",
                           str(profile_path), "--num-seqs",
                           str(opt.policy.batch_size), "--gen-len", str(gen_len), *extra],
                          workdir, f"{tag}_g{gen_len}", args.run_timeout_s)
            res["full_model_prediction"] = opt.prediction.to_dict()
            res["optimizer_policy"] = opt.policy.to_dict()
            if "throughput_tok_s" in res:
                res["full_model_tok_s_estimate"] = \
                    res["throughput_tok_s"] * args.layers / FULL_LAYERS
            results.append(res)
            bench.save()
        if "accelerate" in args.only and gen_len in args.accelerate_gen_lens:
            lens = list(synthetic_workload("mtbench", max(args.accelerate_batches),
                                           gen_len).prompt_lens)
            for batch in args.accelerate_batches:
                if time.perf_counter() - started > args.deadline_s:
                    break
                code = (f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); "
                        "from benchmarks.bench_executor import accelerate_run; "
                        f"print(json.dumps(accelerate_run({config!r}, {args.layers}, {lens!r}, "
                        f"{gen_len}, {batch}, {args.gpu_mem * GiB})))")
                proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                                      capture_output=True, text=True)
                line = proc.stdout.strip().splitlines()[-1:] or [""]
                try:
                    res = json.loads(line[0])
                except json.JSONDecodeError:
                    res = {"schedule": "accelerate", "batch_size": batch, "gen_len": gen_len,
                           "error": proc.stderr.strip()[-1500:]}
                print(f"[accelerate b{batch} g{gen_len}] {json.dumps(res)[:300]}", flush=True)
                results.append(res)
                bench.save()
    bench.save()
    print(f"wrote {bench.summary_path}")


if __name__ == "__main__":
    main()
