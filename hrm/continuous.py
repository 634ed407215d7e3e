"""Continuous (KV-capacity-aware) scheduling in the cost model, after MoE-Lens.

With weights streamed over the link every pass, throughput is the number of tokens that share one
pass over the weights. Continuous scheduling fills every pass with the decode tokens of all running
sequences plus prefill tokens of newly admitted ones, within a token budget n_tok and the free KV
blocks (executor/scheduler.py). Notation: b KV block (tokens), C_KV CPU bytes left for the KV
cache, p / g prompt / generated tokens of a sequence (a sequence lives g passes: 1 prefill, g - 1
decode), E[.] over the workload's sequences.

KV per running sequence (Little's law, time average over its life, block granular):
    m = E[ sum_{x=p}^{p+g-1} ceil(x / b) ] / E[g]                        blocks
Steady state (fluid limit):
    R_kv     = N_blocks / m,                   N_blocks = floor(C_KV / (b kv_bytes_per_token))
    R_budget = n_tok E[g] / (E[p] + E[g] - 1)          every pass: R (1 - 1/E[g]) decode tokens,
                                                        R / E[g] admissions of E[p] prompt tokens
    R        = min(R_kv, R_budget, num_seqs)           running sequences
    throughput = R / t_pass(R)                         each running sequence gains a token/pass
A job of S sequences also ramps up (about E[g] / 2 passes' worth of tokens lost) and drains
until the longest of its last sequences ends (about g_max / 2 lost); the passes cost about as
much (the weights stream anyway), so, an approximation checked against the scheduler's dry run:
    job throughput = throughput * P / (P + (E[g] + g_max) / 2),   P = S E[g] / R  steady passes
The fluid steady state needs no preemption (the projected occupancy of a stationary running set
only falls; executor/scheduler.py admits on that projection, paced at the rate R_kv / E[g] that
the cache sustains). Re-prefills after preemptions (a scheduler with a short lookahead, or
lengths longer than projected) cost their tokens in the pass that recomputes them:
`predict_passes` times every pass of a scheduler's dry run, re-prefills included.

t_pass uses the stage equations of hrm.cost for one mixed layer: the decode operators of the
running set (CPU attention over their mean context) plus the prefill operators of the admitted
tokens (GPU attention, micro-batches of at most `prefill_chunk_tokens`), with the routed experts
streamed ONCE per pass; layer = max over stages (cgopipe) or their sum, plus the LM head and one
decode micro-batch's chain (pipeline fill and drain), as in hrm.cost.

What binds: CPU memory capacity when R = R_kv < min(R_budget, num_seqs) and more KV would raise
throughput (by > 2%); otherwise the largest stage of the pass (link, gpu, cpu_attention, ...).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hrm.cost import (
    BOTTLENECK_NAMES,
    GPU_USABLE_FRACTION,
    Affine,
    CostTerms,
    affine_sum,
    cost_terms,
    gpu_op_time_s,
    grouped_layer_share,
    interfered,
    layer_stage_sums,
    micro_batch_chain_s,
    one_micro_batch,
    resident_copy_s,
    schedule_layer_s,
    without_weight_stream,
)
from hrm.errors import InfeasibleError, PolicyError
from hrm.hardware import HardwareProfile
from hrm.model import ModelSpec
from hrm.optimize import MICRO_BATCH_SIZES
from hrm.policy import Policy
from hrm.roofline import KV_BLOCK_TOKENS, head_operators, layer_operators
from hrm.units import GiB, fmt_bytes
from hrm.workload import Workload

#: most prompt tokens per prefill micro-batch (bounds the GPU activation workspace); a longer
#: prompt is prefilled alone
PREFILL_CHUNK_TOKENS = 8192
#: token budgets (tokens per weight pass) the optimizer considers
TOKEN_BUDGETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
#: relative gain from unlimited KV above which CPU memory capacity is called the binding limit
CAPACITY_BINDS_GAIN = 1.02


# ---- KV blocks over a sequence's life --------------------------------------------------------
def ceil_sum(n: int, b: int) -> int:
    """sum_{x=1}^{n} ceil(x / b) in closed form: with n = q b + r, b q (q + 1) / 2 + r (q + 1)."""
    q, r = divmod(max(n, 0), b)
    return b * q * (q + 1) // 2 + r * (q + 1)


def block_passes(prompt_len: int, gen_len: int, b: int) -> int:
    """sum_{x=p}^{p+g-1} ceil(x / b): blocks held, summed over the g passes of a sequence's life
    (pass t holds the KV of p + t tokens)."""
    return ceil_sum(prompt_len + gen_len - 1, b) - ceil_sum(prompt_len - 1, b)


@dataclass(frozen=True)
class LengthStats:
    """What the steady state needs of a workload's length distributions (tokens)."""

    mean_prompt: float
    mean_gen: float
    #: m: blocks held by a running sequence, time-averaged over its life
    blocks_per_running_seq: float
    #: tokens a decode token attends over, averaged over all decode tokens
    mean_decode_context: float
    max_seq_len: int

    @classmethod
    def of(cls, workload: Workload, block_tokens: int) -> LengthStats:
        prompts = workload.prompt_lens or (workload.prompt_len,) * workload.num_seqs
        gens = workload.gen_lens or (workload.gen_len,) * workload.num_seqs
        n = len(prompts)
        decode_tokens = sum(g - 1 for g in gens)
        # decode pass t (1 <= t <= g-1) attends over p + t tokens
        context_sum = sum((g - 1) * p + (g - 1) * g / 2 for p, g in zip(prompts, gens,
                                                                         strict=True))
        held = sum(block_passes(p, g, block_tokens) for p, g in zip(prompts, gens, strict=True))
        return cls(mean_prompt=sum(prompts) / n, mean_gen=sum(gens) / n,
                   blocks_per_running_seq=held / sum(gens),
                   mean_decode_context=context_sum / decode_tokens if decode_tokens else 0.0,
                   max_seq_len=max(p + g for p, g in zip(prompts, gens, strict=True)))


# ---- memory ----------------------------------------------------------------------------------
def _memory_views(model: ModelSpec, hw: HardwareProfile, workload: Workload, policy: Policy,
                  prefill_chunk_tokens: int) -> dict[str, CostTerms]:
    """hrm.cost's terms seen from a continuous run (policy.batch_size = n_tok):
    'cpu': CPU memory with pinned q/k/v buffers for n_tok tokens and no prefill hidden-state
    swap (one micro-batch), 'decode': GPU decode phase with micro-batches of mu, 'prefill': GPU
    prefill phase of the largest prefill micro-batch (a chunk, or a whole re-prefilled
    sequence)."""
    chunk = max(prefill_chunk_tokens, workload.max_seq_len)
    return {"cpu": cost_terms(model, hw, workload,
                              replace(policy, micro_batch_size=policy.batch_size)),
            "decode": cost_terms(model, hw, workload, policy),
            "prefill": cost_terms(model, hw, Workload(num_seqs=1, prompt_len=chunk, gen_len=1),
                                  replace(policy, batch_size=1, micro_batch_size=1))}


def _gpu_memory(views: dict[str, CostTerms]) -> list[Affine]:
    """GPU bytes (affine in r_w) of the decode and the prefill phase."""
    return [affine_sum(list(views[phase].gpu_memory[phase].values()))
            for phase in ("decode", "prefill")]


def gpu_need_bytes(model: ModelSpec, hw: HardwareProfile, workload: Workload, policy: Policy,
                   prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> float:
    """Peak GPU bytes of a continuous run at policy.weights_gpu_fraction."""
    views = _memory_views(model, hw, workload, policy, prefill_chunk_tokens)
    return max(a(policy.weights_gpu_fraction, 0.0) for a in _gpu_memory(views))


def kv_capacity_bytes(model: ModelSpec, hw: HardwareProfile, workload: Workload,
                      policy: Policy) -> float:
    """C_KV: usable CPU memory minus everything but the KV cache (offloaded experts, pinned
    buffers, staging ring), from hrm.cost's CPU memory terms."""
    terms = _memory_views(model, hw, workload, policy, PREFILL_CHUNK_TOKENS)["cpu"]
    r_w = policy.weights_gpu_fraction
    o = terms.overflow(r_w)
    other = sum(a(r_w, 0.0, o) for name, a in terms.cpu_memory.items() if name != "KV cache")
    return terms.cpu_capacity_bytes - other


# ---- one weight pass -------------------------------------------------------------------------
@dataclass(frozen=True)
class PassShape:
    """The work of one weight pass (all layers once)."""

    decode_seqs: float              # running sequences decoding one token each
    decode_context_tokens: float    # sum of the tokens they attend over
    prefill_seqs: float             # sequences (re-)prefilled
    prefill_tokens: float           # tokens fed by them


@dataclass(frozen=True)
class PassTime:
    """Seconds of one weight pass: `stage_s` sums each stage over the layers (with interference
    factors), `pass_s` is what the schedule makes of them."""

    pass_s: float
    stage_s: dict[str, float]
    bottleneck: str


@dataclass(frozen=True)
class PassModel:
    """Times weight passes of any (decode, prefill) mix for one model, machine and policy."""

    model: ModelSpec
    policy: Policy
    #: the interference factors, the pinned overflow and the profile the stages are timed on
    terms: CostTerms
    prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS

    def _layer_ops(self, shape: PassShape, kind: str) -> tuple[list, list]:
        p, mu = self.policy, self.policy.micro_batch_size
        dtypes = {"weight_dtype": p.weight_dtype, "kv_dtype": p.kv_dtype, "layer_kind": kind}
        decode: list = []
        if shape.decode_seqs > 0:
            n_ub = math.ceil(shape.decode_seqs / mu)
            decode = layer_operators(
                self.model, micro_batch_size=shape.decode_seqs / n_ub, num_micro_batches=n_ub,
                context_len=shape.decode_context_tokens / shape.decode_seqs, phase="decode",
                attn_device=p.attn_decode_device,
                grouped_share=grouped_layer_share(self.model, p, "decode"), **dtypes)
        prefill: list = []
        if shape.prefill_seqs > 0:
            n_p = math.ceil(shape.prefill_tokens / self.prefill_chunk_tokens)
            n_p = min(n_p, math.ceil(shape.prefill_seqs))
            # the executor keeps a pass's prefill hidden states on the GPU (no swap), and the
            # weights stream once per pass, with the decode operators when there are any
            skip = {"hidden_h2d", "hidden_d2h", *(["weight_h2d"] if decode else [])}
            prefill = [op for op in layer_operators(
                self.model, micro_batch_size=shape.prefill_seqs / n_p, num_micro_batches=n_p,
                context_len=0.0, phase="prefill", attn_device=p.attn_prefill_device,
                prompt_len=shape.prefill_tokens / shape.prefill_seqs, **dtypes)
                if op.name not in skip]
        return decode, prefill

    def time(self, shape: PassShape) -> PassTime:
        """t_pass = LM head + max(sum_layers layer_s, one decode micro-batch's chain + the
        layers' non-weight-stream stages) in cgopipe (hrm.cost: the fill and drain idle the
        GPU and CPU, not the prefetched weight stream), LM head + sum_layers layer_s else."""
        terms, p = self.terms, self.policy
        hw = terms.hardware   # with the staged GPU-stage factor where it applies
        r_w, page = p.weights_gpu_fraction, float(p.weight_page_bytes)
        o = terms.overflow(r_w)
        per_layer_o = {"moe": 1.0 / self.model.num_moe_layers if terms.overflow_bytes else 0.0,
                       "dense": 0.0}
        total_s, unfed_s, stage_s, chain_s, top = 0.0, 0.0, {}, 0.0, ("", -1.0)
        n_ub = math.ceil(shape.decode_seqs / p.micro_batch_size)
        # the fill's own micro-batch is in the first layer's max
        filled = terms.filled_layer_counts(n_ub) if n_ub else terms.layer_counts
        factors = terms.factors
        if terms.overlapped and n_ub == 1:   # GPU stage and CPU attention wait for each other
            hw, factors = one_micro_batch(hw, factors)
        for kind, count in terms.layer_counts.items():
            decode, prefill = self._layer_ops(shape, kind)
            stages = layer_stage_sums(hw, decode + prefill, page, per_layer_o[kind],
                                      terms.overlapped)
            if kind == "moe":
                stages["h2d"] += resident_copy_s(self.model, hw, p)
            t = interfered({s: a(r_w, 0.0, o) for s, a in stages.items()}, factors)
            total_s += count * schedule_layer_s(t, terms.overlapped)
            unfed_s += filled[kind] * max(without_weight_stream(t).values(), default=0.0)
            for s, seconds in t.items():
                stage_s[s] = stage_s.get(s, 0.0) + count * seconds
                if seconds > top[1]:
                    top = (s, seconds)
            if terms.overlapped and decode and (kind == "moe" or "moe" not in terms.layer_counts):
                chain_s = micro_batch_chain_s(hw, decode, n_ub, factors)(r_w, 0.0, o)
        rows = shape.decode_seqs + shape.prefill_seqs
        n_head = max(1, math.ceil(rows / p.micro_batch_size))
        head_s = sum(gpu_op_time_s(hw, op) for op in head_operators(
            self.model, micro_batch_size=rows / n_head, num_micro_batches=n_head,
            weight_dtype=p.weight_dtype)) if rows else 0.0
        layers_s = max(total_s, chain_s + unfed_s) if terms.overlapped else total_s
        return PassTime(pass_s=layers_s + head_s, stage_s=stage_s,
                        bottleneck=BOTTLENECK_NAMES[top[0]])


def pass_model(model: ModelSpec, hw: HardwareProfile, workload: Workload, policy: Policy,
               prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> PassModel:
    """The pass timer of `policy` (continuous mode: policy.batch_size is the token budget)."""
    if policy.attn_decode_device != "cpu" or policy.schedule == "layerwise":
        raise PolicyError("continuous scheduling keeps the KV cache in CPU memory: use "
                          "attn_decode_device='cpu' and a cgopipe schedule")
    views = _memory_views(model, hw, workload, policy, prefill_chunk_tokens)
    # the CPU view's overflow (its pinned buffers are a whole pass's); the interference of the
    # policy's micro-batches (the CPU view has one: hrm.cost.one_micro_batch), which `time`
    # lifts for passes of one micro-batch
    decode = views["decode"]
    terms = replace(views["cpu"], factors=decode.factors, hardware=decode.hardware)
    return PassModel(model, policy, terms, prefill_chunk_tokens)


# ---- predictions -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ContinuousPrediction:
    """Steady state of a continuous run (tokens/s, sequences, tokens per pass, seconds)."""

    model: str
    hardware: str
    workload: Workload
    policy: Policy
    token_budget: int
    block_tokens: int
    throughput_tok_s: float
    running_seqs: float            # R
    running_seqs_kv: float         # R_kv
    running_seqs_budget: float     # R_budget
    decode_tokens_per_pass: float
    prefill_tokens_per_pass: float
    pass_s: float
    stage_s: dict[str, float]
    kv_capacity_bytes: float
    kv_blocks: int
    blocks_per_running_seq: float
    #: the whole job of num_seqs sequences, ramp-up and drain included (module docstring)
    job_throughput_tok_s: float
    #: throughput if the KV cache were unlimited (R = min(R_budget, num_seqs))
    unlimited_kv_tok_s: float
    #: ceilings (tokens/s) if only that stage (or capacity) limited, R = min(R_budget, num_seqs)
    ceilings_tok_s: dict[str, float]
    bottleneck: str
    gpu_need_bytes: float
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduler": "continuous", "model": self.model, "hardware": self.hardware,
            "workload": {"name": self.workload.name, "num_seqs": self.workload.num_seqs,
                         "mean_prompt_len": self.workload.prompt_len,
                         "max_prompt_len": self.workload.max_prompt_len,
                         "mean_gen_len": self.workload.mean_gen_len,
                         "max_gen_len": self.workload.gen_len},
            "policy": self.policy.to_dict(), "token_budget": self.token_budget,
            "kv_block_tokens": self.block_tokens,
            "throughput_tok_s": self.throughput_tok_s, "bottleneck": self.bottleneck,
            "job_throughput_tok_s": self.job_throughput_tok_s,
            "running_seqs": self.running_seqs, "running_seqs_kv": self.running_seqs_kv,
            "running_seqs_budget": self.running_seqs_budget,
            "decode_tokens_per_pass": self.decode_tokens_per_pass,
            "prefill_tokens_per_pass": self.prefill_tokens_per_pass, "pass_s": self.pass_s,
            "stage_s": self.stage_s, "kv_capacity_bytes": self.kv_capacity_bytes,
            "kv_blocks": self.kv_blocks, "blocks_per_running_seq": self.blocks_per_running_seq,
            "unlimited_kv_tok_s": self.unlimited_kv_tok_s, "ceilings_tok_s": self.ceilings_tok_s,
            "gpu_mem_bytes": self.gpu_need_bytes, "notes": list(self.notes),
        }


def steady_shape(running: float, stats: LengthStats) -> PassShape:
    """The pass of R running sequences in steady state: R (1 - 1/E[g]) decode tokens and R/E[g]
    admissions of E[p] prompt tokens."""
    admitted = running / stats.mean_gen
    decode = running - admitted
    return PassShape(decode_seqs=decode, decode_context_tokens=decode * stats.mean_decode_context,
                     prefill_seqs=admitted, prefill_tokens=admitted * stats.mean_prompt)


def predict_continuous(model: ModelSpec, hw: HardwareProfile, workload: Workload,
                       policy: Policy, *, block_tokens: int = KV_BLOCK_TOKENS,
                       prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> ContinuousPrediction:
    """Steady-state throughput of continuous scheduling (module docstring) with token budget
    n_tok = policy.batch_size, and what binds it. Raises InfeasibleError when the GPU does not
    fit, or the CPU not even the longest sequence's KV."""
    token_budget = policy.batch_size
    passes = pass_model(model, hw, workload, policy, prefill_chunk_tokens)
    stats = LengthStats.of(workload, block_tokens)
    gpu_bytes = gpu_need_bytes(model, hw, workload, policy, prefill_chunk_tokens)
    if gpu_bytes > passes.terms.gpu_capacity_bytes:
        raise InfeasibleError(
            f"continuous run needs {gpu_bytes / GiB:.1f} GiB GPU memory (r_w="
            f"{policy.weights_gpu_fraction:.2f}, mu={policy.micro_batch_size}), "
            f"{passes.terms.gpu_capacity_bytes / GiB:.1f} GiB usable")
    c_kv = kv_capacity_bytes(model, hw, workload, policy)
    block_bytes = block_tokens * model.kv_bytes_per_token(policy.kv_dtype)
    n_blocks = max(0, math.floor(c_kv / block_bytes))
    if n_blocks < -(-stats.max_seq_len // block_tokens):
        raise InfeasibleError(
            f"continuous run leaves {fmt_bytes(max(c_kv, 0.0))} of CPU memory for the KV cache, "
            f"less than the longest sequence ({stats.max_seq_len} tokens) needs; raise --cpu-mem "
            f"or weights_gpu_fraction")
    r_kv = n_blocks / stats.blocks_per_running_seq
    r_budget = token_budget * stats.mean_gen / (stats.mean_prompt + stats.mean_gen - 1.0)
    r_free = min(r_budget, float(workload.num_seqs))
    running = min(r_kv, r_free)
    at_r = passes.time(steady_shape(running, stats))
    free = passes.time(steady_shape(r_free, stats))
    ceilings = {BOTTLENECK_NAMES[s]: r_free / t for s, t in free.stage_s.items() if t > 0}
    kv_limited = r_kv < r_free and (r_free / free.pass_s) > CAPACITY_BINDS_GAIN * (
        running / at_r.pass_s)
    if kv_limited:
        ceilings["cpu_memory_capacity"] = running / at_r.pass_s
    notes = []
    if r_kv < r_free:
        notes.append(f"KV cache holds {r_kv:.0f} running sequences; the token budget and "
                     f"the job would allow {r_free:.0f}")
    shape = steady_shape(running, stats)
    steady_passes = workload.num_seqs * stats.mean_gen / running
    throughput = running / at_r.pass_s
    return ContinuousPrediction(
        model=model.name, hardware=hw.name, workload=workload, policy=policy,
        token_budget=token_budget, block_tokens=block_tokens,
        throughput_tok_s=throughput, running_seqs=running, running_seqs_kv=r_kv,
        job_throughput_tok_s=throughput * steady_passes / (
            steady_passes + (stats.mean_gen + workload.gen_len) / 2),
        running_seqs_budget=r_budget, decode_tokens_per_pass=shape.decode_seqs,
        prefill_tokens_per_pass=shape.prefill_tokens, pass_s=at_r.pass_s, stage_s=at_r.stage_s,
        kv_capacity_bytes=c_kv, kv_blocks=n_blocks,
        blocks_per_running_seq=stats.blocks_per_running_seq,
        unlimited_kv_tok_s=r_free / free.pass_s, ceilings_tok_s=ceilings,
        bottleneck="cpu_memory_capacity" if kv_limited else at_r.bottleneck,
        gpu_need_bytes=gpu_bytes, notes=tuple(notes))


@dataclass(frozen=True)
class PassesPrediction:
    """Predicted time of a run given every pass it makes (a scheduler's dry run)."""

    total_s: float
    generated_tokens: int
    throughput_tok_s: float
    num_passes: int
    prefill_tokens: float
    bottlenecks: dict[str, int]     # binding stage -> passes


def predict_passes(passes: PassModel, shapes: Iterable[PassShape]) -> PassesPrediction:
    """Sum t_pass over the passes of a run; each scheduled sequence generates one token per
    pass, so generated tokens = decode + prefill sequences."""
    total_s, tokens, prefill, n, binding = 0.0, 0, 0.0, 0, {}
    cache: dict[PassShape, PassTime] = {}
    for shape in shapes:
        if shape not in cache:
            cache[shape] = passes.time(shape)
        t = cache[shape]
        total_s += t.pass_s
        tokens += generated_tokens(shape)
        prefill += shape.prefill_tokens
        n += 1
        binding[t.bottleneck] = binding.get(t.bottleneck, 0) + 1
    return PassesPrediction(total_s=total_s, generated_tokens=tokens,
                            throughput_tok_s=tokens / total_s if total_s else 0.0,
                            num_passes=n, prefill_tokens=prefill, bottlenecks=binding)


#: a pass is in a run's steady state when it decodes at least this share of the run's largest
#: running set: the passes between ramp-up and drain (`steady_window`)
STEADY_FRACTION = 0.9


def steady_window(shapes: Sequence[PassShape]) -> range:
    """The passes of a run between its ramp-up and its drain: from the first to the last pass
    whose decoding sequences reach STEADY_FRACTION of the run's most. A job of many times its
    running set spends nearly all its passes here, so their tokens/s is the steady-state
    `throughput` above (a short job's ramp-up and drain dilute its whole-run figure). Empty when
    no pass decodes."""
    peak = max((s.decode_seqs for s in shapes), default=0.0)
    full = [i for i, s in enumerate(shapes) if peak and s.decode_seqs >= STEADY_FRACTION * peak]
    return range(full[0], full[-1] + 1) if full else range(0)


def generated_tokens(shape: PassShape) -> int:
    """Tokens a pass generates: one per scheduled sequence, decoding or (re-)prefilled."""
    return round(shape.decode_seqs + shape.prefill_seqs)


# ---- the optimizer for this mode -------------------------------------------------------------
def max_weights_gpu_fraction(model: ModelSpec, hw: HardwareProfile, workload: Workload,
                             policy: Policy) -> float | None:
    """The largest r_w at which the continuous run fits the GPU, solved exactly on hrm.cost's
    GPU memory terms (affine in r_w in every phase of both views); None if r_w = 0 does not."""
    capacity = GPU_USABLE_FRACTION * hw.gpu.memory_bytes
    r_w_max = 1.0
    for need in _gpu_memory(_memory_views(model, hw, workload, policy, PREFILL_CHUNK_TOKENS)):
        if need(0.0, 0.0) > capacity:
            return None
        if need.r_w > 0:
            r_w_max = min(r_w_max, (capacity - need.const) / need.r_w)
    return r_w_max


@dataclass(frozen=True)
class ContinuousResult:
    policy: Policy
    prediction: ContinuousPrediction
    solve_s: float
    num_candidates: int


def optimize_continuous(model: ModelSpec, hw: HardwareProfile, workload: Workload, *,
                        schedule: str = "cgopipe", weight_dtype: str = "bf16",
                        kv_dtype: str = "bf16", block_tokens: int = KV_BLOCK_TOKENS,
                        micro_batch_sizes: tuple[int, ...] = MICRO_BATCH_SIZES,
                        token_budgets: tuple[int, ...] = TOKEN_BUDGETS) -> ContinuousResult:
    """Best (mu, n_tok, r_w) for continuous scheduling. For fixed (mu, n_tok) throughput never
    falls with r_w (less streamed, and the CPU memory it frees goes to the KV cache), so r_w is
    the largest the GPU allows (`max_weights_gpu_fraction`, floored to 0.01); the discrete pairs
    (hrm.optimize's micro-batch sizes that divide a budget) are enumerated."""
    start = time.perf_counter()
    best: ContinuousPrediction | None = None
    candidates, reasons = 0, []
    for n_tok in token_budgets:
        for mu in micro_batch_sizes:
            if n_tok % mu:
                continue
            candidates += 1
            policy = Policy(batch_size=n_tok, micro_batch_size=mu, weight_dtype=weight_dtype,
                            kv_dtype=kv_dtype, schedule=schedule)
            r_w = max_weights_gpu_fraction(model, hw, workload, policy)
            if r_w is None:
                continue
            policy = replace(policy, weights_gpu_fraction=math.floor(r_w * 100) / 100)
            try:
                pred = predict_continuous(model, hw, workload, policy,
                                          block_tokens=block_tokens)
            except InfeasibleError as exc:
                reasons.append(str(exc))
                continue
            if best is None or pred.throughput_tok_s > best.throughput_tok_s:
                best = pred
    if best is None:
        raise InfeasibleError(reasons[0] if reasons else
                              "no continuous policy fits the GPU even with every routed expert "
                              "offloaded and the smallest micro-batch")
    return ContinuousResult(policy=best.policy, prediction=best,
                            solve_s=time.perf_counter() - start, num_candidates=candidates)


# ---- `hrm predict/optimize --scheduler continuous` -------------------------------------------
def dry_run(model: ModelSpec, hw: HardwareProfile, workload: Workload,
            prediction: ContinuousPrediction) -> dict[str, Any]:
    """The job timed pass by pass over the scheduler's dry run (executor/scheduler.py, pure
    Python): what a run of this workload with this policy is predicted to take."""
    from executor.scheduler import simulate

    prompts = workload.prompt_lens or (workload.prompt_len,) * workload.num_seqs
    gens = workload.gen_lens or (workload.gen_len,) * workload.num_seqs
    passes, stats = simulate(list(prompts), list(gens), num_blocks=prediction.kv_blocks,
                             block_tokens=prediction.block_tokens,
                             token_budget=prediction.policy.batch_size)
    traced = predict_passes(pass_model(model, hw, workload, prediction.policy),
                            [p.shape() for p in passes])
    return {"throughput_tok_s": traced.throughput_tok_s, "total_s": traced.total_s,
            "passes": traced.num_passes, "preemptions": stats.preemptions,
            "recomputed_tokens": stats.recomputed_tokens, "peak_running_seqs": stats.peak_running,
            "binding_passes": traced.bottlenecks}


def continuous_report(model: ModelSpec, hw: HardwareProfile, workload: Workload, *,
                      policy: Policy | None, schedule: str = "cgopipe",
                      weight_dtype: str = "bf16", kv_dtype: str = "bf16") -> dict[str, Any]:
    """Prediction (of `policy`, or of the best continuous policy), the scheduler's dry run, and
    the best static policy for comparison: the JSON of `hrm predict/optimize --scheduler
    continuous`."""
    from hrm.optimize import optimize

    if policy is None:
        result = optimize_continuous(model, hw, workload, schedule=schedule,
                                     weight_dtype=weight_dtype, kv_dtype=kv_dtype)
        pred = result.prediction
        doc = {**pred.to_dict(), "solve_s": result.solve_s,
               "candidates": result.num_candidates}
    else:
        pred = predict_continuous(model, hw, workload, policy)
        doc = pred.to_dict()
    doc["dry_run"] = dry_run(model, hw, workload, pred)
    try:
        static = optimize(model, hw, workload, schedule="cgopipe", weight_dtype=weight_dtype,
                          kv_dtype=kv_dtype).prediction
        doc["static"] = {"throughput_tok_s": static.throughput_tok_s,
                         "policy": static.policy.to_dict(), "bottleneck": static.bottleneck,
                         "continuous_over_static": pred.throughput_tok_s /
                         static.throughput_tok_s}
    except InfeasibleError as exc:
        doc["static"] = {"error": str(exc)}
    return doc


def print_continuous_report(doc: dict[str, Any], title: str) -> None:
    """The report of `continuous_report` as a rich table."""
    from rich.console import Console
    from rich.table import Table

    p, stages = doc["policy"], doc["stage_s"]
    table = Table(title=title, show_header=False)
    table.add_row("policy", f"token budget n_tok={p['batch_size']} per weight pass, decode "
                  f"micro-batches of mu={p['micro_batch_size']}, r_w="
                  f"{p['weights_gpu_fraction']:.2f}, schedule {p['schedule']}, KV blocks of "
                  f"{doc['kv_block_tokens']} tokens")
    table.add_row("steady state", f"{doc['throughput_tok_s']:,.1f} tokens/s; the job of "
                  f"{doc['workload']['num_seqs']} sequences {doc['job_throughput_tok_s']:,.1f} "
                  f"(analytic), {doc['dry_run']['throughput_tok_s']:,.1f} (scheduler dry run, "
                  f"{doc['dry_run']['passes']} passes, {doc['dry_run']['preemptions']} "
                  "preemptions)")
    table.add_row("running sequences", f"R={doc['running_seqs']:,.0f} (KV allows "
                  f"{doc['running_seqs_kv']:,.0f}, token budget {doc['running_seqs_budget']:,.0f})"
                  f"; per pass {doc['decode_tokens_per_pass']:,.0f} decode + "
                  f"{doc['prefill_tokens_per_pass']:,.0f} prefill tokens")
    table.add_row("weight pass", f"{doc['pass_s'] * 1e3:,.1f} ms: " + ", ".join(
        f"{BOTTLENECK_NAMES[name]} {seconds * 1e3:,.1f} ms" for name, seconds in
        sorted(stages.items(), key=lambda kv: -kv[1]) if seconds > 0))
    table.add_row("bound set by", f"{doc['bottleneck']}; ceilings (tokens/s): " + ", ".join(
        f"{name} {v:,.0f}" for name, v in sorted(doc["ceilings_tok_s"].items(),
                                                  key=lambda kv: kv[1])))
    table.add_row("KV cache", f"{fmt_bytes(doc['kv_capacity_bytes'])} of CPU memory = "
                  f"{doc['kv_blocks']:,} blocks, {doc['blocks_per_running_seq']:.2f} per running "
                  f"sequence; with unlimited KV: {doc['unlimited_kv_tok_s']:,.1f} tokens/s")
    table.add_row("GPU memory", fmt_bytes(doc["gpu_mem_bytes"]))
    static = doc["static"]
    table.add_row("static cgopipe", static.get("error") or
                  f"{static['throughput_tok_s']:,.1f} tokens/s (N="
                  f"{static['policy']['batch_size']}, bottleneck {static['bottleneck']}): "
                  f"continuous is {static['continuous_over_static']:.2f}x")
    for note in doc["notes"]:
        table.add_row("note", note)
    Console().print(table)
