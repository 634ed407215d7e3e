"""Continuous scheduling in the engine (`hrm run --scheduler continuous`).

Each weight pass runs the pass `executor.scheduler.ContinuousScheduler` makes: for every layer,
the layer's weights are acquired once; the decode micro-batches (running sequences, longest
context first, mu per micro-batch) run as in CGOPipe (QKV on the GPU, attention on the CPU worker,
O projection and experts on the GPU), and the prefill micro-batches (prompts, or prompt + tokens
generated so far after a preemption, at most PREFILL_CHUNK_TOKENS tokens each) run on the GPU
while the CPU attends to the first decode micro-batch. The same layer code as the static engine
(executor.engine.Engine) does the math, so greedy tokens equal the static scheduler's.

KV cache: one pool per layer of N_blocks blocks [N_blocks, n_kv, T, D] in CPU memory; each
sequence owns a block table; blocks are allocated as the scheduler grows a sequence and returned
at once when it finishes or is preempted. CPU attention reads a micro-batch's blocks where they
lie in the pool, through its block tables (`cpu_decode_attention_table`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from executor.engine import (
    Engine,
    Generation,
    MemoryPlan,
    MicroBatch,
    load_weights,
    weight_plan,
)
from executor.kernels import cpu_decode_attention_table
from executor.kv_cache import BLOCK_TOKENS
from executor.layers import host_list
from executor.sampling import Sampling
from executor.schedule import LayerWeightsInFlight, index_tensor, pipeline_threads
from executor.scheduler import ContinuousScheduler, ScheduledPass, blocks_for, simulate
from executor.trace import Tracer
from executor.weights import read_model, resident_experts_per_layer, torch_dtype
from hrm.continuous import (
    PREFILL_CHUNK_TOKENS,
    PassShape,
    generated_tokens,
    pass_model,
    predict_passes,
    steady_window,
)
from hrm.cost import CPU_USABLE_FRACTION, prefill_workspace_bytes
from hrm.errors import HRMError, InfeasibleError, PolicyError
from hrm.hardware import HardwareProfile
from hrm.model import ModelSpec
from hrm.policy import Policy
from hrm.units import fmt_bytes
from hrm.workload import Workload


def kv_block_bytes(spec: ModelSpec, block_tokens: int, kv_dtype: str) -> int:
    """Bytes of one block over all layers, K and V."""
    elem = torch.empty((), dtype=torch_dtype(kv_dtype)).element_size()
    return 2 * spec.num_layers * block_tokens * spec.num_kv_heads * spec.head_dim * elem


def continuous_plan(spec: ModelSpec, policy: Policy, resident: list[int], max_seq_len: int,
                    cpu_mem_bytes: float, block_tokens: int, num_blocks: int | None = None
                    ) -> tuple[MemoryPlan, int]:
    """Memory of a continuous run and its KV blocks: by default as many blocks as the usable
    CPU memory (hrm.cost's CPU_USABLE_FRACTION, as the model assumes) holds after the streamed
    experts; `num_blocks` sets another number (fewer blocks: more preemption)."""
    w_elem = int(torch.empty((), dtype=torch_dtype(policy.weight_dtype)).element_size())
    weights, streamed = weight_plan(spec, policy, resident)
    block = kv_block_bytes(spec, block_tokens, policy.kv_dtype)
    fit = max(0, math.floor((CPU_USABLE_FRACTION * cpu_mem_bytes - streamed) / block))
    blocks = fit if num_blocks is None else num_blocks
    if blocks < blocks_for(max_seq_len, block_tokens):
        raise InfeasibleError(
            f"the KV cache has room for {blocks} blocks of {block_tokens} tokens "
            f"({fmt_bytes(blocks * block)} after {fmt_bytes(streamed)} of streamed experts)"
            f", fewer than the longest sequence ({max_seq_len} tokens) needs; raise --cpu-mem")
    prefill_tokens = max(PREFILL_CHUNK_TOKENS, max_seq_len)
    gpu = {**weights,
           "activation workspace": prefill_workspace_bytes(spec, policy, prefill_tokens,
                                                           max_seq_len, w_elem)}
    cpu = {"streamed experts": streamed, "KV cache (blocks)": blocks * block}
    return MemoryPlan(gpu, cpu, 0, [max_seq_len], block_tokens), blocks


class BlockPool:
    """KV blocks of all layers in CPU memory and the block table of every sequence."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_tokens: int,
                 dtype: torch.dtype) -> None:
        shape = (num_blocks, spec.num_kv_heads, block_tokens, spec.head_dim)
        # zeroed when handed out (masked positions must read finite values), not up front
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(spec.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(spec.num_layers)]
        self.block_tokens = block_tokens
        self.free: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    def resize(self, seq: int, tokens: int) -> None:
        """Give `seq` the blocks `tokens` tokens need (a new sequence gets a table)."""
        table = self.tables.setdefault(seq, [])
        while len(table) < blocks_for(tokens, self.block_tokens):
            block = self.free.popleft()
            for cache in (*self.k, *self.v):
                cache[block].zero_()
            table.append(block)

    def release(self, seq: int) -> None:
        self.free.extend(self.tables.pop(seq, []))

    def view(self, seqs: list[int]) -> BlockView:
        return BlockView(self, [self.tables[s] for s in seqs])


@dataclass
class BlockView:
    """The KV cache of one micro-batch in the interface the engine's layer steps use (slot i is
    the micro-batch's i-th sequence)."""

    pool: BlockPool
    tables: list[list[int]]
    #: the (slots, positions) of the last `append` and its block and offset index tensors
    _append: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def k(self) -> list[torch.Tensor]:
        return self.pool.k

    def write_prompt(self, layer: int, slots: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, L, n_kv, D] of n sequences in `slots`, positions 0..L-1."""
        t = self.pool.block_tokens
        for cache, new in ((self.pool.k[layer], k), (self.pool.v[layer], v)):
            new = new.to(cache.dtype)
            for i, table in enumerate(self.tables[slots]):
                for j, start in enumerate(range(0, new.shape[1], t)):
                    end = min(start + t, new.shape[1])
                    cache[table[j], :, :end - start] = new[i, start:end].transpose(0, 1)

    def append(self, layer: int, slots: slice, positions: list[int], k: torch.Tensor,
               v: torch.Tensor) -> None:
        """One new token per sequence: k, v [n, n_kv, D] at `positions`."""
        key = (slots.start, slots.stop, tuple(positions))
        if self._append is None or self._append[0] != key:   # once per pass, not per layer
            t = self.pool.block_tokens
            tables = self.tables[slots]
            self._append = (key, torch.tensor([tb[p // t] for tb, p in
                                               zip(tables, positions, strict=True)]),
                            torch.tensor([p % t for p in positions]))
        _, blocks, offsets = self._append
        for cache, new in ((self.pool.k[layer], k), (self.pool.v[layer], v)):
            cache[blocks, :, offsets] = new.to(cache.dtype)

    def attend(self, layer: int, slots: slice, q: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """Decode attention over the sequences' blocks where they lie in the pool (slots run
        longest first, so `lens` does not increase)."""
        return cpu_decode_attention_table(q, self.pool.k[layer], self.pool.v[layer],
                                          self.tables[slots], lens)


@dataclass(frozen=True)
class ContinuousStats:
    """What the scheduler did in a run, and the shape of every pass (for the cost model)."""

    passes: int
    preemptions: int
    recomputed_tokens: int
    peak_kv_blocks: int
    kv_blocks: int
    peak_running_seqs: int
    shapes: tuple[PassShape, ...]
    #: seconds from the run's start to the end of each pass (its tokens read back)
    pass_end_s: tuple[float, ...] = ()

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k not in ("shapes", "pass_end_s")}

    def steady(self) -> dict[str, Any] | None:
        """The measured steady state (`hrm.continuous.steady_window`): its passes [first,
        last], generated tokens, seconds and tokens/s; None without pass times."""
        window = steady_window(self.shapes)
        if not window or len(self.pass_end_s) != len(self.shapes):
            return None
        start_s = self.pass_end_s[window.start - 1] if window.start else 0.0
        seconds = self.pass_end_s[window.stop - 1] - start_s
        tokens = sum(generated_tokens(self.shapes[i]) for i in window)
        return {"passes": [window.start, window.stop - 1], "generated_tokens": tokens,
                "seconds": seconds, "throughput_tok_s": tokens / seconds if seconds else 0.0}


class ContinuousEngine(Engine):
    """The engine driven pass by pass by the continuous scheduler (module docstring)."""

    def generate_continuous(self, prompts: list[list[int]], gen_lens: list[int], *,
                            num_blocks: int, lookahead: int | None = None, pace: bool = True
                            ) -> tuple[Generation, ContinuousStats]:
        """Generate up to gen_lens[i] tokens for prompt i (stopping at EOS); outputs in input
        order. Returns the generation and what the scheduler did."""
        if not prompts or any(not p for p in prompts):
            raise HRMError("every prompt needs at least one token")
        bad = [t for p in prompts for t in p if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise HRMError(f"token id {bad[0]} is outside the vocabulary "
                           f"(size {self.spec.vocab_size})")
        prompt_lens, block_tokens = [len(p) for p in prompts], self.plan.kv_block_tokens
        longest = max(p + g for p, g in zip(prompt_lens, gen_lens, strict=True))
        if longest > self.rope_table.shape[0]:
            raise HRMError("these prompts + gen_len exceed the context the engine was built for")
        sched = ContinuousScheduler(prompt_lens, list(gen_lens), num_blocks, block_tokens,
                                    self.policy.batch_size, lookahead, pace)
        # the dry run without EOS bounds the passes (EOS only ends sequences earlier)
        bound, _ = simulate(prompt_lens, list(gen_lens), num_blocks=num_blocks,
                            block_tokens=block_tokens, token_budget=self.policy.batch_size,
                            lookahead=lookahead, pace=pace)
        pool = BlockPool(self.spec, num_blocks, block_tokens, torch_dtype(self.policy.kv_dtype))
        outputs: list[list[int]] = [[] for _ in prompts]
        shapes: list[PassShape] = []
        ends: list[float] = []
        tracer = Tracer(self.device)
        layers = self.spec.num_layers
        with pipeline_threads(self.w.experts, self.streams, tracer) as (link, worker), \
                torch.inference_mode():
            weights = LayerWeightsInFlight(link, layers, len(bound) * layers, self.overlap,
                                           self.policy.staging_buffers)
            t0 = tracer.now_s()
            visit = 0
            while not sched.done:
                scheduled = sched.next_pass()
                shapes.append(scheduled.shape())
                for seq in scheduled.preempted:
                    pool.release(seq)
                for seq in (*scheduled.decode, *scheduled.prefill):
                    pool.resize(seq, sched.seqs[seq].cached)
                decode, prefill = self._pass_micro_batches(scheduled, sched, pool, prompts,
                                                           outputs)
                self._run_pass(decode, prefill, weights, visit, worker, tracer)
                visit += layers
                for mb in (*decode, *prefill):
                    for seq, token in zip(mb.seqs, host_list(mb.tokens[-1]), strict=True):
                        outputs[seq].append(token)
                eos = frozenset(s for s in (*scheduled.decode, *scheduled.prefill)
                                if self.eos is not None and outputs[s][-1] == self.eos)
                for seq in sched.complete(scheduled, eos):
                    pool.release(seq)
                ends.append(tracer.now_s() - t0)   # the tokens were read back: the pass is done
            self._sync()
            t1 = tracer.now_s()
            self.bytes["weights_h2d_pinned"] = link.bytes_pinned_path
            self.bytes["weights_h2d_staged"] = link.bytes_staged_path
        stats = ContinuousStats(
            passes=sched.stats.passes, preemptions=sched.stats.preemptions,
            recomputed_tokens=sched.stats.recomputed_tokens,
            peak_kv_blocks=sched.stats.peak_blocks, kv_blocks=num_blocks,
            peak_running_seqs=sched.stats.peak_running, shapes=tuple(shapes),
            pass_end_s=tuple(ends))
        # prefill and decode share every pass: the whole run is reported as one window
        return Generation(outputs, 0.0, t1 - t0, tracer.spans(), [(t0, t1)],
                          dict(self.bytes)), stats

    def _pass_micro_batches(self, scheduled: ScheduledPass, sched: ContinuousScheduler,
                            pool: BlockPool, prompts: list[list[int]], outputs: list[list[int]]
                            ) -> tuple[list[MicroBatch], list[MicroBatch]]:
        """Decode micro-batches of mu sequences, longest context first, fed their last token;
        prefill micro-batches of whole prompts (+ generated tokens) up to the chunk size."""
        mu, device = self.policy.micro_batch_size, self.device
        running = sorted(scheduled.decode, key=lambda s: (-sched.seqs[s].cached, s))
        decode = []
        for start in range(0, len(running), mu):
            seqs = running[start:start + mu]
            cached = [sched.seqs[s].cached for s in seqs]   # the new token included
            last = index_tensor([outputs[s][-1] for s in seqs], device)
            decode.append(MicroBatch(seqs, cached, pool.view(seqs), slice(0, len(seqs)),
                                     hidden=self.w.embed[last],
                                     positions=index_tensor([c - 1 for c in cached], device)))
        feeds = {s: prompts[s] + outputs[s] for s in scheduled.prefill}
        order = sorted(scheduled.prefill, key=lambda s: (-len(feeds[s]), s))
        groups: list[list[int]] = []
        for s in order:
            if groups and sum(len(feeds[x]) for x in groups[-1]) + len(feeds[s]) <= \
                    PREFILL_CHUNK_TOKENS:
                groups[-1].append(s)
            else:
                groups.append([s])
        prefill = []
        for seqs in groups:
            lens = [len(feeds[s]) for s in seqs]
            ids = index_tensor([t for s in seqs for t in feeds[s]], device)
            prefill.append(MicroBatch(seqs, lens, pool.view(seqs), slice(0, len(seqs)),
                                      hidden=self.w.embed[ids],
                                      positions=torch.cat([torch.arange(n, device=device)
                                                           for n in lens])))
        return decode, prefill

    def _run_pass(self, decode: list[MicroBatch], prefill: list[MicroBatch],
                  weights: LayerWeightsInFlight, visit: int, worker, tracer: Tracer) -> None:
        """All layers once: per layer, each decode micro-batch's attention is started before the
        previous one's FFN runs (CGOPipe order); the prefill micro-batches run on the GPU while
        the CPU attends to the first decode micro-batch."""
        compute = self.streams.compute
        for layer in range(self.spec.num_layers):
            buffer = weights.acquire(visit + layer, compute)
            pending = None
            for m, mb in enumerate(decode):
                attention = self._decode_pre(layer, m, mb, worker, tracer)
                if m == 0:
                    for p in prefill:
                        self._prefill_item(layer, p, buffer, tracer)
                if pending is not None:
                    self._decode_post(layer, *pending, buffer, tracer)
                pending = (m, mb, attention)
            if not decode:
                for p in prefill:
                    self._prefill_item(layer, p, buffer, tracer)
            if pending is not None:
                self._decode_post(layer, *pending, buffer, tracer)
            weights.release(visit + layer, compute)


def build_continuous_engine(model: str, policy: Policy, *, device: torch.device,
                            max_seq_len: int, checkpoint: str | None = None,
                            gpu_mem_bytes: float, cpu_mem_bytes: float,
                            pin_budget_bytes: float = 0.0, sampling: Sampling = Sampling(),
                            eos_token_id: int | None = None, seed: int = 0,
                            kv_block_tokens: int = BLOCK_TOKENS, num_blocks: int | None = None
                            ) -> tuple[ContinuousEngine, int]:
    """Check the continuous memory plan, then build the engine (weights as `build_engine`).
    Returns the engine and its number of KV blocks."""
    if policy.attn_decode_device != "cpu" or policy.schedule == "layerwise":
        raise PolicyError("the continuous scheduler keeps the KV cache in CPU memory: use a "
                          "cgopipe policy with attn_decode_device='cpu'")
    spec, _ = read_model(checkpoint or model)
    resident = resident_experts_per_layer(spec, policy.weights_gpu_fraction)
    plan, blocks = continuous_plan(spec, policy, resident, max_seq_len, cpu_mem_bytes,
                                   kv_block_tokens, num_blocks)
    plan.check(gpu_mem_bytes, cpu_mem_bytes)
    weights = load_weights(model, policy, device=device, checkpoint=checkpoint,
                           resident=resident, pin_budget_bytes=pin_budget_bytes, seed=seed)
    return ContinuousEngine(weights, policy, device, plan, sampling, eos_token_id), blocks


def run_continuous(model: str, policy: Policy, *, device: torch.device, prompts: list[list[int]],
                   gen_lens: list[int], checkpoint: str | None, gpu_mem_bytes: float,
                   cpu_mem_bytes: float, pin_budget_bytes: float, sampling: Sampling,
                   eos_token_id: int | None, seed: int, hw: HardwareProfile | None,
                   num_blocks: int | None = None
                   ) -> tuple[ContinuousEngine, Generation, dict[str, Any]]:
    """`hrm run --scheduler continuous`: build, run, and predict the same passes with the cost
    model (`hrm.continuous.predict_passes`). Returns the engine, the generation and the result
    fields this mode adds (`prediction` is None without a hardware profile; `load_s` the time to
    build the engine)."""
    max_seq = max(len(p) + g for p, g in zip(prompts, gen_lens, strict=True))
    start = time.perf_counter()
    engine, blocks = build_continuous_engine(
        model, policy, device=device, max_seq_len=max_seq, checkpoint=checkpoint,
        gpu_mem_bytes=gpu_mem_bytes, cpu_mem_bytes=cpu_mem_bytes,
        pin_budget_bytes=pin_budget_bytes, sampling=sampling, eos_token_id=eos_token_id,
        seed=seed, num_blocks=num_blocks)
    load_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen, stats = engine.generate_continuous(prompts, gen_lens, num_blocks=blocks)
    extra: dict[str, Any] = {"continuous": stats.counters(), "load_s": load_s,
                             "prediction": None, "steady": stats.steady()}
    if hw is not None:
        workload = Workload.from_lens([len(p) for p in prompts], gen_lens)
        # the r_w the run realized (whole experts per layer), as the prediction's
        realized = policy.in_whole_experts(engine.spec.num_layers, engine.spec.num_experts)
        try:
            passes = pass_model(engine.spec, hw, workload, realized)
            traced = predict_passes(passes, stats.shapes)
            extra["prediction"] = {"throughput_tok_s": traced.throughput_tok_s,
                                   "prefill_s": 0.0, "decode_s": traced.total_s,
                                   "passes": traced.num_passes,
                                   "binding_passes": traced.bottlenecks}
            if extra["steady"] is not None:   # the same passes, predicted
                first, last = extra["steady"]["passes"]
                steady = predict_passes(passes, stats.shapes[first:last + 1])
                extra["steady"]["predicted_throughput_tok_s"] = steady.throughput_tok_s
        except HRMError as exc:
            extra["prediction"] = {"throughput_tok_s": None, "prefill_s": None,
                                   "decode_s": None, "error": str(exc)}
    return engine, gen, extra
