"""`hrm profile`: measure this machine and fit a HardwareProfile the cost model uses directly.

Microbenchmarks (each a small function returning `Measurement`s):
  GPU tier   gemm_series        achieved FLOP/s of x[rows, h1] @ W[h1, h2] over rows = tokens per
                                expert, Mixtral and DBRX expert shapes, bf16/fp16; square GEMMs
                                for the peak; hbm_copy (device copy, read + write counted);
                                op_overhead (a tiny kernel launched from Python in a burst);
                                launch_blocks (the host time per operation of the
                                executor's decode blocks: pre-attention, post-attention
                                with grouped experts, GPU attention);
                                attention_handoff (the launching thread's hand-off of a
                                micro-batch's decode attention to the CPU worker and back)
  link       copy_series        H2D / D2H bytes/s vs copy size, pinned and pageable;
             paged_copy_series  one buffer moved as many pages vs one copy (the page size);
             staging_copy       pageable -> pinned memcpy by the CPU; kv_gather (a CPU KV
                                cache gathered into pinned memory for GPU attention);
                                probe_pinned_max
  CPU tier   gemm_series (CPU), dram_read (torch sum), cpu_attention_series (the executor's
             kernel, the model's head layout, fp32 and bf16 KV, batch x context)
  overlap    interference       link, GPU stage (Python-launched small kernels + an expert GEMM)
                                and CPU attention each alone, then all three at once from three
                                threads; slowdown = solo rate / together rate; the GPU
                                thread's launches timed on their own (interference.launch);
                                the staging copy alone, beside all three and beside the link
                                alone (interference.staging_copy, staging_copy_link: the copy
                                thread's factors in hrm.cost)
  executor   pipeline_calibration  a few seconds of the executor's own CGOPipe decode (CUDA) at
                                CALIBRATION's shape; over the model's solo GPU stage it gives
                                interference.pipeline, the GPU stage's factor where present;
                                again with 60% of the expert bytes pinned (CALIBRATION_STAGED):
                                interference.pipeline_staged, for policies that stage weights
`build_profile` maps the measurements onto the profile's fields, fits the curves (hrm.fit) and
records how each value was measured. Without CUDA (or with --device cpu) the CPU stands in for
the GPU, as in the executor's --device cpu: "GPU" tensors are CPU tensors and the link is a CPU
memcpy. torch is imported inside the functions so that the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from hrm.errors import HRMError
from hrm.hardware import (
    PROFILE_DIR,
    CPUTier,
    GPUTier,
    HardwareProfile,
    InterconnectTier,
    Interference,
    LinkTier,
    SaturatingCurve,
    load_profile,
    save_profile,
)
from hrm.io import write_json_atomic
from hrm.model import ModelSpec, load_model_spec
from hrm.roofline import (
    ATTENTION_IN_BLOCK,
    GPU_ATTENTION_BLOCK,
    GROUPED_EXPERTS_CURVE,
    OPS_ATTENTION_IN,
    OPS_ATTENTION_OUT,
    OPS_GPU_DECODE_ATTENTION,
    OPS_MOE_GROUPED,
    POST_GROUPED_BLOCK,
    whole_block_tokens,
)
from hrm.units import GiB, KiB, MiB, dtype_bytes, fmt_bytes

STANDIN_NOTE = "no CUDA: GPU tier measured on the CPU stand-in"


class ProfileError(HRMError):
    """The profiler cannot run as asked (no CUDA for --device cuda, bad option values)."""


# ---- measurements ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """One benchmark point: `work` (FLOPs or bytes) done per call, each call timed once.

    `x` is the abscissa of the efficiency curve the point belongs to (GEMM rows, bytes per copy,
    KV bytes per attention call); the rate is work / median time."""

    bench: str
    params: dict[str, Any]
    x: float
    work: float
    unit: str
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def rate(self) -> float:
        return self.work / self.median_s

    @property
    def iqr_rel(self) -> float:
        """Inter-quartile range of the times over their median (0 for one sample)."""
        q25, q75 = np.percentile(self.times_s, [25, 75])
        return float((q75 - q25) / self.median_s)

    def to_dict(self) -> dict[str, Any]:
        return {"bench": self.bench, "params": self.params, "x": self.x, "work": self.work,
                "unit": self.unit, "times_s": list(self.times_s)}


@dataclass(frozen=True)
class Environment:
    """What was measured, when, with what software."""

    date: str
    device: str            # 'cuda', or 'cpu' for the CPU stand-in
    mode: str              # 'quick' or 'full'
    torch_version: str
    cuda_version: str
    gpu_name: str
    cpu_name: str
    threads: int
    gpu_memory_bytes: float
    cpu_memory_bytes: float
    model: str             # head layout of the CPU attention benchmark

    @property
    def standin(self) -> bool:
        return self.device == "cpu"


@dataclass(frozen=True)
class ProfileConfig:
    """Sizes of every benchmark; `QUICK` runs in well under 2 minutes on 2 CPU cores."""

    mode: str
    reps: int
    gemm_rows: tuple[int, ...]
    gemm_models: tuple[str, ...]
    #: 'up': x[rows, h1] @ W1[h1, h2] (also W3); 'down': x[rows, h2] @ W2[h2, h1]
    gemm_projections: tuple[str, ...]
    gemm_dtypes: tuple[str, ...]
    #: dtypes measured only on the square GEMM, for their peak
    peak_only_dtypes: tuple[str, ...]
    square_gemm_n: int
    hbm_copy_bytes: int
    link_sizes_bytes: tuple[int, ...]
    paged_total_bytes: int
    page_sizes_bytes: tuple[int, ...]
    cpu_gemm_rows: tuple[int, ...]
    cpu_gemm_dim: int
    dram_bytes: int
    attn_batches: tuple[int, ...]
    attn_contexts: tuple[int, ...]
    attn_max_kv_bytes: int
    #: each attention call reads the next of several KV caches holding together at least this
    #: many bytes, so that calls read DRAM as in the executor (whose calls cycle over the
    #: micro-batches and layers), not a last-level cache that one small call's KV fits in
    attn_cold_bytes: int
    #: seconds asleep before each timed attention call: the executor's worker waits between
    #: calls for the next micro-batch's q/k/v, and meanwhile the kernel's OpenMP threads go to
    #: sleep; waking them is part of every call (H200 machine, 2026-12-01, 64 x 136 bf16 calls
    #: on the executor's 10 threads: 18.8 GB/s back to back on one KV cache, 16.8 GB/s rotating
    #: over 1 GiB of caches, 14.8 GB/s with 1 ms between calls, cold or not)
    attn_gap_s: float
    interference_window_s: float
    #: the interference workloads: copy bytes, GEMM rows, attention (batch, context)
    interference_copy_bytes: int
    interference_gemm_rows: int
    interference_attention: tuple[int, int]

    def for_standin(self) -> ProfileConfig:
        """The CPU stands in for the GPU: CPU-sized GEMMs in bf16 and fp32 (no fp16 kernels);
        the interference benchmark's GEMM at 8 rows (a CPU without native bf16 took 5 s for
        one 64-row Mixtral expert GEMM, and the benchmark runs one per window and stage group:
        6 minutes of a 2-core CI machine, 2026-12-02)."""
        return dataclasses.replace(
            self, gemm_rows=tuple(r for r in self.gemm_rows if r <= 512),
            gemm_dtypes=("bf16", "fp32"), peak_only_dtypes=(),
            square_gemm_n=min(self.square_gemm_n, 1024),
            interference_gemm_rows=min(self.interference_gemm_rows, 8))


def _powers(start: int, stop: int, factor: int) -> tuple[int, ...]:
    """start, start * factor, ... up to and including stop."""
    values = [start]
    while values[-1] * factor <= stop:
        values.append(values[-1] * factor)
    return tuple(values)


QUICK = ProfileConfig(
    mode="quick", reps=3, gemm_rows=(1, 8, 64, 512), gemm_models=("mixtral-8x7b",),
    gemm_projections=("up",), gemm_dtypes=("bf16",), peak_only_dtypes=(), square_gemm_n=1024,
    hbm_copy_bytes=64 * MiB, link_sizes_bytes=_powers(4 * KiB, 64 * MiB, 4),
    paged_total_bytes=16 * MiB, page_sizes_bytes=_powers(64 * KiB, 16 * MiB, 4),
    cpu_gemm_rows=(1, 16, 128, 512), cpu_gemm_dim=1024, dram_bytes=128 * MiB,
    attn_batches=(4, 32), attn_contexts=(128, 512), attn_max_kv_bytes=64 * MiB,
    attn_cold_bytes=64 * MiB, attn_gap_s=1e-3, interference_window_s=0.4,
    interference_copy_bytes=8 * MiB, interference_gemm_rows=64, interference_attention=(8, 256))

FULL = ProfileConfig(
    mode="full", reps=10, gemm_rows=_powers(1, 8192, 2), gemm_models=("mixtral-8x7b", "dbrx"),
    gemm_projections=("up", "down"), gemm_dtypes=("bf16", "fp16"), peak_only_dtypes=("fp32",),
    square_gemm_n=8192,
    hbm_copy_bytes=1 * GiB, link_sizes_bytes=_powers(4 * KiB, 1 * GiB, 4),
    paged_total_bytes=256 * MiB, page_sizes_bytes=_powers(64 * KiB, 256 * MiB, 4),
    cpu_gemm_rows=_powers(1, 4096, 4), cpu_gemm_dim=4096, dram_bytes=2 * GiB,
    attn_batches=(1, 8, 32, 128, 512), attn_contexts=(128, 512, 2048, 8192),
    attn_max_kv_bytes=2 * GiB, attn_cold_bytes=1 * GiB, attn_gap_s=1e-3,
    interference_window_s=2.0,
    interference_copy_bytes=64 * MiB, interference_gemm_rows=1024,
    interference_attention=(64, 1024))


# ---- timing ------------------------------------------------------------------------------------
def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], reps: int, device: str, warmup: int = 1,
               gap_s: float = 0.0, queued: bool = False,
               hold_s_per_call: float | None = None, host_clock: bool = False
               ) -> tuple[float, ...]:
    """Seconds per call of `fn()`, `reps` calls after `warmup` untimed ones. Work on the GPU is
    timed with CUDA events on the current stream, work on the CPU with the host clock, each call
    after `gap_s` asleep (untimed).

    `queued` (asynchronous GPU work only): a sleep kernel holds the stream while the host queues
    all the calls, so the events time them back to back on the GPU. Without it a call faster
    than its own dispatch is timed from its start event to its end, dispatch included: a
    16-row expert GEMM of Mixtral-8x7B measured 45-80 us so against about 30 us of HBM-bound
    kernel (H200 machine, 2026-12-02), and the model, which adds launches x t_launch to every
    kernel, counted the dispatch twice. The hold is QUEUE_HOLD_S_PER_CALL per call, or
    `hold_s_per_call` for calls of many operations.

    `host_clock`: the host's side of each call on the host clock (what the launching thread
    spends queuing its work); on CUDA the stream is held as with `queued`, so that no call
    waits for the GPU."""
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        if queued or host_clock:
            _hold_stream_s((hold_s_per_call or QUEUE_HOLD_S_PER_CALL) * reps)
    if device == "cuda" and not host_clock:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return tuple(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(reps):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    _sync(device)   # (the host clock on CUDA: the held stream's work)
    return tuple(times)


#: seconds the stream is held per queued call: well above one call's dispatch (about 10-80 us)
QUEUE_HOLD_S_PER_CALL = 1e-3


@functools.cache
def _sleep_cycles_per_s() -> float:
    """Clock cycles per second of torch.cuda._sleep, timed once with CUDA events."""
    import torch

    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # warm-up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def _hold_stream_s(seconds: float) -> None:
    """Queue a kernel that keeps the current stream busy for about `seconds`."""
    import torch

    torch.cuda._sleep(int(seconds * _sleep_cycles_per_s()))


def random_tensor(shape: tuple[int, ...], dtype: str, device: str) -> Any:
    """A tensor of uniform values in [-0.5, 0.5) (never zeros: zeros can run faster). On the
    CPU one random tile of 1 Mi elements is repeated (torch.rand writes only ~0.2 GB/s there)."""
    import torch

    out = torch.empty(shape, dtype=_torch_dtype(dtype), device=device)
    flat = out.view(-1)
    if device == "cuda":
        return flat.uniform_(-0.5, 0.5).view(shape)
    tile = (torch.rand(min(flat.numel(), 1 << 20)) - 0.5).to(out.dtype)
    whole = flat.numel() // tile.numel() * tile.numel()
    flat[:whole].view(-1, tile.numel()).copy_(tile)
    flat[whole:].copy_(tile[:flat.numel() - whole])
    return out


def _reps_for_bytes(nbytes: int, budget_bytes: int, max_reps: int) -> int:
    """Repetitions of a copy of `nbytes`: enough to move `budget_bytes`, between 3 and max."""
    return max(3, min(max_reps, budget_bytes // max(nbytes, 1)))


# ---- GPU tier (or its CPU stand-in) ------------------------------------------------------------
def expert_shape(spec: ModelSpec, projection: str) -> tuple[int, int]:
    """(k, n) of one expert GEMM x[rows, k] @ W[k, n]: 'up' = h1 -> h2 (w1, w3), 'down' = h2
    -> h1 (w2)."""
    h1, h2 = spec.hidden_size, spec.expert_intermediate_size
    return (h1, h2) if projection == "up" else (h2, h1)


#: a CPU GEMM call slower than this (median, seconds) ends its series: larger rows are only
#: slower. CPUs without native bf16 emulate it: 1.4 GFLOP/s on a Zen 1 EPYC (2-core CI kind,
#: 2026-12-02), where the stand-in's 512-row Mixtral expert GEMM took 43 s a call
CPU_GEMM_CALL_LIMIT_S = 0.5


def gemm_series(bench: str, k: int, n: int, rows: Iterable[int], dtype: str, device: str,
                reps: int, tags: dict[str, Any]) -> list[Measurement]:
    """Achieved FLOP/s of x[rows, k] @ W[k, n] (2 rows k n FLOPs) for each rows (ascending); on
    the CPU up to the first call slower than CPU_GEMM_CALL_LIMIT_S (two sizes at least)."""
    import torch

    weight = random_tensor((k, n), dtype, device)
    out = []
    for m in sorted(rows):
        x = random_tensor((m, k), dtype, device)
        times = time_calls(lambda x=x: torch.matmul(x, weight), reps, device, queued=True)
        out.append(Measurement(bench, {**tags, "rows": m, "k": k, "n": n, "dtype": dtype},
                               x=m, work=2.0 * m * k * n, unit="FLOP/s", times_s=times))
        if device == "cpu" and len(out) >= 2 and out[-1].median_s > CPU_GEMM_CALL_LIMIT_S:
            break   # (a curve needs two sizes)
    return out


#: decode micro-batch sizes of `grouped_experts_series`
GROUPED_EXPERT_MICRO_BATCHES = (1, 4, 16, 48, 128, 512)
#: seconds the stream is held per queued grouped-experts call: its 30-odd operations took
#: about 1.1 ms to dispatch on the H200 machine (2026-12-02b), more than QUEUE_HOLD_S_PER_CALL
GROUPED_EXPERTS_HOLD_S_PER_CALL = 5e-3


def grouped_experts_series(spec: ModelSpec, micro_batches: Iterable[int], device: str,
                           reps: int, seed: int = 0) -> list[Measurement]:
    """Achieved FLOP/s of a decode micro-batch's routed experts as the executor runs them with
    expert_kernel='grouped' (executor.layers.routed_experts_grouped over ExpertStore.stacked's
    strided views: the (token, slot) pairs sorted by expert, one grouped GEMM pair over all n_e
    experts, gates and scatter-add), queued back to back so that the kernels are timed, not
    their dispatch; one layer of `spec`'s experts, bf16, uniformly random top-k routing
    (seeded). x = rows per touched expert, work = 2 pairs expert_params FLOPs (the expert FFN
    operator of hrm.roofline, which takes its time from this curve: GROUPED_EXPERTS_CURVE).
    Measured because the grouped kernel is not the dense GEMM: on the H200 machine
    (2026-12-02b, benchmarks/diag_grouped_experts.py) one micro-batch of 16 took 1.17 ms
    queued, against the 0.66 ms its weight bytes need at the HBM rate; its dispatch took
    1.14 ms, more than that run's 1 ms hold per call, so part of it may be dispatch (the hold
    here is GROUPED_EXPERTS_HOLD_S_PER_CALL)."""
    import torch

    from executor.layers import routed_experts_grouped
    from executor.weights import ExpertStore

    e, k, h1 = spec.num_experts, spec.top_k, spec.hidden_size
    flat = random_tensor((e * spec.expert_params(),), "bf16", device)
    w13t, w2t = ExpertStore.one_resident_layer(spec, flat).stacked(0, 0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for mu in sorted(micro_batches):
        h = random_tensor((mu, h1), "bf16", device)
        experts = torch.rand(mu, e, generator=generator).topk(k, dim=-1).indices.to(device)
        weights = torch.full((mu, k), 1.0 / k, device=device)
        touched = int(experts.unique().numel())
        times = time_calls(lambda h=h, x=experts, g=weights: routed_experts_grouped(
            h, x, g, w13t, w2t), reps, device, queued=True,
            hold_s_per_call=GROUPED_EXPERTS_HOLD_S_PER_CALL)
        out.append(Measurement(
            "gpu_grouped_experts", {"model": spec.name, "micro_batch": mu, "experts": e,
                                    "top_k": k, "touched": touched, "dtype": "bf16",
                                    "routing": "uniform random top-k"},
            x=mu * k / touched, work=2.0 * mu * k * spec.expert_params(), unit="FLOP/s",
            times_s=times))
    return out


#: decode micro-batch sizes of `launch_blocks`
LAUNCH_BLOCK_MICRO_BATCHES = (16, 64)
#: calls of a launch block queued per burst behind one sleep kernel (about 35 kernels each, far
#: below the launch queue's depth, so that no launch waits for a free slot), and the bursts
LAUNCH_BLOCK_CALLS_PER_BURST = 8
LAUNCH_BLOCK_BURSTS = 4


def launch_block_times(fn: Callable[[], Any], bursts: int, device: str) -> tuple[float, ...]:
    """Host seconds of `bursts` x LAUNCH_BLOCK_CALLS_PER_BURST calls of a launch block, each
    burst behind one sleep kernel (`time_calls(host_clock=True)`)."""
    return tuple(t for _ in range(bursts) for t in time_calls(
        fn, LAUNCH_BLOCK_CALLS_PER_BURST, device,
        hold_s_per_call=GROUPED_EXPERTS_HOLD_S_PER_CALL, host_clock=True))


def dispatched_ops(fn: Callable[[], Any]) -> int:
    """aten operations `fn()` dispatches (views and casts included), as
    tests/test_roofline.py::test_op_counts_match_the_executor counts hrm.roofline OPS_*."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return count.n


#: each `launch_blocks` block's operations as the cost model counts them (hrm.roofline OPS_*)
LAUNCH_BLOCK_OPS = {ATTENTION_IN_BLOCK: OPS_ATTENTION_IN,
                    POST_GROUPED_BLOCK: OPS_ATTENTION_OUT + OPS_MOE_GROUPED,
                    GPU_ATTENTION_BLOCK: OPS_GPU_DECODE_ATTENTION}
#: cached tokens per sequence of `launch_blocks`' GPU decode attention (its K/V copy's length)
LAUNCH_BLOCK_CONTEXT = 256


def launch_blocks(spec: ModelSpec, micro_batches: Iterable[int], device: str,
                  bursts: int = LAUNCH_BLOCK_BURSTS, seed: int = 0) -> list[Measurement]:
    """The launching thread's seconds per operation of the executor's decode blocks, by its own
    layer code at `spec`'s shapes (one layer, random bf16 weights, uniformly random routing):
    'attention_in' (executor.layers.attention_in: RMSNorm, fused QKV, RoPE), 'post_grouped'
    (attention_out, then moe_ffn with the routed experts as one grouped GEMM pair over
    ExpertStore.stacked's views) and 'gpu_attention' (decode attention on the GPU as the engine
    runs it over K/V gathered from a CPU cache: q/k/v split out, attend_with_new_token over
    LAUNCH_BLOCK_CONTEXT cached tokens at the micro-batch's positions; the gather and its DMA are
    timed apart, kv_gather). Each call is timed on the host clock while a sleep kernel holds the
    stream (`launch_block_times`); work = the block's operations as the cost model counts them
    (LAUNCH_BLOCK_OPS), so that its launches x the seconds per operation are the block's
    measured time; the operations it dispatched here are recorded beside them
    (`dispatched_ops`: on the CPU the same but for SDPA on one sequence). The cost model times
    those blocks' launches by them (gpu.attention_in_op_s, post_grouped_op_s, gpu_attention_op_s)
    instead of by op_overhead's 1-element add_: on the H200 machine (2026-12-04) that measured
    9 us per operation, while in the pipeline's trace the two CPU-attention blocks took about
    28 and 55 us per operation. CUDA only in `benchmark_plan`: on the CPU a call's time is its
    compute."""
    import torch

    import executor.layers as L
    from executor.weights import ExpertStore

    e, h1, d = spec.num_experts, spec.hidden_size, spec.head_dim
    qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * d

    def weight(*shape: int) -> Any:
        return random_tensor(shape, "bf16", device) * 0.05

    # no shared experts: their launches are timed by op_overhead_s (hrm.roofline)
    layer = L.DenseLayer(
        input_norm=weight(h1) + 1.0, post_norm=weight(h1) + 1.0, wqkv=weight(qkv_out, h1),
        wo=weight(h1, spec.num_heads * d), router=weight(e, h1),
        bqkv=weight(qkv_out) if spec.attention_bias else None)
    stacked = ExpertStore.one_resident_layer(
        spec, random_tensor((e * spec.expert_params(),), "bf16", device)).stacked(0, 0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    table = L.rope_tables(spec, 4096, device, torch.bfloat16)
    out = []
    for mu in sorted(micro_batches):
        x = weight(mu, h1) * 20.0
        attn = weight(mu, spec.num_heads * d) * 20.0
        rope = L.rope_at(table, torch.randint(0, 4096, (mu,), generator=generator).to(device))
        qkv = L.attention_in(x, layer, spec, rope)
        kc, vc = (weight(mu, spec.num_kv_heads, LAUNCH_BLOCK_CONTEXT + 1, d) for _ in range(2))
        at = torch.tensor([LAUNCH_BLOCK_CONTEXT - i % 64 for i in range(mu)], device=device)

        def gpu_attention(qkv: Any = qkv, kc: Any = kc, vc: Any = vc, at: Any = at) -> Any:
            q, k, v = L.split_qkv(qkv, spec)
            return L.attend_with_new_token(q, k, v, kc, vc, at)

        blocks = {
            ATTENTION_IN_BLOCK: lambda x=x, rope=rope: L.attention_in(x, layer, spec, rope),
            POST_GROUPED_BLOCK: lambda x=x, attn=attn: L.moe_ffn(
                L.attention_out(x, attn, layer), layer, spec, lambda _: None, True,
                stacked=stacked),
            GPU_ATTENTION_BLOCK: gpu_attention,
        }
        for block, fn in blocks.items():
            times = launch_block_times(fn, bursts, device)
            out.append(Measurement("launch_block", {
                "block": block, "micro_batch": mu, "ops": LAUNCH_BLOCK_OPS[block],
                "dispatched_ops": dispatched_ops(fn), "model": spec.name, "dtype": "bf16"},
                x=mu, work=float(LAUNCH_BLOCK_OPS[block]), unit="op/s", times_s=tuple(times)))
    return out


def hbm_copy(nbytes: int, device: str, reps: int) -> Measurement:
    """Device-memory bandwidth: a device-to-device copy, bytes read + bytes written."""
    src = random_tensor((nbytes // 4,), "fp32", device)
    dst = src.clone()
    times = time_calls(lambda: dst.copy_(src), reps, device, queued=True)
    return Measurement("hbm_copy", {"bytes": nbytes}, x=nbytes, work=2.0 * nbytes, unit="B/s",
                       times_s=times)


#: tiny ops launched back to back per timed burst of `op_overhead`
OPS_PER_BURST = 100


def op_overhead(device: str, reps: int) -> Measurement:
    """Host time per tiny op in a burst of OPS_PER_BURST ops launched from Python and waited for
    once: the executor queues its ops and rarely waits, so a launch costs the dispatch, not a
    round trip (with one sync per op it measured 22 us on the H200 machine on 2026-11-30)."""
    x = random_tensor((1,), "fp32", device)

    def burst() -> None:
        for _ in range(OPS_PER_BURST):
            x.add_(1.0)
        _sync(device)

    times = time_calls(burst, reps, "cpu", warmup=2)
    return Measurement("op_overhead", {"elements": 1, "ops": OPS_PER_BURST}, x=1,
                       work=float(OPS_PER_BURST), unit="op/s", times_s=times)


#: micro-batch size of `attention_handoff` (the validation grid's), micro-batches per rep, and
#: the tiny ops launched (untimed) between two hand-offs: the rest of a decode micro-batch's
#: layer on the launching thread (QKV, O projection, routing and 8 experts: about 200 ops,
#: hrm.roofline OPS_*), during which the worker attends
HANDOFF_MICRO_BATCH = 64
HANDOFF_ITEMS = 32
HANDOFF_FILLER_OPS = 200


def attention_handoff(spec: ModelSpec, device: str, reps: int,
                      micro_batch_size: int = HANDOFF_MICRO_BATCH) -> Measurement:
    """Launching-thread seconds per micro-batch of the CPU attention hand-off, by the executor's
    own code (executor.schedule.AttentionLink, CPUWorker, its tracer and switch interval): q/k/v
    concatenated and sent down, the worker submitted, the previous micro-batch's output (which
    the worker produced meanwhile) taken and brought up by the alias kernel, then a wait for the
    compute stream, as the routing's per-expert row counts make one per micro-batch in the
    executor (so the alias kernel's read over PCIe counts). Between two hand-offs the launching
    thread launches HANDOFF_FILLER_OPS tiny ops, untimed, while the worker runs. The worker's
    attention is a small CPU op here: its own time is the 'cpu_attention' curve's. The model
    puts this time on the GPU stage once per micro-batch and layer (hrm.roofline
    HANDOFF_OP)."""
    import torch

    from executor.schedule import (
        AttentionLink,
        CPUWorker,
        Streams,
        host_wait,
        pipeline_switch_interval,
    )
    from executor.trace import Tracer

    dev = torch.device(device)
    q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    q, k, v = (random_tensor((micro_batch_size, w), "bf16", device)
               for w in (q_width, kv_width, kv_width))
    filler = random_tensor((1,), "fp32", device)
    streams, tracer = Streams(dev), Tracer(dev)
    link = AttentionLink(2, micro_batch_size, q_width + 2 * kv_width, q_width, torch.bfloat16,
                         torch.bfloat16, streams, dev)

    def attend(m: int, host: Any, ready: Any) -> Any:
        host_wait(ready)
        return link.finish(m, host[:, :q_width] * 1)

    worker, pending, times = CPUWorker(), None, []
    try:
        with pipeline_switch_interval(), torch.inference_mode():
            for i in range(1 + reps * HANDOFF_ITEMS):
                for _ in range(HANDOFF_FILLER_OPS):
                    filler.add_(1.0)
                start = time.perf_counter()
                qkv = torch.cat((q, k, v), dim=1)
                host, ready = link.send(i % 2, qkv, tracer, 0)
                sent = worker.submit(attend, i % 2, host, ready)
                if pending is not None:
                    link.receive((i - 1) % 2, pending.result(), tracer, 0)
                    if device == "cuda":
                        torch.cuda.current_stream().synchronize()
                    times.append(time.perf_counter() - start)
                pending = sent
            pending.result()
    finally:
        worker.close()
    return Measurement("attention_handoff", {"micro_batch": micro_batch_size,
                                             "qkv_width": q_width + 2 * kv_width,
                                             "filler_ops": HANDOFF_FILLER_OPS},
                       x=micro_batch_size, work=1.0, unit="handoff/s", times_s=tuple(times))


# ---- link ----------------------------------------------------------------------------------------
def _host_buffer(nbytes: int, pinned: bool) -> Any:
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    buf.fill_(1)  # touch every page before timing
    return buf


def copy_series(direction: str, pinned: bool, sizes: Iterable[int], device: str,
                budget_bytes: int) -> list[Measurement]:
    """Bytes/s of one copy of each size. direction 'h2d' or 'd2h' over PCIe from a pinned or
    pageable host buffer; with the CPU stand-in ('cpu') a memcpy between two host buffers."""
    import torch

    sizes = list(sizes)
    host = _host_buffer(max(sizes), pinned)
    other = (torch.empty_like(host, device="cuda") if device == "cuda" else
             _host_buffer(max(sizes), False))
    src, dst = (host, other) if direction in ("h2d", "cpu") else (other, host)
    out = []
    for size in sizes:
        times = time_calls(lambda s=size: dst[:s].copy_(src[:s], non_blocking=pinned),
                           _reps_for_bytes(size, budget_bytes, 50), device, queued=pinned)
        out.append(Measurement("copy", {"direction": direction, "pinned": pinned,
                                        "bytes": size}, x=size, work=size, unit="B/s",
                               times_s=times))
    return out


def paged_copy_series(total_bytes: int, page_sizes: Iterable[int], device: str, reps: int
                      ) -> list[Measurement]:
    """Bytes/s of moving `total_bytes` host -> device as back-to-back pages of each size
    (pinned, asynchronous, one stream): the cost of many small copies vs one large one."""
    import torch

    pinned = device == "cuda"
    host = _host_buffer(total_bytes, pinned)
    dev = torch.empty_like(host, device=device)
    out = []
    for page in page_sizes:
        def move(page: int = page) -> None:
            for offset in range(0, total_bytes, page):
                dev[offset:offset + page].copy_(host[offset:offset + page], non_blocking=pinned)

        out.append(Measurement("h2d_paged", {"page_bytes": page, "total_bytes": total_bytes},
                               x=page, work=total_bytes, unit="B/s",
                               times_s=time_calls(move, reps, device)))
    return out


#: page size of the staging-copy benchmark (the executor's default weight page)
STAGING_PAGE_BYTES = 16 * MiB
#: the staging copy's stage in the interference benchmark
STAGING_STAGE = "staging_copy"


@contextlib.contextmanager
def staging_copy_op(nbytes: int, pinned: bool = True
                    ) -> Iterator[tuple[Callable[[], None], int]]:
    """(op, slot bytes): op() copies `nbytes` pageable bytes as the executor's copy thread
    does (executor.schedule.WeightLink): in chunks of STAGING_SLOT_PAGES pages, each split over
    COPY_THREADS memmove threads (executor.schedule.memmove_jobs), STAGE_AHEAD chunks at once,
    into a ring of STAGING_RING_SLOTS slots (`pinned` on CUDA), which stays in the last-level
    cache."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from executor.schedule import COPY_THREADS, STAGE_AHEAD, memmove_jobs
    from hrm.cost import STAGING_RING_SLOTS, STAGING_SLOT_PAGES

    slot = min(STAGING_SLOT_PAGES * STAGING_PAGE_BYTES, nbytes)
    src, ring = _host_buffer(nbytes, False), _host_buffer(STAGING_RING_SLOTS * slot, pinned)
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        def copy() -> None:
            chunks: deque[list[Any]] = deque()
            for i, start in enumerate(range(0, nbytes, slot)):
                if len(chunks) == STAGE_AHEAD:
                    for job in chunks.popleft():
                        job.result()
                end, at = min(start + slot, nbytes), (i % STAGING_RING_SLOTS) * slot
                chunks.append(memmove_jobs(ring[at:at + end - start], src[start:end], pool,
                                           COPY_THREADS))
            for jobs in chunks:
                for job in jobs:
                    job.result()

        yield copy, slot


def staging_copy(nbytes: int, reps: int) -> Measurement:
    """Pageable -> pinned host memcpy as the executor's copy thread does it (`staging_copy_op`).
    The staging copy feeds the H2D transfers of weights that cannot all be pinned. Bytes copied
    per second. (Until 2026-11-30 this timed torch's copy_ on all threads: 41.9 GB/s on the H200
    host, while the executor's copy thread moved about 20 GB/s; until 2026-12-01 it copied into
    one pinned buffer as large as the source: 11.4 GB/s on the H200 host, while the executor's
    copy thread moved 18.4 GB/s; until 2026-12-03 page by page, one page at a time.) Beside the
    pipeline's other stages it is slower again: the interference benchmark's staging_copy stage
    (interference.staging_copy and staging_copy_link)."""
    from executor.schedule import COPY_THREADS, STAGE_AHEAD
    from hrm.cost import STAGING_RING_SLOTS

    with staging_copy_op(nbytes) as (copy, slot):
        times = time_calls(copy, reps, "cpu")
    return Measurement("pageable_to_pinned", {"bytes": nbytes, "slot_bytes": slot,
                                              "threads": COPY_THREADS, "ahead": STAGE_AHEAD,
                                              "ring_slots": STAGING_RING_SLOTS,
                                              "copy": "executor.schedule.memmove_jobs"},
                       x=nbytes, work=nbytes, unit="B/s", times_s=times)


def probe_pinned_max(bound_bytes: int, chunk_bytes: int = 4 * GiB, time_limit_s: float = 90.0
                     ) -> Measurement:
    """Pin host memory chunk by chunk until an allocation fails, `bound_bytes` is reached or
    the time runs out; then free it all. x = bytes pinned at once; params.outcome says which
    limit stopped the probe ('failed' means x is the largest total that could be pinned)."""
    import gc

    import torch

    def release_cached_pinned_blocks() -> None:
        """Free pinned blocks that torch's caching host allocator keeps after their tensors
        die (the public call since torch 2.9 or so, else the private one)."""
        gc.collect()
        accel_memory = getattr(getattr(torch, "accelerator", None), "memory", None)
        empty = getattr(accel_memory, "empty_host_cache", None) or \
            getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()

    release_cached_pinned_blocks()
    chunks, outcome = [], "bound"
    t0 = time.perf_counter()
    try:
        while (len(chunks) + 1) * chunk_bytes <= bound_bytes:
            if time.perf_counter() - t0 > time_limit_s:
                outcome = "time_limit"
                break
            try:
                chunks.append(torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True))
            except RuntimeError:
                outcome = "failed"
                break
    finally:
        elapsed_s = time.perf_counter() - t0
        pinned_bytes = len(chunks) * chunk_bytes
        chunks.clear()
        release_cached_pinned_blocks()
    return Measurement("pin_probe", {"chunk_bytes": chunk_bytes, "bound_bytes": bound_bytes,
                                     "outcome": outcome}, x=pinned_bytes,
                       work=max(pinned_bytes, 1), unit="B/s", times_s=(elapsed_s,))


# ---- CPU tier ------------------------------------------------------------------------------------
def dram_read(nbytes: int, dtype: str, reps: int) -> Measurement:
    """DRAM read bandwidth: torch sum over `nbytes` of `dtype` on the CPU threads."""
    x = random_tensor((int(nbytes // dtype_bytes(dtype)),), dtype, "cpu")
    times = time_calls(lambda: x.sum(), reps, "cpu")
    return Measurement("dram_read", {"bytes": nbytes, "dtype": dtype}, x=nbytes, work=nbytes,
                       unit="B/s", times_s=times)


def executor_attention_threads(cores: int) -> int:
    """torch threads of the executor's CPU attention worker on a machine with `cores`."""
    from executor.schedule import compute_threads

    return compute_threads(cores)


def ragged_context_lens(batch: int, context: int) -> list[int]:
    """Non-increasing context lengths of a decode micro-batch whose longest sequence holds
    `context` tokens: spread evenly over [context / 2, context] (sequences of one batch started
    with different prompt lengths), as the executor sees them."""
    return [max(1, context - (context // 2) * i // max(1, batch - 1)) for i in range(batch)]


#: at most this many KV caches rotate under one attention benchmark (tiny calls' cold set)
MAX_COLD_COPIES = 128


def _cold_kv_caches(spec: ModelSpec, lens: list[int], dtype: str, cold_bytes: float
                    ) -> tuple[list[Any], float]:
    """One-layer CPU KV caches (executor.kv_cache.KVCache) holding `lens` tokens, as many as
    together hold `cold_bytes` (at most MAX_COLD_COPIES; one for 0), the same random values in
    each; and the KV bytes of one: 2 Hkv D bytes_per_element sum_b len_b."""
    import torch

    try:
        from executor.kv_cache import KVCache
    except ImportError as exc:
        raise ProfileError(f"cannot import the executor's KV cache ({exc}); run from the "
                           "repository root or install the package") from None
    kv_bytes = 2.0 * spec.num_kv_heads * spec.head_dim * dtype_bytes(dtype) * sum(lens)
    one_layer = dataclasses.replace(spec, num_layers=1)
    caches = [KVCache.allocate(one_layer, lens, _torch_dtype(dtype), torch.device("cpu"),
                               float("inf"), "CPU")
              for _ in range(min(MAX_COLD_COPIES, max(1, math.ceil(cold_bytes / kv_bytes))))]
    first = caches[0].k[0] + caches[0].v[0]
    for blocks in first:
        blocks.normal_()
    for cache in caches[1:]:   # the same values in other memory: copying beats sampling
        for blocks, source in zip(cache.k[0] + cache.v[0], first, strict=True):
            blocks.copy_(source)
    return caches, kv_bytes


#: the decode shape of `kv_gather`: sequences x context (the validation grid's)
KV_GATHER_CALL = (64, 136)


def kv_gather(spec: ModelSpec, reps: int, threads: int, cold_bytes: float,
              call: tuple[int, int] = KV_GATHER_CALL, device: str = "cuda") -> Measurement:
    """Bytes/s of the launching thread's gather of a CPU KV cache for GPU decode attention
    (executor.kv_cache.KVCache.gather_host: the blocks copied into dense pinned tensors), on
    `threads` torch threads (the executor's, executor.schedule.compute_threads), the KV read
    from DRAM (`cold_bytes` of caches in rotation). As in the executor, each gather's two
    tensors then cross to the GPU (a DMA each, on a side stream, waited for before the next
    gather); only the gather is timed, the DMA the model times on the link. The contexts are of
    one length, as a batch of equal prompts; the bytes are those copied, whole blocks
    (hrm.roofline.whole_block_tokens). The model's 'kv_gather' term.

    Timed with the DMA after each gather (benchmarks/diag_kv_gather.py), the gather took 2.20 ms
    alone and 2.30 ms in the pipeline (H200 machine, 2026-12-02d call 1). Timed without it
    (2026-12-02d to 2026-12-02e), the profile measured 28-51 GB/s copied while the pipeline's
    gathers ran at 22.5 GB/s (the trace of 2026-12-02e call 3, profiled at 41.2). On the CPU
    stand-in (`device` cpu) nothing is pinned and nothing crosses."""
    import torch

    batch, context = call
    lens = [context] * batch
    caches, _ = _cold_kv_caches(spec, lens, "bf16", cold_bytes)
    copied_bytes = 2.0 * spec.num_kv_heads * spec.head_dim * dtype_bytes("bf16") * batch * \
        whole_block_tokens(context)
    turn = itertools.cycle(caches)
    stream = torch.cuda.Stream() if device == "cuda" else None

    def gather_then_dma() -> float:
        start = time.perf_counter()
        k, v = next(turn).gather_host(0, slice(0, batch), context, pinned=stream is not None)
        gathered = time.perf_counter()
        if stream is not None:
            with torch.cuda.stream(stream):
                for host in (k, v):
                    host.to(device, non_blocking=True)
            stream.synchronize()
        return gathered - start

    with torch_threads(threads):
        for _ in range(2):
            gather_then_dma()
        times = tuple(gather_then_dma() for _ in range(reps))
    return Measurement("kv_gather", {"batch": batch, "context": context, "dtype": "bf16",
                                     "threads": threads, "contexts": "uniform",
                                     "counted": "bytes copied (whole blocks)",
                                     "dma": "after each gather, waited for"},
                       x=copied_bytes, work=copied_bytes, unit="B/s", times_s=times)


def decode_attention_call(spec: ModelSpec, batch: int, context: int, dtype: str,
                          cold_bytes: float = 0.0) -> tuple[Callable[[], Any], float]:
    """What the executor's CPU worker does per micro-batch and layer (executor/engine.py): append
    one token's K/V per sequence to the block KV cache, then grouped-query attention over the
    ragged contexts (KVCache.attend: executor.kernels.cpu_decode_attention_paged). Successive
    calls go to the next of ceil(cold_bytes / KV bytes) caches (at most MAX_COLD_COPIES; one for
    cold_bytes = 0), so that a call finds its KV in DRAM, as in the executor, where the
    calls between two on one micro-batch's KV read the other micro-batches' and layers'.
    Returns the call and the KV bytes it reads: 2 Hkv D bytes_per_element sum_b len_b."""
    lens = ragged_context_lens(batch, context)
    caches, kv_bytes = _cold_kv_caches(spec, lens, dtype, cold_bytes)
    q = random_tensor((batch, spec.num_heads, spec.head_dim), dtype, "cpu")
    k_new = random_tensor((batch, spec.num_kv_heads, spec.head_dim), dtype, "cpu")
    slots, positions = slice(0, batch), [n - 1 for n in lens]
    turn = itertools.cycle(caches)

    def call() -> Any:
        cache = next(turn)
        cache.append(0, slots, positions, k_new, k_new)
        return cache.attend(0, slots, q, lens)

    return call, kv_bytes


def cpu_attention_series(spec: ModelSpec, batches: Iterable[int], contexts: Iterable[int],
                         dtype: str, max_kv_bytes: int, reps: int, threads: int,
                         cold_bytes: float, gap_s: float) -> list[Measurement]:
    """KV bytes/s of the executor's CPU decode attention per call (`decode_attention_call`:
    KV append + ragged paged kernel, the model's head layout, KV read from DRAM: `cold_bytes`;
    `gap_s` idle before each call) for each batch x context whose KV fits in `max_kv_bytes`, on
    `threads` torch threads (the executor's worker runs it on the cores left after its
    GPU-driving, link and copy threads: executor.schedule.compute_threads)."""
    with torch_threads(threads):
        return _attention_measurements(spec, batches, contexts, dtype, max_kv_bytes, reps,
                                       threads, cold_bytes, gap_s)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the enclosed benchmark."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _attention_measurements(spec: ModelSpec, batches: Iterable[int], contexts: Iterable[int],
                            dtype: str, max_kv_bytes: int, reps: int, threads: int,
                            cold_bytes: float, gap_s: float) -> list[Measurement]:
    from executor.kernels import paged_kernel_name

    out = []
    for batch in batches:
        for context in contexts:
            if 2.0 * batch * spec.num_kv_heads * context * spec.head_dim * \
                    dtype_bytes(dtype) > max_kv_bytes:
                continue
            call, kv_bytes = decode_attention_call(spec, batch, context, dtype, cold_bytes)
            times = time_calls(call, reps, "cpu", gap_s=gap_s)
            out.append(Measurement(
                "cpu_attention", {"batch": batch, "context": context, "dtype": dtype,
                                  "ragged": "lengths context/2..context",
                                  "kernel": f"paged-{paged_kernel_name()}",
                                  "q_heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                                  "head_dim": spec.head_dim, "threads": threads,
                                  "cold_bytes": cold_bytes, "gap_s": gap_s},
                x=kv_bytes, work=kv_bytes, unit="B/s", times_s=times))
    return out


# ---- overlap interference ------------------------------------------------------------------------
@dataclass
class HostClock:
    """Host seconds and operations a stage's thread spent launching (the GPU stage's small
    kernels), accumulated over a run of the interference benchmark."""

    seconds: float = 0.0
    ops: int = 0

    def reset(self) -> None:
        self.seconds, self.ops = 0.0, 0


@dataclass(frozen=True)
class Stage:
    """A unit of repeatable work for the interference benchmark: `op()` does `work` and returns
    only once it is complete (device work synchronized); `launches` (the GPU stage's) counts the
    host time of its kernel launches."""

    name: str
    op: Callable[[], Any]
    work: float
    unit: str
    launches: HostClock | None = None


def _run_concurrently(stages: list[Stage], window_s: float) -> dict[str, tuple[int, float]]:
    """Run every stage's op in a loop in its own thread for `window_s`; (ops done, seconds from
    the common start to the end of the last op) per stage."""
    barrier, stop = threading.Barrier(len(stages) + 1), threading.Event()
    done: dict[str, tuple[int, float]] = {}

    def loop(stage: Stage) -> None:
        stage.op()  # warm-up
        if stage.launches is not None:
            stage.launches.reset()
        barrier.wait()
        t0, count = time.perf_counter(), 0
        while not stop.is_set():
            stage.op()
            count += 1
        done[stage.name] = (count, time.perf_counter() - t0)

    workers = [threading.Thread(target=loop, args=(s,), daemon=True) for s in stages]
    for worker in workers:
        worker.start()
    barrier.wait()
    time.sleep(window_s)
    stop.set()
    for worker in workers:
        worker.join()
    return done


def interference(stages: list[Stage], window_s: float,
                 pairs: Iterable[tuple[str, str]] = (), beside: Stage | None = None
                 ) -> list[Measurement]:
    """Each stage alone, then all together, each for `window_s`: one Measurement per stage and
    mode whose rate is work done / time. Slowdown of a stage = solo rate / together rate. A
    stage that times its launches (`Stage.launches`) also gives an 'interference_launch'
    Measurement per mode: launches per host second. Each of `pairs` (stage names) also runs on
    its own, mode 'a+b' (benchmarks/diag_interference.py: which stage slows which). `beside`, a
    stage that runs only in some schedules (the staging copy), runs alone and beside all of
    `stages` (mode 'beside'), and is not part of 'together'."""
    out = []
    by_name = {s.name: s for s in [*stages, *([beside] if beside else [])]}
    runs = ([("solo", [s]) for s in by_name.values()] + [("together", stages)]
            + ([("beside", [*stages, beside])] if beside else [])
            + [(f"{a}+{b}", [by_name[a], by_name[b]]) for a, b in pairs])
    for mode, group in runs:
        for name, (count, elapsed_s) in _run_concurrently(group, window_s).items():
            stage = next(s for s in group if s.name == name)
            out.append(Measurement("interference", {"stage": name, "mode": mode, "ops": count},
                                   x=stage.work, work=count * stage.work, unit=stage.unit,
                                   times_s=(elapsed_s,)))
            clock = stage.launches
            if clock is not None and clock.ops:
                out.append(Measurement("interference_launch",
                                       {"stage": name, "mode": mode, "ops": clock.ops}, x=1,
                                       work=float(clock.ops), unit="op/s",
                                       times_s=(clock.seconds,)))
    return out


#: the executor run that calibrates the pipeline's GPU stage (`pipeline_calibration`): the first
#: layers of a model, every expert streamed from pinned memory, CPU decode attention, the
#: per-expert loop, N sequences in micro-batches of mu, prompt and generated tokens. Not a point
#: of hrm validate's grid (4 layers, 128-token prompts, 16 tokens; its nearest are n_ub=16,
#: N=256 in 16 micro-batches of 16, and N=512 in 8 of 64). Micro-batches of 16 were chosen on
#: the grids of 2026-12-02, where they predicted the launch-bound configurations of each lease
#: best (benchmarks/results/h200_2026-12-02c/README.md). 16 of them (N=256) were bound by the
#: link on the lease of 2026-12-02f (51.2 ms a layer, the link busy 95%; the factor 1.47 then
#: only an upper bound, and the launch-bound configurations came out 19-20% slow): 32 of them
#: queue about twice the GPU stage's work on the same weights. Later grids are its test
CALIBRATION = {"model": "mixtral-8x7b", "layers": 2, "batch_size": 512, "micro_batch_size": 16,
               "prompt_len": 96, "gen_len": 8, "pinned_share": 1.0}
#: the same run with only this share of the expert bytes pinned, the rest staged by the copy
#: thread (about what the H200 host pins of Mixtral-8x7B: 58 of 90 GB):
#: interference.pipeline_staged, the GPU stage's factor for policies that stage weights
CALIBRATION_STAGED = {**CALIBRATION, "pinned_share": 0.6}
#: runs of the calibration, each warmed up, whose median layer sets interference.pipeline: one
#: run's factor moved 1.41-2.04x between grids of one lease (H200 machine, 2026-12-02d)
CALIBRATION_RUNS = 3


def calibration_case(calibration: dict[str, Any]) -> tuple[Any, Any]:
    """(Policy, Workload) of a CALIBRATION-shaped run: what `pipeline_calibration` runs and
    `_with_pipeline_factor` predicts."""
    from hrm.policy import Policy
    from hrm.workload import Workload

    c = calibration
    policy = Policy(batch_size=c["batch_size"], micro_batch_size=c["micro_batch_size"],
                    attn_decode_device="cpu", schedule="cgopipe", expert_kernel="loop")
    return policy, Workload(c["batch_size"], c["prompt_len"], c["gen_len"])


def pipeline_calibration(device: str, calibration: dict[str, Any] = CALIBRATION,
                         runs: int = CALIBRATION_RUNS) -> Measurement:
    """The executor's own CGOPipe decode on `calibration` (random bf16 weights at the model's
    shapes, as hrm validate runs it: hrm.validate.measure, warmed up), `runs` times on one
    loaded model whose expert bytes are pinned up to its pinned_share: seconds per decode layer
    of each run, with the busy time of its GPU, link, copy-thread and CPU-attention tracks in
    the median run. build_profile divides the median layer by the model's solo GPU stage
    (hrm.cost.gpu_stage_solo_s) for interference.pipeline (pipeline_staged where part of the
    weights was staged)."""
    import tempfile

    import torch

    from executor.cli import _truncated_config
    from hrm.validate import Config, SharedModel, measure

    c = calibration
    policy, workload = calibration_case(c)
    with tempfile.TemporaryDirectory() as tmp:
        model = _truncated_config(c["model"], c["layers"], Path(tmp) / "calibration.json")
        share = c.get("pinned_share", 1.0)
        pin_bytes = (math.inf if share >= 1.0
                     else share * load_model_spec(model).routed_expert_bytes())
        shared = SharedModel(model, torch.device(device), pin_bytes, seed=0)
        try:
            results = [measure(shared, Config("calibration", policy, workload), math.inf,
                               math.inf, seed=0) for _ in range(runs)]
        finally:
            shared.close()
    del shared
    layers_s = [r["measured_layer_s"] for r in results]
    busy = results[layers_s.index(statistics.median_low(layers_s))]["busy_per_layer_s"]
    return Measurement("pipeline_gpu", {**c, **{f"{track}_busy_s": busy.get(track, 0.0)
                                                for track in ("gpu", "h2d", "cpu_attention",
                                                              "copy_thread")}},
                       x=1, work=1.0, unit="layer/s", times_s=tuple(layers_s))


def _calibration_if_it_runs(device: str) -> list[Measurement]:
    """[pipeline_calibration] unstaged and staged (CALIBRATION, CALIBRATION_STAGED), or nothing
    where the machine cannot run it (2 Mixtral-8x7B layers need about 6 GiB of GPU and 6 GiB of
    pinned host memory): the profile then keeps the microbenchmark's factors, and says why on
    stderr."""
    import torch

    runs = []
    for calibration in (CALIBRATION, CALIBRATION_STAGED):
        try:
            runs.append(pipeline_calibration(device, calibration))
        except (HRMError, RuntimeError, torch.OutOfMemoryError) as exc:
            print(f"hrm profile: executor calibration (pinned share "
                  f"{calibration['pinned_share']:.0%}) skipped ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); the GPU stage keeps the "
                  "interference benchmark's factors", file=sys.stderr)
    return runs


#: small kernels the interference benchmark's GPU stage queues from Python per expert GEMM. The
#: executor's GPU stage is driven by a Python thread that launches many small kernels per
#: micro-batch (hrm.roofline OPS_*); a GEMM alone leaves that thread idle and so measures neither
#: its slowdown beside the CPU-attention worker and the link thread nor theirs beside it
#: (2026-12-01, H200 host: the GEMM-only factors were gpu 1.08 and cpu_attention 1.11 while the
#: pipeline's GPU and CPU-attention stages took 1.6x and 1.45x the solo-fitted model)
INTERFERENCE_GPU_LAUNCHES = 64


def interference_stages(config: ProfileConfig, spec: ModelSpec, device: str) -> list[Stage]:
    """The three overlapped stages of CGOPipe: weight H2D streaming (pinned copies), the GPU
    stage (INTERFERENCE_GPU_LAUNCHES small kernels launched from Python, their host time
    counted, then the model's expert up projection, bf16) and CPU decode attention (bf16 KV)."""
    import torch

    def on_stream(fn: Callable[[], Any]) -> Callable[[], None]:
        """`fn` on a stream of its own, waited for; on the CPU stand-in just `fn`."""
        stream = torch.cuda.Stream() if device == "cuda" else None

        def op() -> None:
            if stream is None:
                fn()
                return
            torch.cuda.set_device(stream.device)  # makes the CUDA context current in this thread
            with torch.cuda.stream(stream):
                fn()
            stream.synchronize()

        return op

    nbytes = config.interference_copy_bytes
    host = _host_buffer(nbytes, pinned=device == "cuda")
    dev = torch.empty_like(host, device=device)
    k, n = expert_shape(spec, "up")
    rows = config.interference_gemm_rows
    x, weight = random_tensor((rows, k), "bf16", device), random_tensor((k, n), "bf16", device)
    tiny = torch.zeros(1, device=device)
    launches = HostClock()

    def gpu_stage() -> None:
        start = time.perf_counter()
        for _ in range(INTERFERENCE_GPU_LAUNCHES):
            tiny.add_(1.0)
        launches.seconds += time.perf_counter() - start
        launches.ops += INTERFERENCE_GPU_LAUNCHES
        torch.matmul(x, weight)
    attention, kv_bytes = decode_attention_call(spec, *config.interference_attention, "bf16",
                                                config.attn_cold_bytes)
    _sync(device)  # the inputs are written on the default stream; the stages use their own
    return [
        Stage("link", on_stream(lambda: dev.copy_(host, non_blocking=True)), nbytes, "B/s"),
        Stage("gpu", on_stream(gpu_stage), 2.0 * rows * k * n, "FLOP/s", launches),
        Stage("cpu_attention", attention, kv_bytes, "B/s"),
    ]


# ---- spot check of a profile against the machine ---------------------------------------------
#: measured / profile time ratio beyond which `spot_check` calls the profile off for this machine
SPOT_CHECK_TOLERANCE = 1.2
#: the CPU attention call of the spot check: sequences x context tokens, bf16 KV
SPOT_CHECK_ATTENTION = (64, 1024)


def spot_check(hw: HardwareProfile, spec: ModelSpec, device: str) -> list[dict[str, Any]]:
    """A few seconds of the profile's own microbenchmarks at one size each, set against what the
    profile says they cost: the GPU op launch, DRAM read, the pinned H2D link (CUDA only) and one
    CPU attention call (SPOT_CHECK_ATTENTION, on the executor's threads). A profile describes the
    machine, and the lease, it was measured on: on 2026-12-01 the shipped H200 profile met
    another lease of the same kind whose CPU-side pipeline stages ran up to 2.2x slower.
    Per row: the seconds the profile predicts, the seconds measured now (median), their ratio
    (> 1: the machine is slower than its profile) and whether it is within SPOT_CHECK_TOLERANCE;
    a quantity the profile lacks has no row."""
    from hrm.cost import link_bps

    rows = []

    def row(name: str, profile_s: float, m: Measurement) -> None:
        if profile_s <= 0:   # not in the profile (a datasheet profile has no op cost)
            return
        ratio = m.median_s / profile_s
        rows.append({"benchmark": name, "profile_s": profile_s, "measured_s": m.median_s,
                     "ratio": ratio, "ok": 1 / SPOT_CHECK_TOLERANCE <= ratio
                     <= SPOT_CHECK_TOLERANCE})

    launch = op_overhead(device, reps=5)
    row(f"GPU op launch ({OPS_PER_BURST} queued)", OPS_PER_BURST * hw.gpu.op_overhead_s, launch)
    dram = dram_read(256 * MiB, "fp32", reps=5)
    row("DRAM read (256 MiB)", dram.work / hw.cpu.dram_bandwidth_bps, dram)
    if device == "cuda":
        (h2d,) = copy_series("h2d", True, [256 * MiB], device, 256 * MiB * 5)
        row("pinned H2D (256 MiB)", h2d.work / link_bps(hw, "h2d", h2d.work), h2d)
    batch, context = SPOT_CHECK_ATTENTION
    (attention,) = cpu_attention_series(spec, [batch], [context], "bf16", math.inf, 5,
                                        executor_attention_threads(len(os.sched_getaffinity(0))),
                                        FULL.attn_cold_bytes, FULL.attn_gap_s)
    curve, kv_bytes = hw.curves.get("cpu_attention"), attention.work
    row(f"CPU attention ({batch} x {context}, bf16)",
        curve.time_s(kv_bytes) if curve is not None else kv_bytes / hw.cpu.dram_bandwidth_bps,
        attention)
    return rows


# ---- orchestration -------------------------------------------------------------------------------
# ---- interconnect: all-reduce between GPUs ----------------------------------------------------
#: sizes of the all-reduce benchmark (bytes): latency-bound to bandwidth-bound
ALLREDUCE_SIZES = _powers(64 * KiB, 256 * MiB, 4)


def _allreduce_rank(rank: int, world_size: int, port: int, backend: str, device: str,
                    sizes: tuple[int, ...], reps: int, results: Any) -> None:
    """One process of `measure_allreduce`: times in-place sum all-reduces of each size; rank 0
    reports (size, seconds per call...) on `results`."""
    import torch
    import torch.distributed as dist

    from executor.distributed import RANK_ENV

    os.environ.update(RANK_ENV)                # the GPU host requires NVLink multicast off
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for nbytes in sizes:
            x = torch.ones(nbytes // dtype_bytes("bf16" if device == "cuda" else "fp32"),
                           dtype=dtype, device=f"{device}:{rank}" if device == "cuda" else "cpu")
            dist.barrier()
            times = time_calls(lambda x=x: dist.all_reduce(x), reps, device, warmup=2)
            if rank == 0:
                results.put((nbytes, times))
    finally:
        dist.destroy_process_group()


def measure_allreduce(world_size: int, backend: str, device: str,
                      sizes: Iterable[int] = ALLREDUCE_SIZES, reps: int = 10
                      ) -> list[Measurement]:
    """All-reduce of each size over `world_size` processes, one per GPU (backend 'nccl', device
    'cuda') or on the CPU ('gloo', 'cpu'), spawned with torch.multiprocessing and a localhost
    rendezvous on a free port. Rate = algorithm bandwidth, bytes / s per call."""
    import torch.multiprocessing as mp

    from executor.distributed import RANK_ENV, free_port

    sizes = tuple(sizes)
    results = mp.get_context("spawn").SimpleQueue()
    os.environ.update(RANK_ENV)
    mp.spawn(_allreduce_rank, args=(world_size, free_port(), backend, device, sizes, reps,
                                    results), nprocs=world_size, join=True)
    out = []
    for _ in sizes:
        nbytes, times = results.get()
        out.append(Measurement("allreduce", {"world_size": world_size, "backend": backend,
                                             "bytes": nbytes}, x=nbytes, work=nbytes, unit="B/s",
                               times_s=times))
    return out


def interconnect_from(measurements: list[Measurement], date: str
                      ) -> tuple[InterconnectTier, dict[str, str]]:
    """Least-squares fit of t(S) = t_lat + 2 (G - 1) / G * S / B_bus to the median times of
    the all-reduce sizes: the interconnect tier and the sources of its values."""
    g = int(measurements[0].params["world_size"])
    ring_bytes = np.array([2.0 * (g - 1) / g * m.x for m in measurements])
    seconds = np.array([m.median_s for m in measurements])
    slope, latency = np.polyfit(ring_bytes, seconds, 1)
    what = (f"fit {date}: t = t_lat + 2 (G - 1) / G * S / B_bus to {len(measurements)} "
            f"all-reduce sizes ({fmt_bytes(measurements[0].x)} to "
            f"{fmt_bytes(measurements[-1].x)}, {measurements[0].params['backend']}, G = {g}, "
            f"median of {len(measurements[0].times_s)} reps)")
    tier = InterconnectTier(num_gpus=g, allreduce_bus_bps=float(1.0 / max(slope, 1e-30)),
                            allreduce_latency_s=float(max(latency, 0.0)), link_shared=False)
    sources = {"interconnect.num_gpus": f"measured {date}: GPUs visible to torch",
               "interconnect.allreduce_bus_bps": what, "interconnect.allreduce_latency_s": what,
               "interconnect.link_shared": "not measured: assumed one host link per GPU (set "
                                           "true if the GPUs share one)"}
    return tier, sources


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect_environment(device: str, mode: str, model: str) -> Environment:
    """Names, versions, memory sizes and the thread count of this machine."""
    import torch

    cpu_memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    cuda = device == "cuda"
    return Environment(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), device=device,
        mode=mode,
        torch_version=torch.__version__, cuda_version=str(torch.version.cuda or "none"),
        gpu_name=torch.cuda.get_device_name(0) if cuda else f"CPU stand-in ({_cpu_name()})",
        cpu_name=_cpu_name(), threads=torch.get_num_threads(),
        gpu_memory_bytes=float(torch.cuda.get_device_properties(0).total_memory) if cuda
        else cpu_memory,
        cpu_memory_bytes=cpu_memory, model=model)


def benchmark_plan(config: ProfileConfig, env: Environment, spec: ModelSpec,
                   pin_probe_bytes: int) -> list[tuple[str, Callable[[], list[Measurement]]]]:
    """(label, thunk) for every benchmark, in the order they run; the pinned-memory probe runs
    last so that its allocations cannot disturb the others."""
    dev, reps, cuda = env.device, config.reps, env.device == "cuda"
    plan: list[tuple[str, Callable[[], list[Measurement]]]] = [
        ("launch overhead", lambda: [op_overhead(dev, reps)]),
        ("CPU attention hand-off", lambda: [attention_handoff(spec, dev, reps)]),
        ("device memory copy", lambda: [hbm_copy(config.hbm_copy_bytes, dev, reps)]),
    ]
    for dtype in config.gemm_dtypes + config.peak_only_dtypes:
        n = config.square_gemm_n
        plan.append((f"GEMM {n}^3 {dtype}", lambda d=dtype, n=n: gemm_series(
            "gpu_gemm_square", n, n, [n], d, dev, reps, {"model": "square", "proj": "square"})))
    for dtype in config.gemm_dtypes:
        for model in config.gemm_models:
            mspec = load_model_spec(model)
            for proj in config.gemm_projections:
                k, n = expert_shape(mspec, proj)
                plan.append((f"GEMM {model} {proj} {dtype}", lambda d=dtype, k=k, n=n, m=model,
                             p=proj: gemm_series("gpu_gemm", k, n, config.gemm_rows, d, dev,
                                                 reps, {"model": m, "proj": p})))
    budget = 4 * config.link_sizes_bytes[-1]
    if cuda and spec.num_experts:
        plan.append((f"grouped experts {spec.name}", lambda: grouped_experts_series(
            spec, GROUPED_EXPERT_MICRO_BATCHES, dev, reps)))
        plan.append((f"decode launch blocks {spec.name}", lambda: launch_blocks(
            spec, LAUNCH_BLOCK_MICRO_BATCHES, dev)))
    if cuda:
        for direction in ("h2d", "d2h"):
            for pinned in (True, False):
                kind = "pinned" if pinned else "pageable"
                plan.append((f"{direction} {kind} copies", lambda di=direction, pi=pinned:
                             copy_series(di, pi, config.link_sizes_bytes, dev, budget)))
        plan.append(("pageable -> pinned staging",
                     lambda: [staging_copy(config.link_sizes_bytes[-1], reps)]))
        plan.append(("KV gather for GPU attention", lambda: [kv_gather(
            spec, reps, executor_attention_threads(env.threads), config.attn_cold_bytes)]))
    else:
        plan.append(("host memcpy (link stand-in)", lambda: copy_series(
            "cpu", False, config.link_sizes_bytes, dev, budget)))
    plan.append(("paged copies", lambda: paged_copy_series(
        config.paged_total_bytes, config.page_sizes_bytes, dev, reps)))
    for dtype in ("fp32", "bf16"):
        d_ = config.cpu_gemm_dim
        plan.append((f"CPU GEMM {dtype}", lambda d=dtype, d_=d_: gemm_series(
            "cpu_gemm", d_, d_, config.cpu_gemm_rows, d, "cpu", reps, {"threads": env.threads})))
        plan.append((f"DRAM read {dtype}", lambda d=dtype: [dram_read(config.dram_bytes, d,
                                                                      reps)]))
        plan.append((f"CPU attention {dtype}", lambda d=dtype: cpu_attention_series(
            spec, config.attn_batches, config.attn_contexts, d, config.attn_max_kv_bytes, reps,
            executor_attention_threads(env.threads), config.attn_cold_bytes,
            config.attn_gap_s)))
    def overlap() -> list[Measurement]:
        # CPU attention on the executor's threads, as its solo curve above is measured; the
        # staging copy beside the three stages and beside the link alone (recorded: hrm.cost)
        nbytes = config.interference_copy_bytes
        with torch_threads(executor_attention_threads(env.threads)), \
                staging_copy_op(nbytes, pinned=cuda) as (copy, _):
            return interference(interference_stages(config, spec, dev),
                                config.interference_window_s, [(STAGING_STAGE, "link")],
                                Stage(STAGING_STAGE, copy, nbytes, "B/s"))

    plan.append(("overlap interference", overlap))
    if cuda:
        plan.append(("executor pipeline calibration", lambda: _calibration_if_it_runs(dev)))
    if pin_probe_bytes:
        plan.append(("pinned-memory probe", lambda: [probe_pinned_max(pin_probe_bytes)]))
    return plan


def skipped_benchmarks(env: Environment, pin_probe_bytes: int) -> list[str]:
    """What this run does not measure, said on screen and stored in the profile."""
    skipped = []
    if env.standin:
        skipped += ["PCIe copies (pinned vs pageable, H2D vs D2H): the link is a host memcpy",
                    "pageable -> pinned staging copy (taken as the host memcpy)",
                    "GPU GEMM and device memory: measured on the CPU stand-in",
                    "fp16 GEMM (no fast fp16 CPU kernels; bf16 and fp32 measured)"]
    if not pin_probe_bytes:
        skipped.append("pinned-memory limit (run with --pin-probe-gib N to probe it)")
    return skipped


def run_benchmarks(plan: list[tuple[str, Callable[[], list[Measurement]]]], console: Any
                   ) -> list[Measurement]:
    """Run the plan under a rich progress bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    results: list[Measurement] = []
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("profiling", total=len(plan))
        for label, thunk in plan:
            progress.update(task, description=label)
            results.extend(thunk())
            progress.advance(task)
    return results


# ---- measurements -> profile ---------------------------------------------------------------------
def _fmt_rate(rate: float, unit: str) -> str:
    if unit == "FLOP/s":
        return f"{rate / 1e12:.3g} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.3g} GFLOP/s"
    if unit == "B/s":
        return f"{rate / 1e12:.3g} TB/s" if rate >= 1e12 else f"{rate / 1e9:.3g} GB/s"
    return f"{rate:.3g} {unit}"


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(fmt_bytes(v) if k.endswith("bytes") else f"{k}={v}" for k, v in
                     params.items())


def source_of(m: Measurement, date: str, what: str = "median") -> str:
    """'measured 2026-11-23: copy (h2d, pinned, 256 MiB) x 10 reps, median 54.1 GB/s (IQR
    1.2%)'."""
    return (f"measured {date}: {m.bench} ({_describe(m.params)}) x {len(m.times_s)} reps, "
            f"{what} {_fmt_rate(m.rate, m.unit)} (IQR {m.iqr_rel:.1%})")


def _select(measurements: list[Measurement], bench: str, **params: Any) -> list[Measurement]:
    found = [m for m in measurements if m.bench == bench and
             all(m.params.get(k) == v for k, v in params.items())]
    if not found:
        raise ProfileError(f"no '{bench}' measurement with {params or 'any parameters'}")
    return found


def _largest(measurements: list[Measurement], bench: str, **params: Any) -> Measurement:
    return max(_select(measurements, bench, **params), key=lambda m: m.x)


def _fastest(measurements: list[Measurement], bench: str, **params: Any) -> Measurement:
    return max(_select(measurements, bench, **params), key=lambda m: m.rate)


#: copies within this factor of the largest size measure the link's bulk rate
BULK_SIZE_SPAN = 16


def _bulk(measurements: list[Measurement], bench: str, **params: Any) -> Measurement:
    """The fastest (by its median) of the measurements of at least 1/BULK_SIZE_SPAN of the
    largest size: the link's bulk rate, which a copy reaches from about 16 MiB on, less
    sensitive than the largest copy alone (4 reps) to a link busy with other traffic. H200
    machine, 2026-12-02c: the 1 GiB pinned H2D copies' median was 48.6 GB/s, the 64 and 256 MiB
    copies' 50.8 and 51.8, while the executor's weight pages crossed at 55 GB/s minutes later."""
    found = _select(measurements, bench, **params)
    largest = max(m.x for m in found)
    return max((m for m in found if m.x * BULK_SIZE_SPAN >= largest), key=lambda m: m.rate)


#: a fitted curve whose relative RMS error exceeds this describes the measurements worse than
#: the tier's single peak value does, so it is left out of the profile (and said so)
MAX_CURVE_FIT_ERROR = 0.5


#: the CPU attention curve is fitted to calls with at least this many (sequence, KV head) work
#: items per thread: the C++ kernel splits those items over the threads, so a call with fewer
#: (a single long sequence has 8) measures idle threads, not KV bandwidth, and its rate does not
#: grow with the bytes per call. Decode micro-batches hold tens of sequences or more.
MIN_ATTENTION_ITEMS_PER_THREAD = 2


def _parallel_attention(points: list[Measurement]) -> list[Measurement]:
    return [m for m in points if m.params["batch"] * m.params["kv_heads"]
            >= MIN_ATTENTION_ITEMS_PER_THREAD * m.params["threads"]]


def fit_series(series: list[Measurement]) -> tuple[SaturatingCurve, list[Measurement]]:
    """Fit rate vs x of a list of measurements (hrm.fit.fit_saturating_robust): the curve and
    the measurements left out as outliers."""
    from hrm.fit import fit_saturating_robust  # scipy: imported on use, so the CLI starts fast

    fit = fit_saturating_robust([m.x for m in series], [m.rate for m in series])
    return fit.curve, [series[i] for i in fit.outliers]


def _outlier_note(outliers: list[Measurement], curve: SaturatingCurve) -> str:
    """'; left out ...' naming each outlier, its rate and the fitted rate at its size."""
    if not outliers:
        return ""
    from hrm.fit import OUTLIER_FACTOR

    return (f"; left out as more than {OUTLIER_FACTOR:g}x off a robust fit: " + ", ".join(
        f"x={m.x:.3g} at {_fmt_rate(m.rate, m.unit)} (curve "
        f"{_fmt_rate(curve(m.x), m.unit)})" for m in outliers))


def measurement_tables(measurements: list[Measurement]) -> dict[str, dict[str, Any]]:
    """Column tables per benchmark (TOML-friendly): the rate's unit, then one list per
    parameter, x, reps, the median time, the IQR of the times over the median, and the rate."""
    tables: dict[str, dict[str, Any]] = {}
    for m in measurements:
        row = {**m.params, "x": m.x, "reps": len(m.times_s), "median_s": m.median_s,
               "iqr_rel": m.iqr_rel, "rate": m.rate}
        table = tables.setdefault(m.bench, {"unit": m.unit})
        for key, value in row.items():
            table.setdefault(key, []).append(value)
    return tables


def min_page_bytes(paged: list[Measurement], fraction: float = 0.9) -> int:
    """Smallest page size whose paged transfer reaches `fraction` of the best paged rate."""
    best = max(m.rate for m in paged)
    return int(min(m.x for m in paged if m.rate >= fraction * best))


def build_profile(name: str, measurements: list[Measurement], env: Environment,
                  skipped: list[str] | None = None) -> HardwareProfile:
    """Map measurements onto the HardwareProfile fields, fit its curves and record for every
    value how it was measured. Pure: the benchmarks' results in, the profile out."""
    date, sources = env.date, {}
    where = "on the CPU stand-in" if env.standin else ""
    ms = measurements

    peak_flops = {}
    gemms = [m for m in ms if m.bench in ("gpu_gemm", "gpu_gemm_square")]
    for dtype in sorted({m.params["dtype"] for m in gemms}):
        best = max((m for m in gemms if m.params["dtype"] == dtype), key=lambda m: m.rate)
        peak_flops[dtype] = best.rate
        sources[f"gpu.peak_flops.{dtype}"] = source_of(best, date, "max achieved") + \
            (f" {where}" if where else "")
    hbm = _largest(ms, "hbm_copy")
    overhead = _select(ms, "op_overhead")[0]
    sources["gpu.hbm_bandwidth_bps"] = source_of(hbm, date) + ", read + write counted" + \
        (f" {where}" if where else "")
    sources["gpu.op_overhead_s"] = (f"measured {date}: op_overhead (1-element add_ queued from "
                                    f"Python, {overhead.work:.0f} per sync) x "
                                    f"{len(overhead.times_s)} reps, median "
                                    f"{1e6 / overhead.rate:.1f} us per op")
    sources["gpu.memory_bytes"] = ("host memory (os.sysconf), the CPU stand-in's tensors live "
                                   "there" if env.standin else
                                   "torch.cuda.get_device_properties(0).total_memory")
    handoffs = [m for m in ms if m.bench == "attention_handoff"]
    if handoffs:
        h = handoffs[0]
        sources["gpu.attention_handoff_s"] = (
            f"measured {date}: attention_handoff ({_describe(h.params)}; executor.schedule."
            f"AttentionLink) x {len(h.times_s)} micro-batches, median {h.median_s * 1e6:.0f} us "
            f"(IQR {h.iqr_rel:.1%})")
    block_op_s = {}
    for block, runs in _group([m for m in ms if m.bench == "launch_block"], ("block",)).items():
        per_op_s = {m.params["micro_batch"]: m.median_s / m.work for m in runs}
        block_op_s[block[0]] = statistics.median(per_op_s.values())
        sources[f"gpu.{block[0]}_op_s"] = (
            f"measured {date}: launch_block {block[0]} (the executor's decode block, "
            f"{runs[0].params['model']}, {runs[0].params['ops']} operations, host clock, the "
            "stream held), median over micro-batches of " + ", ".join(
                f"{mu}: {t * 1e6:.1f} us" for mu, t in sorted(per_op_s.items())) +
            " per operation")
    gpu = GPUTier(name=env.gpu_name, peak_flops=peak_flops, hbm_bandwidth_bps=hbm.rate,
                  memory_bytes=env.gpu_memory_bytes, op_overhead_s=1.0 / overhead.rate,
                  attention_handoff_s=handoffs[0].median_s if handoffs else 0.0,
                  **{f"{block}_op_s": t for block, t in block_op_s.items()})

    cpu_best = _fastest(ms, "cpu_gemm")
    dram = _fastest(ms, "dram_read", dtype="fp32")
    sources["cpu.cores"] = f"torch.get_num_threads() = {env.threads} threads used"
    sources["cpu.peak_flops"] = source_of(cpu_best, date, "max achieved")
    sources["cpu.dram_bandwidth_bps"] = source_of(dram, date)
    sources["cpu.memory_bytes"] = "os.sysconf: SC_PHYS_PAGES x SC_PAGE_SIZE"
    cpu = CPUTier(name=env.cpu_name, cores=env.threads, peak_flops=cpu_best.rate,
                  dram_bandwidth_bps=dram.rate, memory_bytes=env.cpu_memory_bytes)

    if env.standin:
        memcpy = _largest(ms, "copy", direction="cpu")
        for key in ("h2d_pinned_bps", "d2h_pinned_bps", "h2d_pageable_bps", "d2h_pageable_bps",
                    "pageable_to_pinned_bps"):
            sources[f"link.{key}"] = source_of(memcpy, date) + ": host memcpy, the CPU " \
                "stand-in's link"
        link_rates = dict.fromkeys(("h2d_pinned_bps", "d2h_pinned_bps", "h2d_pageable_bps",
                                    "d2h_pageable_bps", "pageable_to_pinned_bps"), memcpy.rate)
        h2d_series = _select(ms, "copy", direction="cpu")
    else:
        link_rates = {}
        for direction in ("h2d", "d2h"):
            for pinned, kind in ((True, "pinned"), (False, "pageable")):
                m = _bulk(ms, "copy", direction=direction, pinned=pinned)
                link_rates[f"{direction}_{kind}_bps"] = m.rate
                sources[f"link.{direction}_{kind}_bps"] = (
                    source_of(m, date) + f", the fastest of the copies of "
                    f">= 1/{BULK_SIZE_SPAN} of the largest")
        staging = _largest(ms, "pageable_to_pinned")
        link_rates["pageable_to_pinned_bps"] = staging.rate
        sp = staging.params
        how = (f"the executor's copy thread ({sp['threads']} memmove threads, {sp['ahead']} "
               f"chunks of {fmt_bytes(sp['slot_bytes'])} at once)" if "slot_bytes" in sp
               else f"the executor's copy thread until 2026-12-03 ({sp['threads']} memmove "
               f"threads per {fmt_bytes(sp['page_bytes'])} page)" if "copy" in sp
               else f"torch copy_ on {env.threads} threads")
        sources["link.pageable_to_pinned_bps"] = f"{source_of(staging, date)}, {how}"
        gathers = [m for m in ms if m.bench == "kv_gather"]
        if gathers:
            link_rates["kv_gather_bps"] = gathers[0].rate
            sources["link.kv_gather_bps"] = (f"{source_of(gathers[0], date)}, "
                                             "executor.kv_cache.KVCache.gather_host into pinned "
                                             "memory, each gather's DMA after it")
        h2d_series = _select(ms, "copy", direction="h2d", pinned=True)
    pinned_max = math.inf
    probes = [m for m in ms if m.bench == "pin_probe"]
    if probes:
        probe = probes[0]
        pinned_max = probe.x
        bound = {"failed": "the next chunk failed to pin",
                 "bound": "at least: the probe stopped at its bound",
                 "time_limit": "at least: the probe stopped at its time limit"}
        sources["link.pinned_max_bytes"] = (
            f"measured {date}: pin_probe, {fmt_bytes(probe.x)} pinned in "
            f"{fmt_bytes(probe.params['chunk_bytes'])} chunks in {probe.median_s:.0f} s; "
            f"{bound[probe.params['outcome']]}")
    link = LinkTier(pinned_max_bytes=pinned_max, **link_rates)

    slowdown, slowdown_raw = {}, {}
    for stage in ("link", "gpu", "cpu_attention"):
        solo = _select(ms, "interference", stage=stage, mode="solo")[0]
        together = _select(ms, "interference", stage=stage, mode="together")[0]
        slowdown_raw[stage] = solo.rate / together.rate
        slowdown[stage] = max(1.0, slowdown_raw[stage])
        sources[f"interference.{stage}"] = _slowdown_source(date, stage, solo, together,
                                                            "with the other two stages")
    # the staging copy beside the three stages and beside the link alone (hrm.cost's copy
    # thread: the link's factor throughout, the three stages' while CPU attention runs)
    copy_runs = {m.params["mode"]: m for m in ms
                 if m.bench == "interference" and m.params["stage"] == STAGING_STAGE}
    for key, field_name, mode, beside in (
            (STAGING_STAGE, "staging_copy", "beside", "the three stages"),
            (f"{STAGING_STAGE}+link", "staging_copy_link", f"{STAGING_STAGE}+link",
             "the link alone")):
        if {"solo", mode} <= copy_runs.keys():
            solo, loaded = copy_runs["solo"], copy_runs[mode]
            slowdown_raw[key] = solo.rate / loaded.rate
            slowdown[field_name] = max(1.0, slowdown_raw[key])
            sources[f"interference.{field_name}"] = _slowdown_source(
                date, "the staging copy", solo, loaded, f"beside {beside}")
    launch_runs = {m.params["mode"]: m for m in ms if m.bench == "interference_launch"}
    if {"solo", "together"} <= launch_runs.keys():
        solo, together = launch_runs["solo"], launch_runs["together"]
        ratio = solo.rate / together.rate
        slowdown["launch"] = max(1.0, ratio)
        sources["interference.launch"] = (
            f"measured {date}: the gpu stage's kernel launches from Python, "
            f"{1e6 / solo.rate:.1f} us each alone, {1e6 / together.rate:.1f} us with the other "
            f"two stages; ratio {ratio:.3f}, floored at 1")
    inter = Interference(**slowdown)

    series = {
        "gpu_gemm": ("FLOP/s vs rows, bf16 expert GEMMs of every shape measured",
                     _select(ms, "gpu_gemm", dtype="bf16")),
        "h2d": ("bytes/s vs copy bytes, " + ("host memcpy (stand-in)" if env.standin else
                                             "pinned H2D"), h2d_series),
        "cpu_attention": ("KV bytes/s vs KV bytes per call, bf16 KV, calls with at least "
                          f"{MIN_ATTENTION_ITEMS_PER_THREAD} (sequence, KV head) items per thread",
                          _parallel_attention(_select(ms, "cpu_attention", dtype="bf16"))),
        "cpu_attention_fp32": ("KV bytes/s vs KV bytes per call, fp32 KV, calls with at least "
                               f"{MIN_ATTENTION_ITEMS_PER_THREAD} (sequence, KV head) items per "
                               "thread",
                               _parallel_attention(_select(ms, "cpu_attention", dtype="fp32"))),
        "cpu_gemm": (f"FLOP/s vs rows, {cpu_best.params['dtype']} CPU GEMMs",
                     _select(ms, "cpu_gemm", dtype=cpu_best.params["dtype"])),
    }
    grouped = [m for m in ms if m.bench == "gpu_grouped_experts"]
    if grouped:   # CUDA only (benchmark_plan): the cost model falls back to gpu_gemm
        series[GROUPED_EXPERTS_CURVE] = (
            "FLOP/s vs rows per touched expert, a decode micro-batch's routed experts as one "
            f"grouped GEMM pair ({grouped[0].params['model']}, bf16)", grouped)
    curves, fits, notes = {}, {}, []
    for key, (what, points) in series.items():
        curve, outliers = fit_series(points)
        used = curve.rel_error <= MAX_CURVE_FIT_ERROR
        fits[key] = {"what": what + _outlier_note(outliers, curve), "points": len(points),
                     "outliers": len(outliers), "peak": curve.peak, "half": curve.half,
                     "rel_error": curve.rel_error, "used": used}
        if not used:   # the cost model falls back to the tier's peak
            notes.append(f"curve {key} not used: fit error {curve.rel_error:.0%} > "
                         f"{MAX_CURVE_FIT_ERROR:.0%} (noisy or non-saturating measurements)")
            continue
        curves[key] = curve
        src = (f"fit {date}: y = peak x / (x + half) to {len(points) - len(outliers)} points, "
               f"{what}{_outlier_note(outliers, curve)}")
        for field_name in ("peak", "half", "rel_error"):
            sources[f"curves.{key}.{field_name}"] = src
    for (model, proj, dtype), points in _group(_select(ms, "gpu_gemm"),
                                               ("model", "proj", "dtype")).items():
        curve, outliers = fit_series(points)
        fits[f"gpu_gemm[{model},{proj},{dtype}]"] = {
            "what": "FLOP/s vs rows" + _outlier_note(outliers, curve), "points": len(points),
            "outliers": len(outliers), "peak": curve.peak, "half": curve.half,
            "rel_error": curve.rel_error}

    paged = _select(ms, "h2d_paged")
    description = (f"measured by hrm profile ({env.mode}) on {env.date}: {env.gpu_name}, "
                   f"{env.cpu_name} ({env.threads} threads); torch {env.torch_version}, CUDA "
                   f"{env.cuda_version}")
    if env.standin:
        description += f". {STANDIN_NOTE}; the link is a host memcpy"
    measurements_table = {
        "environment": dataclasses.asdict(env),
        "skipped": [*(skipped or []), *notes],
        "fits": fits,
        "derived": {
            "interference_ratio": slowdown_raw,
            "min_page_bytes_90pct": min_page_bytes(paged),
            "paged_copy_note": "smallest page whose back-to-back copies reach 90% of the best "
                               f"paged rate moving {fmt_bytes(paged[0].work)}",
        },
        "benchmarks": measurement_tables(ms),
    }
    allreduce = [m for m in ms if m.bench == "allreduce"]
    interconnect = InterconnectTier()
    if allreduce:
        interconnect, ic_sources = interconnect_from(allreduce, date)
        sources.update(ic_sources)
    profile = HardwareProfile(name=name, description=description, gpu=gpu, cpu=cpu, link=link,
                              interference=inter, interconnect=interconnect, curves=curves,
                              sources=sources, measurements=measurements_table)
    for run in (m for m in ms if m.bench == "pipeline_gpu"):
        profile = _with_pipeline_factor(profile, run, date)
    return profile


def _slowdown_source(date: str, what: str, solo: Measurement, loaded: Measurement,
                     beside: str) -> str:
    """The source line of an interference factor: solo and loaded rates, their ratio."""
    return (f"measured {date}: {what} alone {_fmt_rate(solo.rate, solo.unit)}, {beside} "
            f"{_fmt_rate(loaded.rate, loaded.unit)} ({solo.median_s:.1f} s windows); ratio "
            f"{solo.rate / loaded.rate:.3f}, floored at 1")


def _with_pipeline_factor(profile: HardwareProfile, run: Measurement, date: str
                          ) -> HardwareProfile:
    """interference.pipeline (pipeline_staged for a staged calibration) = the calibration's
    decode layer / the model's solo GPU stage on this profile (hrm.cost.gpu_stage_solo_s).
    Where the link or the copy thread was busy most of the layer, the layer was theirs and the
    ratio an upper bound of the GPU stage's: said in the source."""
    from hrm.cost import gpu_stage_solo_s

    p = run.params
    share = p.get("pinned_share", 1.0)
    key = "pipeline" if share >= 1.0 else "pipeline_staged"
    spec = dataclasses.replace(load_model_spec(p["model"]), num_layers=p["layers"])
    policy, workload = calibration_case(p)
    solo_s = gpu_stage_solo_s(spec, profile, workload, policy)
    layer_s = run.median_s
    factor = layer_s / solo_s
    stream_s = max(p["h2d_busy_s"], p.get("copy_thread_busy_s", 0.0))
    pinned = "" if share >= 1.0 else f", {share:.0%} of the expert bytes pinned"
    sources = {**profile.sources, f"interference.{key}": (
        f"measured {date}: the executor's CGOPipe decode ({p['model']}, first {p['layers']} "
        f"layers, N={p['batch_size']} in micro-batches of {p['micro_batch_size']}, "
        f"{p['prompt_len']}-token prompts, {p['gen_len']} tokens, per-expert loop, CPU "
        f"attention{pinned}; hrm.profile.CALIBRATION) took {layer_s * 1e3:.1f} ms per decode "
        f"layer (median of {len(run.times_s)} runs: "
        f"{', '.join(f'{t * 1e3:.1f}' for t in run.times_s)} ms) "
        f"against {solo_s * 1e3:.1f} ms of solo GPU stage (kernels + host work); ratio "
        f"{factor:.3f}" + (f"; the weight stream was busy {stream_s / layer_s:.0%} of the "
                           "layer, so this is an upper bound"
                           if stream_s >= LINK_BOUND_SHARE * layer_s else ""))}
    return dataclasses.replace(
        profile, interference=dataclasses.replace(profile.interference, **{key: factor}),
        sources=sources)


#: a calibration layer whose link was busy this share of it was bound by the link
LINK_BOUND_SHARE = 0.9


def _group(measurements: list[Measurement], keys: tuple[str, ...]
           ) -> dict[tuple[Any, ...], list[Measurement]]:
    groups: dict[tuple[Any, ...], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(tuple(m.params[k] for k in keys), []).append(m)
    return groups


# ---- CLI -----------------------------------------------------------------------------------------
def _visible_gpus(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0


def _resolve_device(device: str) -> str:
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise ProfileError(f"--device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProfileError("--device cuda: torch sees no CUDA GPU here (install a CUDA build of "
                           "torch, or use --device cpu to profile the CPU stand-in)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def _summary_rows(profile: HardwareProfile) -> list[tuple[str, str]]:
    g, c, lk, i = profile.gpu, profile.cpu, profile.link, profile.interference
    rows = [(f"gpu peak {k}", _fmt_rate(v, "FLOP/s")) for k, v in g.peak_flops.items()]
    rows += [("gpu memory bandwidth", _fmt_rate(g.hbm_bandwidth_bps, "B/s")),
             ("gpu op overhead", f"{g.op_overhead_s * 1e6:.1f} us"),
             ("decode blocks, host per op (pre / post grouped / gpu attention)",
              " / ".join(f"{t * 1e6:.1f} us" if t else "-" for t in (
                  g.attention_in_op_s, g.post_grouped_op_s, g.gpu_attention_op_s))),
             ("cpu peak", _fmt_rate(c.peak_flops, "FLOP/s")),
             ("cpu DRAM read", _fmt_rate(c.dram_bandwidth_bps, "B/s")),
             ("link h2d pinned / pageable", f"{_fmt_rate(lk.h2d_pinned_bps, 'B/s')} / "
                                            f"{_fmt_rate(lk.h2d_pageable_bps, 'B/s')}"),
             ("link d2h pinned / pageable", f"{_fmt_rate(lk.d2h_pinned_bps, 'B/s')} / "
                                            f"{_fmt_rate(lk.d2h_pageable_bps, 'B/s')}"),
             ("pageable -> pinned", _fmt_rate(lk.pageable_to_pinned_bps, "B/s")),
             ("pinned max", "not probed" if math.isinf(lk.pinned_max_bytes) else
              fmt_bytes(lk.pinned_max_bytes)),
             ("interference link / gpu / cpu attn / launch",
              f"{i.link:.2f} / {i.gpu:.2f} / {i.cpu_attention:.2f} / "
              + (f"{i.launch:.2f}" if i.launch else "not measured")),
             ("attention hand-off / KV gather",
              f"{profile.gpu.attention_handoff_s * 1e6:.0f} us / "
              + (_fmt_rate(lk.kv_gather_bps, "B/s") if lk.kv_gather_bps else "not measured"))]
    for key, curve in profile.curves.items():
        unit = "FLOP/s" if "gemm" in key else "B/s"
        left_out = profile.measurements.get("fits", {}).get(key, {}).get("outliers", 0)
        rows.append((f"curve {key}", f"peak {_fmt_rate(curve.peak, unit)}, half "
                                     f"{curve.half:.3g}, fit error {curve.rel_error:.1%}"
                                     + (f", {left_out} outlier(s) left out" if left_out else "")))
    return rows


def profile_command(
    output: Path | None = typer.Option(
        None, "-o", "--output", help="TOML to write [default: hardware_profiles/NAME.toml]"),
    quick: bool = typer.Option(False, "--quick", help="small sizes: under 2 minutes on 2 cores"),
    device: str = typer.Option("auto", "--device", help="cuda, cpu (the CPU stands in for the "
                               "GPU, as in the executor's --device cpu) or auto"),
    model: str = typer.Option("mixtral-8x7b", "--model",
                              help="model whose attention head layout the CPU attention "
                                   "benchmark uses"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch "
                                       "[default: torch's default]"),
    pin_probe_gib: float = typer.Option(
        0.0, "--pin-probe-gib", help="pin host memory in 4 GiB chunks up to this many GiB (at "
        "most 3/4 of RAM) to find the pinned-memory limit; 0 skips the probe"),
    raw_json: Path | None = typer.Option(None, "--raw-json",
                                         help="also write every timing sample as JSON here"),
    name: str | None = typer.Option(None, "--name", help="profile name [default: the output "
                                    "file's stem, else derived from the GPU name]"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    from_raw: Path | None = typer.Option(
        None, "--from-raw", help="measure nothing: fit the profile again from the samples a "
        "previous run wrote with --raw-json (same machine, today's fitting rules)"),
) -> None:
    """Measure this machine (GPU GEMM and memory, PCIe copies, CPU GEMM, DRAM and decode
    attention, overlap interference; on CUDA, a few seconds of the executor's own decode that
    calibrate its GPU stage) and write a fitted hardware profile."""
    import torch

    from hrm.cli import err_console

    if from_raw is not None:
        _refit_command(from_raw, output, name, as_json)
        return
    if threads is not None:
        if threads < 1:
            raise ProfileError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if not (pin_probe_gib >= 0 and math.isfinite(pin_probe_gib)):
        raise ProfileError(f"--pin-probe-gib must be >= 0, got {pin_probe_gib}")
    spec = load_model_spec(model)
    if spec.is_mla:
        raise ProfileError(f"--model {model}: the CPU attention benchmark needs a grouped-query "
                           "attention model (this one caches an MLA latent)")
    dev = _resolve_device(device)
    config = QUICK if quick else FULL
    env = detect_environment(dev, config.mode, spec.name)
    if env.standin:
        config = config.for_standin()
    if pin_probe_gib and env.standin:
        raise ProfileError("--pin-probe-gib needs CUDA (pinned memory is CUDA host memory)")
    pin_probe_bytes = int(min(pin_probe_gib * GiB, 0.75 * env.cpu_memory_bytes))
    profile_name = name or (output.stem if output else _slug(env.gpu_name))
    output = output or PROFILE_DIR / f"{profile_name}.toml"

    skipped = skipped_benchmarks(env, pin_probe_bytes)
    if env.standin:
        err_console.print(f"[yellow]{STANDIN_NOTE}[/] (the link is a host memcpy)")
    for item in skipped:
        err_console.print(f"[yellow]skipped:[/] {item}")
    measurements = run_benchmarks(benchmark_plan(config, env, spec, pin_probe_bytes),
                                  err_console)
    gpus = _visible_gpus(dev)
    if gpus > 1:
        err_console.print(f"all-reduce over {gpus} GPUs (NCCL)")
        measurements += measure_allreduce(gpus, "nccl", "cuda")
    if raw_json:   # first: a fit that fails loses no samples (`--from-raw` fits them again)
        write_json_atomic(raw_json, {"environment": dataclasses.asdict(env),
                                     "config": dataclasses.asdict(config), "skipped": skipped,
                                     "measurements": [m.to_dict() for m in measurements]})
    profile = build_profile(profile_name, measurements, env, skipped)
    save_profile(profile, output)
    load_profile(output)  # what was written reads back
    _report(profile, env, output, raw_json, skipped, as_json)


def _report(profile: HardwareProfile, env: Environment, output: Path, raw_json: Path | None,
            skipped: list[str], as_json: bool) -> None:
    from rich.table import Table

    from hrm.cli import console, emit_json

    rows = _summary_rows(profile)
    if as_json:
        emit_json({"profile": str(output), "raw_json": str(raw_json) if raw_json else None,
                   "standin": env.standin, "skipped": skipped, "summary": dict(rows)})
        return
    table = Table(title=f"{profile.name}: {env.gpu_name} + {env.cpu_name}")
    table.add_column("quantity")
    table.add_column("measured")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {output}" + (f" and {raw_json}" if raw_json else ""))


def _refit_command(raw_json: Path, output: Path | None, name: str | None,
                   as_json: bool) -> None:
    """`hrm profile --from-raw`: the profile of the samples in `raw_json`, fitted again."""
    try:
        raw = json.loads(raw_json.read_text())
        env = Environment(**raw["environment"])
        measurements = [Measurement(m["bench"], m["params"], m["x"], m["work"], m["unit"],
                                    tuple(m["times_s"])) for m in raw["measurements"]]
        skipped = list(raw.get("skipped", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"--from-raw {raw_json}: not a raw sample file written by "
                           f"`hrm profile --raw-json` ({exc})") from None
    profile_name = name or (output.stem if output else raw_json.stem)
    output = output or PROFILE_DIR / f"{profile_name}.toml"
    profile = build_profile(profile_name, measurements, env, skipped)
    save_profile(profile, output)
    load_profile(output)
    _report(profile, env, output, None, skipped, as_json)
