"""The CGOPipe cost model: per-layer stage times, pipeline makespan, memory and tokens/s.

Notation (MoE-Lightning Tab. 1): N batch, mu micro-batch, n_ub = N / mu, l layers, s mean prompt,
n generated tokens, r_w / r_c fractions of routed-expert / KV bytes kept on the GPU.

Each stage of one decoder layer (for the whole batch) is a sum over the operators of
`hrm.roofline.layer_operators` placed on that stage:

    GPU op      t = max(F / P_g(rows), B_hbm / BW_g) + launches * t_launch
                (+ n_ub t_handoff with CPU decode attention: the launching thread hands each
                micro-batch's attention to the CPU worker and takes its output back, measured by
                `hrm profile` as gpu.attention_handoff_s)
                P_g(rows) from curve 'gpu_gemm' (achieved FLOP/s vs GEMM rows), else the peak;
                launches = the host-issued operations of the executor's layer code (roofline
                OPS_*), t_launch the seconds per operation `hrm profile` measured for the
                decode blocks by their own code (gpu.attention_in_op_s, post_grouped_op_s),
                else for a tiny op (gpu.op_overhead_s); with GPU attention over a CPU KV
                cache, + (1 - r_c) KV_g / BW_gather
                (the launching thread gathers the KV blocks into pinned memory; BW_gather the
                profile's kv_gather_bps, else the pageable -> pinned memcpy rate; not slowed by
                f_h) + (1 - r_c) 2 KV_g / B_pinned in cgopipe (the KV's DMA is queued on the
                compute stream, which waits for it, and shares the link with the weight pages'
                stream: STREAMS_SHARING_THE_LINK); KV_g = N ceil(ctx_pad / T) T kv_token, the whole
                blocks the gather copies (roofline.whole_block_tokens), every row of a
                micro-batch to its longest (ctx_pad: Workload.padded_decode_context, which GPU
                attention reads too)
    CPU attn    t = max(F / P_c, t_kv(KV bytes)), t_kv from curve 'cpu_attention', else B / BW_c
                (+ 2 o_l / BW_c: the copy thread's DRAM read+write shares the bus, MoE-Lens Eq. 5)
    H2D         t = (1 - r_w) W_e / B_pinned + activations; B_pinned the bulk pinned rate (pages
                are queued back to back), bw(x) of activations from curve 'h2d' at their size;
                + (1 - r_c) KV_g / B_pinned for GPU attention over a CPU KV cache (the
                gathered KV crosses the same link as the weight pages). Staged and pinned
                pages alike cross at B_pinned: the copy thread memcpys the staged chunks
                while the pinned ones cross (executor.schedule.WeightLink), so the stream takes
                max((p_l + o_l) / B_pinned, t_copy), two stages in the max. (Until 2026-12-03
                the link thread did each page's memcpy itself, and a layer took about the sum
                p_l / B_pinned + o_l / BW_copy, which the model then used.)
    D2H         t = q/k/v per micro-batch (+ (1 - r_c) KV offload)
    copy thread t = o_l / BW_copy, o_l = pinned overflow of one layer, BW_copy the profile's
                pageable -> pinned rate (link.pageable_to_pinned_bps), measured alone, as the
                executor's copy threads do it; in cgopipe slowed by the link throughout and by
                the three stages while CPU attention runs (`interfered`: the profile's
                staging_copy_link and staging_copy factors)
    all-reduce  t = calls * t_lat + 2 (G - 1) / G * S / BW_bus   (ring, G > 1 GPUs; on the GPU
                stream, so added to the GPU stage; S = tokens * h1 * 2 bytes, 2 calls per layer)

    o = max(0, (1 - r_w) W_routed - pinned_max)   bytes that cannot stay pinned; pinned_max is
        the weights' budget (the executor's --pin-mem): the activation buffers and the staging
        ring are pinned beside it, as the executor does

Schedules: cgopipe  layer_s = max_s(f_s t_s)  (f = interference factors: on the GPU stage f_gpu
           slows the kernels and f_launch the launching thread's host work, its launches and
           hand-offs (f_gpu where the profile has no f_launch); the link's applies while CPU
           attention runs beside it, t_link + (f_link - 1) t_cpu_attn: `interfered`);
           cgopipe-serial and
           layerwise  layer_s = sum_{s not h2d, copy} t_s + max(t_h2d, t_copy)  (one stage at a
           time, but the copy thread stages the next chunk while the link carries the others,
           so the weight stream takes the longer of its two legs).
Decode:    step_s = lm head + max(sum_layers layer_s, fill + sum_layers max_{s not fed} f_s t_s)
           (cgopipe: a step boundary drains and refills the pipeline by one micro-batch's chain,
           which idles the GPU and CPU but not the weight stream, prefetched across steps; so
           the fill costs only where the stages other than h2d and the copy thread bind);
           serial schedules  step_s = lm head + sum_layers layer_s.  decode_s = (n - 1) step_s
           (prefill makes the first token).  throughput = N n / (prefill_s + decode_s)
           (FlexGen / MoE-Lightning).

G GPUs (policy.num_gpus): every stage is one GPU's, from its share of the operators
(`hrm.roofline.layer_operators`: tensor or expert parallel) over its own host link, or over
1/G of a shared one (`HardwareProfile.per_gpu`). The CPU tier is shared: CPU attention of all G
processes is timed as one whole-batch call on all cores (bounded by DRAM bandwidth, no faster
than with one GPU), as is the copy thread. GPU memory is per GPU, CPU and pinned memory the
machine's.

Every term is affine in (r_w, r_c, o) for fixed discrete choices: `cost_terms` exposes the
coefficients, `predict` evaluates them, and `hrm.optimize` builds its MILP from the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

from hrm.errors import HardwareProfileError, PolicyError
from hrm.hardware import HardwareProfile
from hrm.model import ModelSpec
from hrm.policy import Policy, resident_experts_by_layer, staged_experts
from hrm.roofline import (
    ACT_DTYPE,
    COMPUTE_DTYPE,
    HANDOFF_OP,
    LOGIT_BYTES,
    Operator,
    attn_out_elements_per_token,
    head_operators,
    kv_bytes_per_token_layer,
    layer_operators,
    qkv_elements_per_token,
    whole_block_tokens,
)
from hrm.units import GiB, dtype_bytes, fmt_bytes
from hrm.workload import Workload

#: share of GPU memory a policy may plan for: the rest is headroom for the CUDA context, cuBLAS
#: workspaces and allocator fragmentation (an assumption, not a measurement)
GPU_USABLE_FRACTION = 0.95
#: share of CPU memory a policy may plan for: the rest is left to the OS, Python and the page
#: cache (an assumption, not a measurement)
CPU_USABLE_FRACTION = 0.90
#: relative slack of memory checks: the MILP solver's feasibility tolerance (CBC, 1e-7) and a
#: policy's fractions saved to 9 digits can put a policy a few bytes over a binding limit
MEMORY_CHECK_TOLERANCE = 1e-6
#: the weight stream's two legs: fed by the prefetch, which runs ahead across decode steps (no
#: fill or drain in cgopipe); the copy thread's memcpy of page p+1 overlaps page p's H2D, and
#: the link's time (t_h2d) already holds the staged pages at the copy's pace
WEIGHT_STREAM_STAGES = ("h2d", "copy_thread")
#: copy streams that share the link while GPU attention's KV crosses in cgopipe (the KV's DMA
#: on the compute stream, the weight pages on theirs): the KV gets half of it. H200 machine,
#: 2026-12-02, fourth session: 2.19 ms per 64-sequence micro-batch (50 MB, 23 GB/s) at N=1024,
#: against 1.05 ms with the link to itself in the layerwise schedule (benchmarks/results/
#: h200_2026-12-02d/)
STREAMS_SHARING_THE_LINK = 2.0
#: the pinned staging ring that the copy thread fills when weights cannot all be pinned: slots
#: of STAGING_SLOT_PAGES weight pages, each one pinned allocation (executor.schedule.WeightLink)
STAGING_RING_SLOTS = 4
STAGING_SLOT_PAGES = 4
#: the GPU memory term of the expert staging buffers (policy staging_buffers)
STAGING_TERM = "expert staging"

#: resources of a layer; cgopipe adds "chain", one micro-batch's dependent path through a layer.
#: "launcher" is the launching thread's host work where it is a stage of its own: in cgopipe's
#: grouped-kernel decode layers (`_stage_sums`); elsewhere it is part of "gpu"
STAGES = ("h2d", "d2h", "cpu_attn", "gpu", "copy_thread", "launcher")
#: the name a stage has as a bottleneck
BOTTLENECK_NAMES = {"h2d": "link", "d2h": "link_d2h", "cpu_attn": "cpu_attention", "gpu": "gpu",
                    "copy_thread": "copy_thread", "chain": "micro_batch_chain",
                    "launcher": "launching_thread"}


# ---- affine terms ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Affine:
    """const + r_w * a_w + r_c * a_c + o * a_o, with o the pinned-overflow bytes (all of them,
    over every layer). The unit is the term's (seconds or bytes)."""

    const: float = 0.0
    r_w: float = 0.0
    r_c: float = 0.0
    overflow: float = 0.0

    def __call__(self, r_w: float, r_c: float, overflow: float = 0.0) -> float:
        return self.const + self.r_w * r_w + self.r_c * r_c + self.overflow * overflow

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.const + other.const, self.r_w + other.r_w, self.r_c + other.r_c,
                      self.overflow + other.overflow)

    def scaled(self, factor: float) -> Affine:
        return Affine(self.const * factor, self.r_w * factor, self.r_c * factor,
                      self.overflow * factor)

    __mul__ = scaled


def one_minus(x_bytes: float, variable: str) -> Affine:
    """(1 - r) * x: the part of x that is not on the GPU."""
    return Affine(const=x_bytes, **{variable: -x_bytes})


def affine_sum(terms: list[Affine]) -> Affine:
    total = Affine()
    for term in terms:
        total = total + term
    return total


# ---- rates and operator times ---------------------------------------------------------------
def gpu_achieved_flops(hw: HardwareProfile, rows: float, curve_name: str = "gpu_gemm"
                       ) -> float:
    """P_g(rows): GEMM FLOP/s at `rows` rows from the profile's curve `curve_name` (an
    operator's `curve`: 'gpu_gemm', or the grouped experts' where the profile measured it, else
    'gpu_gemm'), capped at the peak; the peak without either."""
    peak = hw.gpu.flops(COMPUTE_DTYPE)
    curve = hw.curves.get(curve_name) or hw.curves.get("gpu_gemm")
    return min(curve(rows), peak) if curve is not None and rows > 0 else peak


def gpu_op_time_s(hw: HardwareProfile, op: Operator, kernel_factor: float = 1.0,
                  host_factor: float = 1.0) -> float:
    """t = f_g max(F / P_g(rows), B_hbm / BW_g) + f_h launches * t_launch (P_g from the
    operator's curve: `gpu_achieved_flops`; t_launch the measured seconds per operation of the
    operator's launch block where the profile has them, else op_overhead_s:
    GPUTier.block_op_s); the CPU attention
    hand-off (HANDOFF_OP) t = f_h hand-offs * t_handoff. Where stages overlap, f_g is the GPU's
    interference factor and f_h the launching thread's (`gpu_factors`); 1 alone."""
    if op.name == HANDOFF_OP:
        return host_factor * op.launches * hw.gpu.attention_handoff_s
    compute_s = op.flops / gpu_achieved_flops(hw, op.rows, op.curve)
    memory_s = op.gpu_bytes / hw.gpu.hbm_bandwidth_bps
    return (kernel_factor * max(compute_s, memory_s)
            + host_factor * op.launches * hw.gpu.block_op_s(op.host_block))


def staged_pipeline(hw: HardwareProfile, staged: bool) -> HardwareProfile:
    """`hw` with the staged calibration's GPU-stage factor (interference.pipeline_staged) as
    interference.pipeline where the policy stages weights through the copy thread and the
    profile measured it: the copy's memmove threads and the link thread take the GIL and cores
    from the launching thread. (H200 machine, 2026-12-03: the two calibrations measured 1.265
    unstaged and 1.237 staged, so staging did not slow that run's GPU stage; the staged
    benchmark runs of micro-batches of 32 and 48 took about 1.87x their solo GPU stage:
    benchmarks/results/h200_2026-12-03b/README.md.)"""
    inter = hw.interference
    if staged and inter.pipeline_staged:
        return replace(hw, interference=replace(inter, pipeline=inter.pipeline_staged))
    return hw


def one_micro_batch(hw: HardwareProfile, factors: dict[str, float]
                    ) -> tuple[HardwareProfile, dict[str, float]]:
    """The profile and stage factors of a cgopipe layer of one decode micro-batch: its GPU
    stage and its CPU attention wait for each other (pre-attention, attention, post-attention,
    then the next layer), so neither runs beside the other; only the weight stream (link and
    copy threads) runs beside them. The GPU stage keeps its solo speed (factors 1: the
    calibration and the microbenchmark measure it beside CPU attention) and so does CPU
    attention (its factor is measured beside the GPU stage's launches and the link)."""
    inter = replace(hw.interference, gpu=1.0, launch=1.0, pipeline=1.0, pipeline_staged=1.0)
    return replace(hw, interference=inter), {**factors, "cpu_attn": 1.0}


def gpu_factors(hw: HardwareProfile) -> tuple[float, float]:
    """(f_g, f_h) of an overlapped schedule: the GPU stage's kernels are slowed by the GPU's
    interference factor, its host work (launches, hand-offs) by the launching thread's, which
    `hrm profile` times on the interference benchmark's GPU thread (Interference.launch); a
    profile without it takes the GPU's factor for both (H200 machine, 2026-12-01, fourth
    session: in the pipeline the launching thread's work took 1.23-1.46x its solo model on
    four leases, whose GPU factors, measured with a GEMM behind 64 launches, were 1.40-1.67).
    Slowing the host work alone, the kernels at their solo speed, was tried on 2026-12-02 and
    rejected: 5.1% against 7.9% MAPE on the lease it was chosen on, 12.7% against 8.3% on the
    next (benchmarks/results/h200_2026-12-02/).

    Where the profile calibrated the executor's own pipeline (interference.pipeline: its decode
    GPU stage measured over `gpu_stage_solo_s`), that one factor slows kernels and host work
    alike: over seven leases of 2026-12-02 the launch-bound layers took 1.09-1.53x their solo
    model, while the microbenchmark's factors said 1.38-1.82x and did not follow them
    (benchmarks/results/h200_2026-12-02c/)."""
    inter = hw.interference
    if inter.pipeline:
        return inter.pipeline, inter.pipeline
    return inter.gpu, inter.launch or inter.gpu


def cpu_op_time_s(hw: HardwareProfile, op: Operator) -> float:
    """t = max(F / P_c, t_kv): curve 'cpu_attention' (KV bytes/s vs KV bytes of one call, one
    micro-batch) over the KV the op reads (its `link_bytes`), else all its DRAM bytes / DRAM
    bandwidth."""
    curve = hw.curves.get("cpu_attention")
    if curve is not None:
        memory_s = op.launches * curve.time_s(op.link_bytes / op.launches)
    else:
        memory_s = op.cpu_bytes / hw.cpu.dram_bandwidth_bps
    return max(op.flops / hw.cpu.peak_flops, memory_s)


def link_bps(hw: HardwareProfile, direction: str, copy_bytes: float) -> float:
    """Pinned copy rate (bytes/s) for copies of `copy_bytes`: curve 'h2d' when present (D2H takes
    the same size-dependence scaled to its own peak), else the pinned peak."""
    peak = hw.link.h2d_pinned_bps if direction == "h2d" else hw.link.d2h_pinned_bps
    curve = hw.curves.get("h2d")
    if curve is None:
        return peak
    efficiency = curve(copy_bytes) / curve.peak
    return efficiency * (curve.peak if direction == "h2d" else peak)


def allreduce_time_s(hw: HardwareProfile, op: Operator) -> float:
    """t = calls * t_lat + B_sent / BW_bus: `op.link_bytes` are the bytes one GPU sends in the
    ring (2 (G - 1) / G of the reduced bytes), `op.launches` the calls."""
    ic = hw.interconnect
    return op.launches * ic.allreduce_latency_s + op.link_bytes / ic.allreduce_bus_bps


def transfer_time(hw: HardwareProfile, op: Operator) -> Affine:
    """Seconds to move `op` over the link, scaled by the fraction that is not GPU-resident:
    routed expert weights by (1 - r_w), KV by (1 - r_c).

    Weight pages are queued back to back (a few in flight), so their per-copy latency overlaps
    and the stream moves at the bulk pinned rate B_pinned (measured on the GPU machine: 2.82 GB
    per layer in 16 MiB pages at 54.3 GB/s against 55.4 GB/s for one 1 GiB copy); the page size
    matters only on the staging path (`_stage_sums`). A CPU KV cache read by GPU attention
    is gathered by the launching thread into pinned memory ('kv_gather', on the GPU stage:
    `_stage_of`), then crosses in one DMA per tensor ('kv_h2d', at the bulk pinned rate on the
    link; in cgopipe the compute stream also waits for it, `_stage_sums`), both over whole
    blocks (executor/kv_cache.py `gather_host`). The gather runs at the profile's kv_gather_bps
    (KVCache.gather_host itself, measured in bytes copied), else at the pageable -> pinned
    memcpy rate, else at the pageable H2D rate. Other copies take the rate of their size (curve
    'h2d')."""
    if op.name == "weight_h2d":
        return one_minus(op.link_bytes / hw.link.h2d_pinned_bps, "r_w")
    if op.name == "kv_gather":
        gather_bps = (hw.link.kv_gather_bps or hw.link.pageable_to_pinned_bps
                      or hw.link.h2d_pageable_bps)
        return one_minus(op.link_bytes / gather_bps, "r_c")
    if op.name == "kv_h2d":
        return one_minus(op.link_bytes / hw.link.h2d_pinned_bps, "r_c")
    seconds = op.link_bytes / link_bps(hw, op.device, op.link_bytes / op.launches)
    if op.name.startswith("kv_"):
        return one_minus(seconds, "r_c")
    return Affine(const=seconds)


# ---- the cost terms of one discrete choice ---------------------------------------------------
@dataclass(frozen=True)
class CostTerms:
    """All cost and memory terms of a policy's discrete choices (N, mu, attention devices,
    schedule, dtypes, page size), affine in (r_w, r_c, o). Stage times are per decoder layer of
    each kind ('moe', 'dense') for the whole batch, before interference."""

    policy: Policy
    gen_len: int
    layer_counts: dict[str, int]
    decode_stages: dict[str, dict[str, Affine]]
    prefill_stages: dict[str, dict[str, Affine]]
    #: added once per decode step (LM head) / once per prefill (LM head, first layer's weights,
    #: pipeline fill)
    decode_extra_s: Affine
    prefill_extra_s: Affine
    #: interference factor of each stage (1 in serial schedules)
    factors: dict[str, float]
    overlapped: bool
    #: o >= overflow_bytes, o >= 0; None when everything can be pinned
    overflow_bytes: Affine | None
    gpu_memory: dict[str, dict[str, Affine]]   # phase -> component -> bytes
    cpu_memory: dict[str, Affine]
    pinned_memory: dict[str, Affine]
    gpu_capacity_bytes: float
    cpu_capacity_bytes: float
    #: the profile the stage times were built with (`staged_pipeline`: its GPU-stage factor
    #: may be the staged calibration's), for callers that build their own operator mix
    hardware: HardwareProfile
    #: all-reduce seconds (included in the GPU stage) per layer, phase -> kind; 0 with one GPU
    comm_s: dict[str, dict[str, float]] = field(default_factory=dict)
    #: cgopipe: one decode micro-batch's chain, the fill and drain at each step boundary
    decode_fill_s: Affine = field(default_factory=Affine)
    #: the staging buffers' exact bytes at r_w (`expert_staging_bytes`, a step function of r_w;
    #: None where only the bound is known), for the footprint; gpu_memory holds its affine upper
    #: bound, which plans and the MILP use
    staging_bytes_at: Callable[[float], float | None] | None = None

    def overflow(self, r_w: float) -> float:
        """o = max(0, overflow_bytes(r_w)): bytes of offloaded weights that cannot be pinned."""
        return 0.0 if self.overflow_bytes is None else max(0.0, self.overflow_bytes(r_w, 0.0))

    def layer_time_s(self, stages: dict[str, Affine], r_w: float, r_c: float) -> float:
        o = self.overflow(r_w)
        return schedule_layer_s(interfered({s: term(r_w, r_c, o) for s, term in stages.items()},
                                           self.factors), self.overlapped)

    def filled_layer_counts(self, num_micro_batches: int | None = None) -> dict[str, float]:
        """The layer counts of the filled pipeline's sum (`decode_step_s`): every layer's
        non-weight-stream maximum U, less 1 / n_ub of the first layer's, whose max already
        holds the fill's own micro-batch: fill + (l - 1 / n_ub) U. With one micro-batch, U is
        its chain and a step is l chains; with two whose CPU attention c binds (GPU work p + q
        each), one layer takes p + 2c + q, as the chain p + c + q plus (1 - 1/2) 2c says.
        n_ub is the policy's, or `num_micro_batches` (a continuous pass's own)."""
        first = "moe" if "moe" in self.layer_counts else "dense"
        share = 1.0 / (num_micro_batches or self.policy.num_micro_batches)
        return {kind: count - (share if kind == first else 0.0)
                for kind, count in self.layer_counts.items()}

    def decode_step_s(self, r_w: float, r_c: float) -> float:
        """lm head + max(sum layer_s, fill + the layers' non-weight-stream maxima:
        `filled_layer_counts`)."""
        o = self.overflow(r_w)
        layers = sum(count * self.layer_time_s(self.decode_stages[kind], r_w, r_c)
                     for kind, count in self.layer_counts.items())
        if self.overlapped:
            filled = self.decode_fill_s(r_w, r_c, o) + sum(
                count * self.layer_time_s(without_weight_stream(self.decode_stages[kind]),
                                          r_w, r_c)
                for kind, count in self.filled_layer_counts().items())
            layers = max(layers, filled)
        return self.decode_extra_s(r_w, r_c, o) + layers

    def prefill_s(self, r_w: float, r_c: float) -> float:
        o = self.overflow(r_w)
        return self.prefill_extra_s(r_w, r_c, o) + sum(
            count * self.layer_time_s(self.prefill_stages[kind], r_w, r_c)
            for kind, count in self.layer_counts.items())

    def gpu_need_bytes(self, r_w: float, r_c: float) -> float:
        """Peak GPU bytes over the phases."""
        o = self.overflow(r_w)
        return max(sum(term(r_w, r_c, o) for term in comps.values())
                   for comps in self.gpu_memory.values())

    def cpu_need_bytes(self, r_w: float, r_c: float) -> float:
        o = self.overflow(r_w)
        return sum(term(r_w, r_c, o) for term in self.cpu_memory.values())

    def fits(self, r_w: float, r_c: float) -> bool:
        return (self.gpu_need_bytes(r_w, r_c) <= self.gpu_capacity_bytes
                and self.cpu_need_bytes(r_w, r_c) <= self.cpu_capacity_bytes)

    def time_per_token_s(self, r_w: float, r_c: float) -> float:
        """The objective: (prefill_s + (n - 1) step_s) / (N n), seconds per generated token."""
        total_s = self.prefill_s(r_w, r_c) + (self.gen_len - 1) * self.decode_step_s(r_w, r_c)
        return total_s / (self.policy.batch_size * self.gen_len)


def _stage_sums(hw: HardwareProfile, ops: list[Operator], page_bytes: float,
                overflow_per_layer: float, num_gpus: int = 1, overlapped: bool = True,
                launcher_stage: bool = False) -> dict[str, Affine]:
    """The stage times of one layer from its operators. `overflow_per_layer` is the share of the
    total pinned overflow o that one layer streams (1 / l_moe; 0 for dense layers): the shared
    CPU stages it all, each of the `num_gpus` links carries 1/G of it.

    The GPU stage is t_gpu = f_g K + f_h H, kernels K plus the launching thread's host work H
    (`gpu_op_time_s`): where the thread reads the routing's row counts (the per-expert loop,
    one sync per micro-batch) it waits for the kernels queued before, so the two add up. With
    `launcher_stage` (decode layers whose experts run as grouped GEMMs, which read nothing back)
    the thread queues ahead of the kernels, and H is a stage of its own:
        t_gpu = f_g K,  t_launcher = f_h H,  both in the layer's max()."""
    stages = {s: Affine() for s in STAGES}
    factors = gpu_factors(hw) if overlapped else (1.0, 1.0)
    f_g, f_h = factors
    for op in ops:
        stage = _stage_of(op, overlapped)
        if op.name == "kv_h2d" and overlapped:
            # the gathered KV's DMA is queued on the compute stream, which waits for it, while
            # the weight pages cross on their own stream: the two share the link
            stages["gpu"] += transfer_time(hw, op).scaled(STREAMS_SHARING_THE_LINK)
        if stage == "gpu" and launcher_stage and op.name == "kv_gather":
            stages["launcher"] += _op_time(hw, op)   # the launching thread's memcpy
        elif stage == "gpu" and launcher_stage:
            stages["gpu"] += _op_time(hw, op, (f_g, 0.0))
            stages["launcher"] += _op_time(hw, op, (0.0, f_h))
        else:
            stages[stage] += _op_time(hw, op, factors)
    if overflow_per_layer:
        p2p_bps = hw.link.pageable_to_pinned_bps
        if p2p_bps > 0:
            # the copy thread memcpys the staged chunks while the pinned ones cross, so the
            # weight stream is max((p + o) / B_pinned, o / B_copy): h2d already carries o
            stages["copy_thread"] += Affine(overflow=overflow_per_layer / p2p_bps)
            if any(op.device == "cpu" for op in ops):
                stages["cpu_attn"] += Affine(
                    overflow=2.0 * overflow_per_layer / hw.cpu.dram_bandwidth_bps)
        else:   # no staging thread measured: unpinned bytes go over the link pageable
            extra = 1.0 / hw.link.h2d_pageable_bps - 1.0 / link_bps(hw, "h2d", page_bytes)
            stages["h2d"] += Affine(overflow=overflow_per_layer / num_gpus * max(extra, 0.0))
    return stages


def gpu_stage_solo_s(model: ModelSpec, hw: HardwareProfile, workload: Workload,
                     policy: Policy) -> float:
    """Seconds of one MoE decode layer's GPU stage with nothing beside it: its kernels K plus
    the launching thread's host work H (`gpu_op_time_s` with factors 1), what
    interference.pipeline is measured against."""
    ops = _layer_ops(model, workload, policy, "decode", "moe")
    r_w, r_c = policy.weights_gpu_fraction, policy.kv_gpu_fraction
    return sum(_op_time(hw, op)(r_w, r_c) for op in ops if _stage_of(op) == "gpu")


def grouped_layer_share(model: ModelSpec, policy: Policy, phase: str) -> float:
    """The fraction of the layers whose routed experts run as grouped GEMMs: all of them in
    decode with expert_kernel='grouped' (a layer split between resident and streamed experts is
    staged whole: hrm.policy.staged_experts), none otherwise."""
    grouped = phase == "decode" and policy.expert_kernel == "grouped" and model.num_experts > 0
    return 1.0 if grouped else 0.0


def resident_copy_s(model: ModelSpec, hw: HardwareProfile, policy: Policy) -> Affine:
    """Seconds per MoE layer of the weights stream's copy of the resident experts into the
    whole-layer staging buffer (expert_kernel='grouped': hrm.policy.staged_experts), GPU memory
    to GPU memory: r_w B_layer bytes read and written at the HBM bandwidth. Exact while every
    resident expert sits in a split layer (r_w <= (n_e - 1) / n_e); above, the layers holding
    all n_e experts copy nothing and this over-counts."""
    if policy.expert_kernel != "grouped" or not model.num_moe_layers:
        return Affine()
    layer_bytes = model.routed_expert_bytes_per_layer(policy.weight_dtype)
    return Affine(r_w=2.0 * layer_bytes / hw.gpu.hbm_bandwidth_bps)


def _layer_ops(model: ModelSpec, workload: Workload, policy: Policy, phase: str,
               kind: str) -> list[Operator]:
    return layer_operators(
        model, micro_batch_size=policy.micro_batch_size,
        num_micro_batches=policy.num_micro_batches, context_len=workload.mean_decode_context,
        phase=phase, layer_kind=kind, weight_dtype=policy.weight_dtype, kv_dtype=policy.kv_dtype,
        attn_device=policy.attn_decode_device if phase == "decode" else policy.attn_prefill_device,
        prompt_len=workload.prompt_len, num_gpus=policy.num_gpus,
        parallelism=policy.parallelism, grouped_share=grouped_layer_share(model, policy, phase),
        padded_context_len=workload.padded_decode_context(policy.micro_batch_size))


def _op_time(hw: HardwareProfile, op: Operator,
             gpu_factors: tuple[float, float] = (1.0, 1.0)) -> Affine:
    """An operator's seconds on its resource; `gpu_factors` (f_g, f_h: interference) slow what
    runs on the GPU stage: kernels and all-reduces by f_g, the launching thread's launches and
    hand-offs by f_h. The KV gather for GPU attention, a memcpy the profile times with the
    executor's own code, is not slowed: in the pipeline it took its solo time (H200 machine,
    2026-12-02, fourth session: 2.30 ms per 64-sequence micro-batch in cgopipe at N=1024 and
    2.33 ms in the layerwise schedule, 2.20 ms alone; benchmarks/results/h200_2026-12-02d/)."""
    kernel, host = gpu_factors
    if op.device == "gpu":
        return Affine(const=gpu_op_time_s(hw, op, kernel, host))
    if op.device == "comm":
        return Affine(const=kernel * allreduce_time_s(hw, op))
    if op.device == "cpu":
        return Affine(const=cpu_op_time_s(hw, op))
    return transfer_time(hw, op)


def _chain_s(hw: HardwareProfile, ops: list[Operator], num_micro_batches: int,
             factors: dict[str, float]) -> Affine:
    """One micro-batch's dependent chain through a layer (pre-attention, q/k/v D2H, attention,
    output H2D, post-attention; everything but the weight stream): a layer cannot take less,
    and one chain per step is the pipeline's fill and drain."""
    return affine_sum([_op_time(hw, op, gpu_factors(hw)).scaled(factors[_stage_of(op)])
                       for op in ops if op.name != "weight_h2d"]).scaled(1.0 / num_micro_batches)


#: the link's stages, slowed by the CPU attention reading DRAM beside them (`interfered`)
LINK_STAGES = ("h2d", "d2h")
#: the factors' key of the copy thread beside all three stages (`interfered`); "copy_thread"
#: holds its factor beside the link alone
COPY_BESIDE_ALL = "copy_thread_beside_all"


def interfered(stages: dict[str, Any], factors: dict[str, float]) -> dict[str, Any]:
    """Stage times (seconds or Affine terms) with interference: f_s t_s for the GPU and CPU
    attention, whose factors the profile measured with the other stages running throughout;
    the link's DMA reads host DRAM and is slowed only while CPU attention reads it too:
        t_link' = t_link + (f_link - 1) t_cpu_attn
    (no more than f_link t_link while CPU attention is the shorter stage). H200 machine,
    2026-12-01 (fourth session): f_link = 1.09 measured against continuous CPU attention, while
    the link-bound pipeline streamed its weights at the pinned rate alone, 55 GB/s, with CPU
    attention busy a fifth of each layer.

    The copy thread's memcpy runs beside the link throughout (the profile's factor f_cl,
    Interference.staging_copy_link) and beside all three stages while CPU attention runs
    (f_c, Interference.staging_copy): at 1 / f_c of its solo pace for the f_cpu t_cpu_attn
    attention takes, 1 / f_cl otherwise, so
        t_copy' = f_cl t_copy + (1 - f_cl / f_c) f_cpu t_cpu_attn
    (for a copy that outlasts attention; where it is shorter the term stays below the CPU
    stage and does not bind). H200 machine, 2026-12-03, first lease: f_cl = 1.03, f_c = 1.40
    put the copy of 0.83 GB a layer at 49.8 ms beside 33.8 ms of attention; the executor's copy
    threads were busy 51.6 and 44.8 ms a layer (benchmarks/results/h200_2026-12-03b/call1)."""
    out = {s: t * factors.get(s, 1.0) for s, t in stages.items()}
    cpu = stages.get("cpu_attn")
    if cpu is not None:
        for s in LINK_STAGES:
            if s in stages:
                out[s] = stages[s] + cpu * (factors.get(s, 1.0) - 1.0)
        copy = stages.get("copy_thread")
        if copy is not None and copy != (Affine() if isinstance(copy, Affine) else 0.0):
            f_cl = factors.get("copy_thread", 1.0)
            f_c = max(factors.get(COPY_BESIDE_ALL, f_cl), f_cl)
            out["copy_thread"] = copy * f_cl + cpu * (factors.get("cpu_attn", 1.0)
                                                      * (1.0 - f_cl / f_c))
    return out


def schedule_layer_s(times: dict[str, float], overlapped: bool) -> float:
    """A layer's seconds from its stage times (interference applied): the slowest stage in
    cgopipe; in serial schedules the stages one after another, but the weight stream's two legs
    (H2D, copy thread) overlap chunk by chunk (the staging ring)."""
    if overlapped:
        return max(times.values(), default=0.0)
    stream = [t for s, t in times.items() if s in WEIGHT_STREAM_STAGES]
    return sum(without_weight_stream(times).values()) + max(stream, default=0.0)


def without_weight_stream(stages: dict[str, Any]) -> dict[str, Any]:
    """The stages (terms or seconds) a step boundary's fill and drain idles: all but
    WEIGHT_STREAM_STAGES."""
    return {s: a for s, a in stages.items() if s not in WEIGHT_STREAM_STAGES}


def _stage_of(op: Operator, overlapped: bool = True) -> str:
    """The resource an operator occupies; all-reduces run on the GPU stream, and the host's KV
    gather for GPU attention (`transfer_time`) on the thread that launches the GPU's work. The
    gathered KV's DMA shares the link with the weight stream in cgopipe (where the compute also
    waits for it: `_stage_sums` adds it to the GPU stage too); in the serial schedules it runs
    between the layer's weights and its compute, which waits for it, so it counts with the
    GPU's time there."""
    if op.name == "kv_gather" or (op.name == "kv_h2d" and not overlapped):
        return "gpu"
    return {"cpu": "cpu_attn", "comm": "gpu"}.get(op.device, op.device)


def layer_stage_sums(hw: HardwareProfile, ops: list[Operator], page_bytes: float,
                     overflow_per_layer: float, overlapped: bool) -> dict[str, Affine]:
    """Public `_stage_sums`, for callers that build their own operator mix (hrm.continuous)."""
    return _stage_sums(hw, ops, page_bytes, overflow_per_layer, overlapped=overlapped)


def micro_batch_chain_s(hw: HardwareProfile, ops: list[Operator], num_micro_batches: int,
                        factors: dict[str, float]) -> Affine:
    """Public `_chain_s`, for callers that build their own operator mix (hrm.continuous)."""
    return _chain_s(hw, ops, num_micro_batches, factors)


def _with_kv_dtype_curve(hw: HardwareProfile, kv_dtype: str) -> HardwareProfile:
    """Use the CPU attention curve measured for the policy's KV dtype ('cpu_attention_fp32')
    when the profile has one; 'cpu_attention' otherwise."""
    curve = hw.curves.get(f"cpu_attention_{kv_dtype}")
    return hw if curve is None else replace(hw, curves={**hw.curves, "cpu_attention": curve})


def cost_terms(model: ModelSpec, hw: HardwareProfile, workload: Workload,
               policy: Policy) -> CostTerms:
    """The affine cost and memory terms of `policy`'s discrete choices (its r_w, r_c are not
    used)."""
    _check_gpus(model, hw, policy.num_gpus)
    hw = _with_kv_dtype_curve(hw.per_gpu(policy.num_gpus), policy.kv_dtype)
    n_ub, mu = policy.num_micro_batches, policy.micro_batch_size
    page = float(policy.weight_page_bytes)
    counts = {kind: count for kind, count in
              (("moe", model.num_moe_layers), ("dense", model.num_dense_layers)) if count}
    memory = _memory_terms(model, hw, workload, policy)
    overflow_expr = memory.pop("overflow")
    # a policy that stages weights even with none on the GPU takes the staged GPU-stage factor
    # at every r_w (the terms stay affine; r_w is small where GPU memory is)
    hw = staged_pipeline(hw, overflow_expr is not None and overflow_expr(0.0, 0.0) > 0)
    per_layer = {"moe": 1.0 / model.num_moe_layers if overflow_expr else 0.0, "dense": 0.0}

    ops = {(phase, k): _layer_ops(model, workload, policy, phase, k)
           for phase in ("decode", "prefill") for k in counts}
    g = policy.num_gpus
    overlapped = policy.schedule == "cgopipe"
    # a model whose MoE layers run grouped: no sync holds the launching thread back
    launcher = {"moe": overlapped and grouped_layer_share(model, policy, "decode") == 1.0,
                "dense": False}
    inter = hw.interference
    # the GPU stage's factors are applied per operator (`_stage_sums`, `_op_time`)
    factors = ({"h2d": inter.link, "d2h": inter.link, "gpu": 1.0, "launcher": 1.0,
                "cpu_attn": inter.cpu_attention, "copy_thread": inter.staging_copy_link,
                COPY_BESIDE_ALL: inter.staging_copy, "chain": 1.0}
               if overlapped else dict.fromkeys(STAGES, 1.0))
    if overlapped and n_ub == 1:
        hw, factors = one_micro_batch(hw, factors)
    decode = {k: _stage_sums(hw, ops["decode", k], page, per_layer[k], g, overlapped,
                             launcher[k]) for k in counts}
    prefill = {k: _stage_sums(hw, ops["prefill", k], page, per_layer[k], g, overlapped)
               for k in counts}
    if "moe" in counts:   # the weights stream's copy of the resident experts (grouped kernel)
        for stages in (decode["moe"], prefill["moe"]):
            stages["h2d"] += resident_copy_s(model, hw, policy)
    comm = {phase: {k: sum(allreduce_time_s(hw, op) for op in ops[phase, k]
                           if op.device == "comm") for k in counts}
            for phase in ("decode", "prefill")}
    head_s = sum(gpu_op_time_s(hw, op) for op in head_operators(
        model, micro_batch_size=mu, num_micro_batches=n_ub, weight_dtype=policy.weight_dtype))
    decode_extra, prefill_extra, decode_fill = Affine(const=head_s), Affine(const=head_s), Affine()
    if overlapped:
        for k in counts:
            decode[k]["chain"] = _chain_s(hw, ops["decode", k], n_ub, factors)
            prefill[k]["chain"] = _chain_s(hw, ops["prefill", k], n_ub, factors)
        kind = "moe" if "moe" in counts else "dense"
        decode_fill = decode[kind]["chain"]
        # the first layer's weights arrive before any expert runs, then one micro-batch fills
        first_weights = affine_sum([transfer_time(hw, op) for op in ops["prefill", kind]
                                    if op.name == "weight_h2d"])
        prefill_extra += first_weights + prefill[kind]["chain"]
    return CostTerms(
        policy=policy, gen_len=workload.gen_len, layer_counts=counts, decode_stages=decode,
        prefill_stages=prefill, decode_extra_s=decode_extra, prefill_extra_s=prefill_extra,
        factors=factors, overlapped=overlapped, overflow_bytes=overflow_expr,
        decode_fill_s=decode_fill,
        gpu_memory={"prefill": memory["gpu_prefill"], "decode": memory["gpu_decode"]},
        cpu_memory=memory["cpu"], pinned_memory=memory["pinned"],
        gpu_capacity_bytes=GPU_USABLE_FRACTION * hw.gpu.memory_bytes,
        cpu_capacity_bytes=CPU_USABLE_FRACTION * hw.cpu.memory_bytes, comm_s=comm,
        staging_bytes_at=partial(expert_staging_bytes, model, policy), hardware=hw)


def _check_gpus(model: ModelSpec, hw: HardwareProfile, num_gpus: int) -> None:
    """The machine has `num_gpus` GPUs with a known interconnect, and the attention heads split
    evenly over them."""
    try:
        hw.check_gpus(num_gpus)
    except HardwareProfileError as exc:
        raise PolicyError(str(exc)) from None
    heads = [model.num_heads] + ([] if model.is_mla else [model.num_kv_heads])
    if any(h % num_gpus for h in heads):
        raise PolicyError(f"{model.name}: {model.num_heads} attention heads "
                          f"({model.num_kv_heads} KV heads) do not split evenly over "
                          f"{num_gpus} GPUs")


# ---- memory ----------------------------------------------------------------------------------
def _memory_terms(model: ModelSpec, hw: HardwareProfile, workload: Workload,
                  policy: Policy) -> dict[str, Any]:
    """Memory components (bytes, affine in r_w, r_c, o) of each phase, and the overflow term.
    GPU terms are one GPU's: its share of the weights and KV (`gpu_shares`); its activations
    are counted whole (an upper bound). CPU terms are the machine's: G processes each keep
    their own staging ring and, in prefill, their own copy of the hidden states."""
    n, mu, n_ub = policy.batch_size, policy.micro_batch_size, policy.num_micro_batches
    g = policy.num_gpus
    dense_share, expert_share, kv_share = gpu_shares(model, policy)
    act = dtype_bytes(ACT_DTYPE)
    h1, k = model.hidden_size, model.top_k
    routed_bytes = model.routed_expert_bytes(policy.weight_dtype)
    layer_bytes = model.routed_expert_bytes_per_layer(policy.weight_dtype)
    kv_token_layer = kv_bytes_per_token_layer(model, policy.kv_dtype)
    # the KV slots as the executor sizes them (Workload.slot_capacities), in whole blocks; with
    # GPU attention the GPU holds the longest r_c of them, bounded by r_c N (s_max + n) tokens
    kv_token = model.kv_bytes_per_token(policy.kv_dtype)
    kv_bytes = sum(whole_block_tokens(c) for c in workload.slot_capacities(n)) * kv_token
    kv_gpu_bytes = n * whole_block_tokens(workload.max_seq_len) * kv_token
    prefill_tokens = workload.prefill_tokens_per_micro_batch(mu)
    qkv, out = qkv_elements_per_token(model), attn_out_elements_per_token(model)
    widest_ffn = max(2 * model.expert_intermediate_size * k, 2 * model.shared_intermediate_size,
                     2 * model.dense_intermediate_size)
    logits = mu * model.vocab_size * LOGIT_BYTES

    sharded_dense = model.num_layers * model.attention_params() + \
        model.num_moe_layers * model.shared_expert_params() + \
        model.num_dense_layers * model.dense_mlp_params()
    dense_bytes = model.dense_bytes(policy.weight_dtype) - \
        sharded_dense * dtype_bytes(policy.weight_dtype) * (1.0 - dense_share)
    weights = {"dense weights": Affine(const=dense_bytes),
               "resident experts": Affine(r_w=routed_bytes * expert_share)}
    if model.num_moe_layers:
        # b buffers of a layer's streamed experts; the executor keeps whole experts resident,
        # so a layer may stream one expert (share) more than (1 - r_w) of its bytes
        expert_rounding = model.expert_bytes(policy.weight_dtype) * (
            1.0 if policy.parallelism == "ep" and g > 1 else expert_share)
        weights[STAGING_TERM] = (
            Affine(const=layer_bytes) if policy.expert_kernel == "grouped"  # whole layers
            else one_minus(layer_bytes * expert_share, "r_w") + Affine(const=expert_rounding)
        ).scaled(policy.staging_buffers)
    kv_gpu = ({"KV cache": Affine(r_c=kv_gpu_bytes * kv_share)}
              if policy.attn_decode_device == "gpu" else {})

    # decode: the batch's residual stream + one micro-batch's activations + logits
    decode_ws = n * h1 * act + mu * (3 * h1 + qkv + out + widest_ffn) * act + logits
    gpu_decode = {**weights, **kv_gpu, "activations": Affine(const=decode_ws)}
    if policy.attn_decode_device == "gpu":   # double-buffered KV of a micro-batch from the CPU
        gpu_decode["KV staging"] = one_minus(
            2.0 * mu * workload.max_seq_len * kv_token_layer * kv_share, "r_c")
    # prefill: the largest micro-batch (its mu longest prompts), as the executor sizes it
    prefill_ws = prefill_workspace_bytes(model, policy, prefill_tokens, workload.max_seq_len, act)
    gpu_prefill = {**weights, **kv_gpu, "activations": Affine(const=prefill_ws)}

    # pinned CPU buffers, all allocated up front (`pinned_slot_bytes`), by each of the G
    # processes for its 1/G of the heads
    buffers = g * sum(pinned_slot_bytes(
        model, mu, n_ub, prefill_tokens, policy.attn_decode_device == "cpu",
        dtype_bytes(policy.kv_dtype), act, head_share=1.0 / g).values())
    finite_pin = math.isfinite(hw.link.pinned_max_bytes)
    ring = (g * STAGING_RING_SLOTS
            * pinned_allocation_bytes(STAGING_SLOT_PAGES * policy.weight_page_bytes)
            if finite_pin and routed_bytes else 0.0)
    # the weights alone count against the pinned budget (executor.weights.pin_plan)
    overflow = (Affine(const=routed_bytes - hw.link.pinned_max_bytes, r_w=-routed_bytes)
                if finite_pin and routed_bytes else None)
    cpu = {"offloaded experts": one_minus(routed_bytes, "r_w"),
           "KV cache": one_minus(kv_bytes, "r_c"),
           "activation buffers": Affine(const=buffers)}
    if ring:
        cpu["staging ring"] = Affine(const=ring)
    pinned = {"pinned experts": one_minus(routed_bytes, "r_w") + Affine(overflow=-1.0),
              "activation buffers": Affine(const=buffers)}
    if ring:
        pinned["staging ring"] = Affine(const=ring)
    return {"gpu_decode": gpu_decode, "gpu_prefill": gpu_prefill, "cpu": cpu, "pinned": pinned,
            "overflow": overflow}


def pinned_allocation_bytes(request_bytes: float) -> float:
    """Host memory (bytes) that a pinned tensor of `request_bytes` takes: torch's caching host
    allocator (`pin_memory=True`) rounds each allocation up to a power of two, and the whole
    block is page-locked, so resident (measured: benchmarks/diag_pinned_memory.py)."""
    return float(2 ** math.ceil(math.log2(request_bytes))) if request_bytes > 1 else request_bytes


def pinned_slot_bytes(model: ModelSpec, micro_batch_size: int, num_micro_batches: int,
                      prefill_tokens: int, cpu_attention: bool, kv_elem_bytes: float,
                      act_bytes: float, head_share: float = 1.0) -> dict[str, float]:
    """One process's pinned slots per micro-batch, each rounded up by torch's pinned allocator
    (`pinned_allocation_bytes`), the one formula the cost model and the executor's memory plan
    share: with more than one micro-batch, its `prefill_tokens` hidden states between prefill
    layers ("prefill parking"); with CPU decode attention, its q/k/v in the KV dtype and its
    attention output for `head_share` of the heads ("attention link")."""
    mu, n_ub = micro_batch_size, num_micro_batches
    slots = {}
    if n_ub > 1 and prefill_tokens:
        slots["prefill parking"] = n_ub * pinned_allocation_bytes(
            prefill_tokens * model.hidden_size * act_bytes)
    if cpu_attention:
        slots["attention link"] = n_ub * (
            pinned_allocation_bytes(mu * qkv_elements_per_token(model) * head_share
                                    * kv_elem_bytes)
            + pinned_allocation_bytes(mu * attn_out_elements_per_token(model) * head_share
                                      * act_bytes))
    return slots


#: most tokens an expert's FFN runs at once (executor.layers.routed_experts): bounds its
#: intermediate activations (3 h2 per row) whatever the routing; large enough that the GEMMs run
#: at full speed (the H200's expert GEMM reaches half its peak at about 380 rows)
EXPERT_CHUNK_ROWS = 4096


def prefill_workspace_bytes(model: ModelSpec, policy: Policy, prefill_tokens: int,
                            max_seq_len: int, act_bytes: int) -> float:
    """GPU activation workspace (bytes) of a prefill micro-batch of `prefill_tokens` tokens, the
    one formula the cost model and the executor's memory plan share. Per token: the hidden states
    and their temporaries (6 h1), q/k/v, the expert-sorted copies of the hidden states and outputs
    (2 k h1), the shared experts' intermediate (3 h2_shared); one expert's intermediate (3 h2) for
    at most EXPERT_CHUNK_ROWS rows (the executor runs an expert's tokens in chunks of that many,
    so this holds however unbalanced the routing), or the dense MLP's for every token; plus mu
    sequences' logits in fp32 (two copies) and, with GPU decode attention, fp32 scores and one
    micro-batch of K/V for max_seq_len."""
    h1, k = model.hidden_size, model.top_k
    per_token = (6 * h1 + qkv_elements_per_token(model) + 2 * k * h1
                 + 3 * model.shared_intermediate_size)
    ffn = max(3 * model.expert_intermediate_size * min(prefill_tokens, EXPERT_CHUNK_ROWS),
              3 * model.dense_intermediate_size * prefill_tokens)
    logits = 2 * policy.micro_batch_size * model.vocab_size * LOGIT_BYTES
    attention = 0.0
    if policy.attn_decode_device == "gpu":
        attention = policy.micro_batch_size * max_seq_len * (
            model.num_heads * LOGIT_BYTES + 2 * model.num_kv_heads * model.head_dim * act_bytes)
    return (prefill_tokens * per_token + ffn) * act_bytes + logits + attention


def gpu_shares(model: ModelSpec, policy: Policy) -> tuple[float, float, float]:
    """One GPU's share of (attention / shared-expert / dense-MLP weights, routed-expert bytes,
    KV cache) with G = policy.num_gpus: heads 1/G; experts 1/G (tp) or ceil(E/G)/E (ep, the
    GPU with most experts); KV 1/G, or 1 for MLA (its latent is shared by all heads)."""
    g = policy.num_gpus
    experts = (1.0 / g if policy.parallelism == "tp" or not model.num_experts
               else math.ceil(model.num_experts / g) / model.num_experts)
    return 1.0 / g, experts, 1.0 if model.is_mla else 1.0 / g


@dataclass(frozen=True)
class MemoryFootprint:
    """Peak bytes over prefill and decode. `gpu_breakdown` is the breakdown of the peak phase."""

    gpu_bytes: float
    cpu_bytes: float
    pinned_bytes: float
    gpu_breakdown: dict[str, float]
    cpu_breakdown: dict[str, float]
    gpu_capacity_bytes: float = 0.0
    cpu_capacity_bytes: float = 0.0


def expert_staging_bytes(model: ModelSpec, policy: Policy, r_w: float) -> float | None:
    """The b GPU staging buffers (policy staging_buffers) as the executor sizes them
    (executor/weights.py): each holds
    the largest streamed layer, n_e - floor(R / l) experts with R = round(r_w l n_e) resident
    (`hrm.policy.resident_experts_by_layer`), or a whole layer for grouped GEMMs over a split
    layer (`hrm.policy.staged_experts`). None with several GPUs (each rank's shard; the
    affine bound of `_memory_terms` stands)."""
    if policy.num_gpus > 1 or not model.num_moe_layers:
        return None
    resident = resident_experts_by_layer(r_w, model.num_layers, model.num_experts)
    return policy.staging_buffers * model.expert_bytes(policy.weight_dtype) * \
        staged_experts(resident, model.num_experts, policy.expert_kernel)


def _footprint(terms: CostTerms, r_w: float, r_c: float) -> MemoryFootprint:
    """Bytes at (r_w, r_c): the memory terms, with the staging buffers at their exact size."""
    o = terms.overflow(r_w)
    phases = {phase: {name: term(r_w, r_c, o) for name, term in comps.items()}
              for phase, comps in terms.gpu_memory.items()}
    exact = terms.staging_bytes_at(r_w) if terms.staging_bytes_at is not None else None
    if exact is not None:
        for comps in phases.values():
            comps[STAGING_TERM] = exact
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    cpu = {name: term(r_w, r_c, o) for name, term in terms.cpu_memory.items()}
    pinned = sum(term(r_w, r_c, o) for term in terms.pinned_memory.values())
    return MemoryFootprint(
        gpu_bytes=sum(phases[peak_phase].values()), cpu_bytes=sum(cpu.values()),
        pinned_bytes=pinned, gpu_breakdown={f"{k} ({peak_phase})": v
                                            for k, v in phases[peak_phase].items()},
        cpu_breakdown=cpu, gpu_capacity_bytes=terms.gpu_capacity_bytes,
        cpu_capacity_bytes=terms.cpu_capacity_bytes)


def memory_footprint(model: ModelSpec, hw: HardwareProfile, workload: Workload,
                     policy: Policy) -> MemoryFootprint:
    """Peak GPU, CPU and pinned memory of `policy` (bytes)."""
    terms = cost_terms(model, hw, workload, policy)
    return _footprint(terms, policy.weights_gpu_fraction, policy.kv_gpu_fraction)


def breakdown_text(parts: dict[str, float]) -> str:
    return ", ".join(f"{name} {fmt_bytes(v)}" for name, v in
                     sorted(parts.items(), key=lambda kv: -kv[1]) if v > 0)


def gpu_label(num_gpus: int) -> str:
    """' per GPU' when there are several (GPU memory figures are each GPU's)."""
    return " per GPU" if num_gpus > 1 else ""


def check_fits(model: ModelSpec, hw: HardwareProfile, workload: Workload, policy: Policy) -> None:
    """Raise PolicyError naming what does not fit in GPU (per GPU) or CPU memory."""
    mem = memory_footprint(model, hw, workload, policy)
    for tier, need, usable, total, parts in (
            ("GPU" + gpu_label(policy.num_gpus), mem.gpu_bytes, mem.gpu_capacity_bytes,
             hw.gpu.memory_bytes, mem.gpu_breakdown),
            ("CPU", mem.cpu_bytes, mem.cpu_capacity_bytes, hw.cpu.memory_bytes,
             mem.cpu_breakdown)):
        if need > usable * (1.0 + MEMORY_CHECK_TOLERANCE):
            raise PolicyError(
                f"policy needs {need / GiB:.1f} GiB {tier} memory ({breakdown_text(parts)}), "
                f"{usable / GiB:.1f} GiB usable of {total / GiB:.1f} GiB given")


# ---- prediction ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageTimes:
    """One decoder layer (MoE) for the whole batch, seconds; `layer_s` as the schedule runs it
    (interference applied when stages overlap). The stage times are before interference, but
    `gpu_s` holds the GPU stage's own factors, applied per operator (`gpu_factors`)."""

    cpu_attn_s: float
    gpu_s: float
    h2d_s: float
    d2h_s: float
    copy_thread_s: float
    layer_s: float
    #: one micro-batch's dependent path through the layer (cgopipe; 0 in serial schedules)
    chain_s: float = 0.0
    #: the launching thread's host work where it is a stage of its own (`_stage_sums`), else 0
    launcher_s: float = 0.0
    #: all-reduces between the GPUs (part of `gpu_s`: they run on the GPU stream)
    comm_s: float = 0.0

    def by_stage(self) -> dict[str, float]:
        return {"h2d": self.h2d_s, "d2h": self.d2h_s, "cpu_attn": self.cpu_attn_s,
                "gpu": self.gpu_s, "copy_thread": self.copy_thread_s, "chain": self.chain_s,
                "launcher": self.launcher_s}


def _stage_times(terms: CostTerms, stages: dict[str, Affine], r_w: float, r_c: float,
                 comm_s: float = 0.0) -> StageTimes:
    o = terms.overflow(r_w)
    t = {s: term(r_w, r_c, o) for s, term in stages.items()}
    return StageTimes(cpu_attn_s=t["cpu_attn"], gpu_s=t["gpu"], h2d_s=t["h2d"], d2h_s=t["d2h"],
                      copy_thread_s=t["copy_thread"],
                      layer_s=terms.layer_time_s(stages, r_w, r_c), chain_s=t.get("chain", 0.0),
                      comm_s=comm_s, launcher_s=t.get("launcher", 0.0))


@dataclass(frozen=True)
class Prediction:
    """Predicted run of one batch of N sequences (seconds, tokens/s, bytes)."""

    model: str
    hardware: str
    workload: Workload
    policy: Policy
    prefill_s: float
    decode_s: float
    decode_step_s: float
    throughput_tok_s: float
    prefill_layer: StageTimes
    decode_layer: StageTimes
    memory: MemoryFootprint
    bottleneck: str
    bottleneck_slack: float
    pinned_overflow_bytes: float = 0.0
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "model": self.model, "hardware": self.hardware,
            "workload": {"num_seqs": self.workload.num_seqs,
                         "prompt_len": self.workload.prompt_len,
                         "gen_len": self.workload.gen_len,
                         "max_prompt_len": self.workload.max_prompt_len},
            "policy": self.policy.to_dict(),
            "throughput_tok_s": self.throughput_tok_s,
            "prefill_s": self.prefill_s, "decode_s": self.decode_s,
            "decode_step_s": self.decode_step_s,
            "bottleneck": self.bottleneck, "bottleneck_slack": self.bottleneck_slack,
            "gpu_mem_bytes": self.memory.gpu_bytes, "cpu_mem_bytes": self.memory.cpu_bytes,
            "pinned_mem_bytes": self.memory.pinned_bytes,
            "pinned_overflow_bytes": self.pinned_overflow_bytes,
            "gpu_mem_capacity_bytes": self.memory.gpu_capacity_bytes,
            "cpu_mem_capacity_bytes": self.memory.cpu_capacity_bytes,
            "gpu_mem_breakdown": self.memory.gpu_breakdown,
            "cpu_mem_breakdown": self.memory.cpu_breakdown,
            "stages": {"prefill_layer": asdict(self.prefill_layer),
                       "decode_layer": asdict(self.decode_layer)},
            "notes": list(self.notes),
        }


def _bottleneck(terms: CostTerms, layer: StageTimes) -> tuple[str, float]:
    """The stage that binds the decode layer and its ratio to the next-largest stage."""
    scaled = sorted(((t, s) for s, t in interfered(layer.by_stage(), terms.factors).items()),
                    reverse=True)
    (top_s, top), (second_s, _) = scaled[0], scaled[1]
    slack = top_s / second_s if second_s > 0 else math.inf
    return BOTTLENECK_NAMES[top], slack


def evaluate(terms: CostTerms, model: ModelSpec, hw: HardwareProfile, workload: Workload,
             r_w: float, r_c: float) -> Prediction:
    """The prediction for the discrete choices of `terms` at (r_w, r_c)."""
    policy = replace(terms.policy, weights_gpu_fraction=r_w, kv_gpu_fraction=r_c)
    prefill_s = terms.prefill_s(r_w, r_c)
    step_s = terms.decode_step_s(r_w, r_c)
    decode_s = (workload.gen_len - 1) * step_s
    kind = "moe" if "moe" in terms.layer_counts else "dense"
    decode_layer = _stage_times(terms, terms.decode_stages[kind], r_w, r_c,
                                terms.comm_s["decode"][kind])
    bottleneck, slack = _bottleneck(terms, decode_layer)
    notes = []
    o = terms.overflow(r_w)
    if o > 0:
        notes.append(f"{fmt_bytes(o)} of offloaded experts exceed the pinnable "
                     f"{fmt_bytes(hw.link.pinned_max_bytes)}: staged by the copy thread")
    return Prediction(
        model=model.name, hardware=hw.name, workload=workload, policy=policy,
        prefill_s=prefill_s, decode_s=decode_s, decode_step_s=step_s,
        throughput_tok_s=policy.batch_size * workload.gen_len / (prefill_s + decode_s),
        prefill_layer=_stage_times(terms, terms.prefill_stages[kind], r_w, r_c,
                                   terms.comm_s["prefill"][kind]),
        decode_layer=decode_layer, memory=_footprint(terms, r_w, r_c), bottleneck=bottleneck,
        bottleneck_slack=slack, pinned_overflow_bytes=o, notes=tuple(notes))


def predict(model: ModelSpec, hw: HardwareProfile, workload: Workload,
            policy: Policy) -> Prediction:
    """Predicted prefill/decode time, tokens/s, stage times, bottleneck and memory of `policy`
    for one batch of N = policy.batch_size sequences."""
    terms = cost_terms(model, hw, workload, policy)
    return evaluate(terms, model, hw, workload, policy.weights_gpu_fraction,
                    policy.kv_gpu_fraction)


# ---- predicted timeline ----------------------------------------------------------------------
@dataclass
class _Task:
    name: str
    tid: str
    dur_s: float
    deps: list[str]
    layer: int
    micro_batch: int
    start_s: float = 0.0


def _simulate(queues: dict[str, list[_Task]]) -> list[_Task]:
    """List-schedule tasks that run in a fixed order per track: a task starts when the previous
    task of its track and all its dependencies have finished."""
    done: dict[str, float] = {}
    free_at = dict.fromkeys(queues, 0.0)
    heads = dict.fromkeys(queues, 0)
    out: list[_Task] = []
    while any(heads[t] < len(q) for t, q in queues.items()):
        progressed = False
        for tid, queue in queues.items():
            while heads[tid] < len(queue) and all(d in done for d in queue[heads[tid]].deps):
                task = queue[heads[tid]]
                task.start_s = max([free_at[tid], *(done[d] for d in task.deps)])
                free_at[tid] = done[task.name] = task.start_s + task.dur_s
                heads[tid] += 1
                out.append(task)
                progressed = True
        if not progressed:
            raise RuntimeError("timeline tasks have a dependency cycle")
    return out


def timeline(model: ModelSpec, hw: HardwareProfile, workload: Workload, policy: Policy,
             n_layers: int = 2) -> list[dict[str, Any]]:
    """Predicted Chrome-trace events ("ph": "X", microseconds) of the first `n_layers` layers of
    one decode step, one track (tid) per resource: gpu, cpu_attention, h2d, d2h, copy_thread.

    cgopipe with CPU attention (MoE-Lightning Alg. 1): the GPU runs PostAttn(i, j) then PreAttn
    of the micro-batch two ahead; q/k/v go D2H, the CPU attends, the output comes back H2D, and
    page j of layer i+1's offloaded experts (staged by the copy thread) follows each hidden-state
    H2D. cgopipe with GPU attention (FlexGen S4): each micro-batch's KV comes H2D while the GPU
    works on the previous one. Serial schedules: one task at a time, layer i's weights first
    (their copy-thread and H2D legs side by side).
    Stage times are the cost model's (one GPU's with G > 1), split evenly over the
    micro-batches."""
    terms = cost_terms(model, hw, workload, policy)
    hw = hw.per_gpu(policy.num_gpus)
    r_w, r_c = policy.weights_gpu_fraction, policy.kv_gpu_fraction
    kind = "moe" if model.num_moe_layers else "dense"
    layer = _stage_times(terms, terms.decode_stages[kind], r_w, r_c)
    ops = _layer_ops(model, workload, policy, "decode", kind)
    n_ub = policy.num_micro_batches
    gpu_times = {op.name: gpu_op_time_s(hw, op) for op in ops if op.device == "gpu"}
    pre_share = gpu_times["qkv_proj"] / max(sum(gpu_times.values()), 1e-30)
    weights_h2d_s = affine_sum([transfer_time(hw, op) for op in ops
                                if op.name == "weight_h2d"])(r_w, r_c) + \
        terms.decode_stages[kind]["h2d"].overflow * terms.overflow(r_w)
    t = interfered(layer.by_stage(), terms.factors)
    weights_share = weights_h2d_s / layer.h2d_s if layer.h2d_s > 0 else 0.0
    per_ub_s = {
        "pre_attn": t["gpu"] * pre_share / n_ub,
        "post_attn": t["gpu"] * (1 - pre_share) / n_ub,
        "d2h": t["d2h"] / n_ub,
        "cpu_attn": t["cpu_attn"] / n_ub,
        "act_h2d": t["h2d"] * (1 - weights_share) / n_ub,
        "weights_h2d": t["h2d"] * weights_share / n_ub,
        "stage_weights": t["copy_thread"] / n_ub,
    }
    tids = {"pre_attn": "gpu", "post_attn": "gpu", "d2h": "d2h", "cpu_attn": "cpu_attention",
            "act_h2d": "h2d", "weights_h2d": "h2d", "stage_weights": "copy_thread"}
    order = [(i, j) for i in range(n_layers) for j in range(n_ub)]

    def task(name: str, i: int, j: int, *deps: str) -> _Task:
        return _Task(f"{name} L{i} mb{j}", tids[name], per_ub_s[name], list(deps), i, j)

    cpu_attn = policy.attn_decode_device == "cpu"
    queues: dict[str, list[_Task]] = {t: [] for t in dict.fromkeys(tids.values())}
    if terms.overlapped:
        ahead = min(2, n_ub) if cpu_attn else 0
        gpu_seq = [("pre_attn", x) for x in order[:ahead]]
        for t, x in enumerate(order):
            gpu_seq += ([] if cpu_attn else [("pre_attn", x)]) + [("post_attn", x)]
            if cpu_attn and t + ahead < len(order):
                gpu_seq.append(("pre_attn", order[t + ahead]))
        for name, (i, j) in gpu_seq:
            if name == "pre_attn":
                queues["gpu"].append(task(name, i, j, *([f"post_attn L{i - 1} mb{j}"] if i
                                                        else [])))
                if cpu_attn:
                    queues["d2h"].append(task("d2h", i, j, f"pre_attn L{i} mb{j}"))
                    queues["cpu_attention"].append(task("cpu_attn", i, j, f"d2h L{i} mb{j}"))
                    queues["h2d"].append(task("act_h2d", i, j, f"cpu_attn L{i} mb{j}"))
                else:
                    queues["h2d"].append(task("act_h2d", i, j))
                continue
            pages = [f"weights_h2d L{i} mb{p}" for p in range(n_ub)] if i else []
            ready = f"act_h2d L{i} mb{j}"
            queues["gpu"].append(task(name, i, j, ready, *pages))
            if not cpu_attn:
                queues["d2h"].append(task("d2h", i, j, f"post_attn L{i} mb{j}"))
            # page j of layer i+1 into the staging buffer that layer i-1 has finished with
            queues["copy_thread"].append(task("stage_weights", i + 1, j))
            free = [f"post_attn L{i - 1} mb{n_ub - 1}"] if i else []
            queues["h2d"].append(task("weights_h2d", i + 1, j, f"stage_weights L{i + 1} mb{j}",
                                      *free))
    else:   # one task at a time, but a layer's two weight legs (copy thread, H2D) side by side
        steps = (["pre_attn", "d2h", "cpu_attn", "act_h2d", "post_attn"] if cpu_attn
                 else ["act_h2d", "pre_attn", "post_attn", "d2h"])
        last: list[str] = []        # what the next task waits for
        for i, j in order:
            if j == 0:
                ends: list[str] = []
                for name in ("stage_weights", "weights_h2d"):
                    deps = last
                    for p in range(n_ub):
                        tk = task(name, i, p, *deps)
                        queues[tk.tid].append(tk)
                        deps = [tk.name]
                    ends += deps
                last = ends
            for name in steps:
                tk = task(name, i, j, *last)
                queues[tk.tid].append(tk)
                last = [tk.name]
    return [{"name": tk.name.split()[0], "ph": "X", "ts": tk.start_s * 1e6,
             "dur": tk.dur_s * 1e6, "pid": "hrm-predicted", "tid": tk.tid,
             "args": {"layer": tk.layer, "micro_batch": tk.micro_batch}}
            for tk in _simulate(queues) if tk.dur_s > 0]
