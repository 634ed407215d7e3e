"""The engine: offline batch generation of an MoE model under a Policy.

Sequences are processed in rounds of `batch_size` (N); a round is split into micro-batches of
`micro_batch_size` (mu) sequences, ordered by decreasing prompt length so every micro-batch is a
run of consecutive KV-cache slots with non-increasing context lengths (what the ragged CPU kernel
needs). Each round is prefill (attention on the GPU, KV written to its cache) followed by
gen_len - 1 decode steps. Work items (step, layer, micro-batch) run in one global order:

  cgopipe (MoE-Lightning S1): pre(i) = QKV of item i on the GPU, its q/k/v copied D2H and CPU
      attention started on the worker thread; then post(i-1) = attention output H2D, O projection
      and MoE FFN of the previous item on the GPU. So CPU attention of micro-batch i overlaps the
      GPU FFN of micro-batch i-1, and the copy thread streams the next layer's weights meanwhile.
  cgopipe-serial (S3): the same placement, every item finished before the next starts, weights
      fetched when their layer starts.
  layerwise: attention on the GPU (KV on the GPU for the first r_c of the micro-batches, else read
      from the CPU cache every layer), weights fetched when their layer starts, no overlap.

Prefill of a micro-batch: its prompts' K/V for the CPU cache cross once into pinned memory (d2h
stream) and are filed into blocks by the CPU worker; with several micro-batches, the hidden
states of the ones not running wait in pinned memory between layers (the cost model's
prefill_swap), so the GPU holds one micro-batch's activations. In cgopipe a layer's GPU work
waits for its streamed weights only at its first streamed expert (`StagedLayer.ready`; the
serial schedules wait at the layer's start), and host-side indices reach the GPU through pinned
memory (`index_tensor`), so the launching thread never waits for queued GPU work except at the
routing's per-expert row counts.

With K GPUs, one engine per rank runs the same schedule on the rank's shard (its spec is the
shard's: executor/distributed.py); the O projection and the MoE block end in an all_reduce and
rank 0's sampled tokens are broadcast, so all ranks walk the same items in the same order.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from executor import layers as L
from executor.distributed import Shard
from executor.kernels import paged_attention_extension
from executor.kv_cache import BLOCK_TOKENS, KVCache, kv_cache_bytes
from executor.sampling import Sampling, sample
from executor.schedule import (
    AttentionLink,
    LayerWeightsInFlight,
    StagedLayer,
    Streams,
    host_wait,
    index_tensor,
    on,
    pipeline_threads,
    record,
    wait,
)
from executor.trace import KV_DMA_TRACK, LAUNCH_TRACK, WAIT_TRACK, Span, Tracer
from executor.weights import (
    ModelWeights,
    load_checkpoint,
    random_weights,
    read_model,
    renormalize_topk,
    resident_experts_per_layer,
    torch_dtype,
)
from hrm.cost import pinned_slot_bytes, prefill_workspace_bytes
from hrm.errors import HRMError, InfeasibleError, PolicyError
from hrm.model import ModelSpec
from hrm.policy import Policy, staged_experts
from hrm.units import fmt_bytes
from hrm.workload import Workload


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the run needs on the GPU and in CPU memory, by component."""

    gpu: dict[str, float]
    cpu: dict[str, float]
    kv_gpu_micro_batches: int
    capacities: list[int]
    kv_block_tokens: int
    #: most prompt tokens a prefill micro-batch holds: sizes each slot of the parking pool
    #: (0: prefill parks nothing)
    prefill_tokens: int = 0

    def check(self, gpu_limit_bytes: float, cpu_limit_bytes: float) -> None:
        for where, parts, limit in (("GPU", self.gpu, gpu_limit_bytes),
                                    ("CPU", self.cpu, cpu_limit_bytes)):
            need = sum(parts.values())
            if need > limit:
                detail = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items() if v)
                raise InfeasibleError(f"the policy does not fit {where} memory: needs "
                                      f"{fmt_bytes(need)} ({detail}) but the limit is "
                                      f"{fmt_bytes(limit)}; lower batch_size/micro_batch_size "
                                      f"or weights_gpu_fraction, or raise --"
                                      f"{where.lower()}-mem")


#: the memory plan's entry of the expert staging buffers
WEIGHT_STAGING = "weight staging"


def weight_plan(spec: ModelSpec, policy: Policy, resident: list[int]
                ) -> tuple[dict[str, int], int]:
    """GPU bytes of the weights (dense, resident experts, the policy's staging_buffers of
    hrm.policy.staged_experts experts each) and the bytes of the streamed experts in CPU
    memory."""
    w_elem = int(torch.empty((), dtype=torch_dtype(policy.weight_dtype)).element_size())
    expert = spec.expert_params() * w_elem
    staged = staged_experts(resident, spec.num_experts, policy.expert_kernel)
    return ({"dense weights": spec.dense_params() * w_elem,
             "resident experts": sum(resident) * expert,
             WEIGHT_STAGING: policy.staging_buffers * staged * expert},
            sum(spec.num_experts - r for r in resident) * expert)


def plan_memory(spec: ModelSpec, policy: Policy, resident: list[int], prompt_lens: list[int],
                gen_len: int, kv_block_tokens: int = BLOCK_TOKENS) -> MemoryPlan:
    """Memory of weights (dense + resident experts + the staging buffers on the GPU, streamed
    experts in CPU memory), KV cache (the first r_c of the micro-batches on the GPU, each slot
    sized by `Workload.slot_capacities`, the cost model's rule) and GPU workspace."""
    workload = Workload.from_lens(prompt_lens, gen_len)
    capacities = workload.slot_capacities(policy.batch_size)
    w_elem = int(torch.empty((), dtype=torch_dtype(policy.weight_dtype)).element_size())
    kv_dtype = torch_dtype(policy.kv_dtype)
    weights, streamed = weight_plan(spec, policy, resident)
    n_gpu_mb = round(policy.kv_gpu_fraction * policy.num_micro_batches) \
        if policy.attn_decode_device == "gpu" else 0
    gpu_slots = n_gpu_mb * policy.micro_batch_size
    prefill_tokens = workload.prefill_tokens_per_micro_batch(policy.micro_batch_size)
    gpu = {**weights,
           "KV cache": kv_cache_bytes(spec, capacities[:gpu_slots], kv_dtype, kv_block_tokens),
           "activation workspace": prefill_workspace_bytes(spec, policy, prefill_tokens,
                                                           capacities[0], w_elem)}
    cpu = {"streamed experts": streamed,
           "KV cache": kv_cache_bytes(spec, capacities[gpu_slots:], kv_dtype, kv_block_tokens)}
    # pinned slots per micro-batch: its hidden states between prefill layers, and its q/k/v and
    # output for CPU decode attention
    slots = pinned_slot_bytes(spec, policy.micro_batch_size, policy.num_micro_batches,
                              prefill_tokens, policy.attn_decode_device == "cpu",
                              kv_dtype.itemsize, w_elem)
    cpu.update({f"{name} (pinned)": b for name, b in slots.items()})
    parked = prefill_tokens if policy.num_micro_batches > 1 else 0
    return MemoryPlan(gpu, cpu, n_gpu_mb, capacities, kv_block_tokens, parked)


@dataclass
class MicroBatch:
    seqs: list[int]            # indices into the prompt list
    prompt_lens: list[int]     # non-increasing
    cache: KVCache
    slots: slice
    hidden: torch.Tensor | None = None
    positions: torch.Tensor | None = None   # [n] position of the token being fed (device)
    #: cos, sin of `positions` (L.rope_at) and the positions tensor they were looked up for:
    #: once per step, shared by every layer (Engine._rope)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    rope_of: torch.Tensor | None = None
    tokens: list[torch.Tensor] = field(default_factory=list)  # sampled ids per step (device)
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, if kept


@dataclass
class Generation:
    outputs: list[list[int]]
    prefill_s: float
    decode_s: float
    spans: list[Span]
    decode_windows: list[tuple[float, float]]
    bytes_moved: dict[str, int]
    #: per prompt [gen_len, vocab] fp32 logits, with Engine(keep_logits=True)
    logits: list[torch.Tensor] | None = None


class Engine:
    def __init__(self, weights: ModelWeights, policy: Policy, device: torch.device,
                 plan: MemoryPlan, sampling: Sampling = Sampling(),
                 eos_token_id: int | None = None, keep_logits: bool = False,
                 shard: Shard = Shard()) -> None:
        self.shard = shard
        self.keep_logits = keep_logits  # keep every step's logits (tests compare them with HF)
        self.w, self.spec, self.policy, self.device = weights, weights.spec, policy, device
        self.plan = plan
        self.sampling, self.eos = sampling, eos_token_id
        self.renorm = renormalize_topk(self.spec, weights.config)
        # as plan_memory counted them (weight_plan)
        weights.experts.configure_staging(policy.staging_buffers, policy.expert_kernel)
        weights.gpu_bytes["staging"] = weights.experts.staging_bytes()
        self.cpu_attention = policy.attn_decode_device == "cpu"
        if self.cpu_attention:
            paged_attention_extension()  # built (or loaded) now, not inside a timed decode
        self.overlap = policy.schedule == "cgopipe"
        if policy.attn_prefill_device != "gpu":
            raise PolicyError("the executor runs prefill attention on the GPU: set "
                              "attn_prefill_device='gpu'")
        kv_dtype = torch_dtype(policy.kv_dtype)
        mu = policy.micro_batch_size
        self.n_gpu_mb = plan.kv_gpu_micro_batches
        caps, gpu_slots = plan.capacities, self.n_gpu_mb * mu
        # sizes were checked by plan_memory before the weights were loaded
        self.gpu_cache = KVCache.allocate(self.spec, caps[:gpu_slots], kv_dtype, device,
                                          float("inf"), "GPU", plan.kv_block_tokens)
        self.cpu_cache = KVCache.allocate(self.spec, caps[gpu_slots:], kv_dtype,
                                          torch.device("cpu"), float("inf"), "CPU",
                                          plan.kv_block_tokens)
        self.rope_table = L.rope_tables(self.spec, caps[0], device, weights.lm_head.dtype)
        self.streams = Streams(device)
        cuda = device.type == "cuda"
        qkv = (self.spec.num_heads + 2 * self.spec.num_kv_heads) * self.spec.head_dim
        #: pinned link buffers per micro-batch: q/k/v down, attention output up
        self.attn_link = AttentionLink(policy.num_micro_batches if self.cpu_attention else 0,
                                       mu, qkv,
                                       self.spec.num_heads * self.spec.head_dim, kv_dtype,
                                       weights.lm_head.dtype, self.streams, device)
        #: a host slot per micro-batch for its prefill hidden states between layers (`_park`),
        #: pinned once here, outside the timed phases: pinning costs about 0.6 s/GB. Pinned on
        #: first use inside prefill, they were the likely reason why, on 2026-12-01, 8- and
        #: 16-micro-batch prefills early in a validation grid took twice their prediction while
        #: a later configuration of the same prefill shape matched it
        self.park_host = [torch.empty(plan.prefill_tokens * self.spec.hidden_size,
                                      dtype=weights.embed.dtype, pin_memory=cuda)
                          for _ in range(policy.num_micro_batches)] if plan.prefill_tokens else []
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.bytes = {"weights_h2d_pinned": 0, "weights_h2d_staged": 0, "qkv_d2h": 0,
                      "attn_out_h2d": 0, "kv_d2h": 0, "kv_h2d": 0, "hidden_d2h": 0,
                      "hidden_h2d": 0}
        #: (layer, micro-batch) -> the worker's pending append of the last token (GPU attention)
        self.appends: dict[tuple[int, int], Any] = {}

    # ---- placement ---------------------------------------------------------------------------
    def _micro_batches(self, seqs: list[int], prompts: list[list[int]]) -> list[MicroBatch]:
        mu, mbs = self.policy.micro_batch_size, []
        order = sorted(seqs, key=lambda i: -len(prompts[i]))
        for m, start in enumerate(range(0, len(order), mu)):
            chunk = order[start:start + mu]
            on_gpu = m < self.n_gpu_mb
            first = (m if on_gpu else m - self.n_gpu_mb) * mu
            mbs.append(MicroBatch(chunk, [len(prompts[i]) for i in chunk],
                                  self.gpu_cache if on_gpu else self.cpu_cache,
                                  slice(first, first + len(chunk))))
        return mbs

    # ---- the layer pieces ------------------------------------------------------------------
    def _lm_head_and_sample(self, mb: MicroBatch, last_hidden: torch.Tensor) -> None:
        h = L.rms_norm(last_hidden, self.w.final_norm, self.spec.rms_norm_eps)
        logits = torch.nn.functional.linear(h, self.w.lm_head)
        if self.keep_logits:
            mb.logits.append(logits.float().cpu())
        tokens = self.shard.broadcast(sample(logits, self.sampling, self.generator))
        mb.tokens.append(tokens)
        mb.hidden = self.w.embed[tokens]

    def _weights_ready(self, layer: int, buffer: StagedLayer, tracer: Tracer) -> Any:
        """A callable that makes the compute stream wait for the layer's staging copy, once, at
        the first use of a streamed expert; the wait is traced (WAIT_TRACK), so that the GPU's
        busy time can leave it out."""
        def ready() -> None:
            if not buffer.waited:
                with tracer.span(WAIT_TRACK, "weights_wait", self.streams.compute, layer):
                    buffer.ready()

        return ready

    def _rope(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the micro-batch's positions, looked up when the positions change (once
        per step), not in every layer."""
        if mb.rope_of is not mb.positions:
            mb.rope, mb.rope_of = L.rope_at(self.rope_table, mb.positions), mb.positions
        return mb.rope

    def _experts(self, layer: int, buffer: StagedLayer, tracer: Tracer) -> Any:
        """The expert lookup of `layer` in its staging buffer (the copy waited for lazily)."""
        return self.w.experts.expert_fn(layer, buffer.index,
                                        self._weights_ready(layer, buffer, tracer))

    def _stacked(self, layer: int, buffer: StagedLayer, tracer: Tracer) -> Any:
        """The layer's stacked expert weights for the grouped decode GEMMs (policy
        expert_kernel='grouped'; ExpertStore.stacked), else None (the per-expert loop)."""
        if self.policy.expert_kernel != "grouped":
            return None
        return self.w.experts.stacked(layer, buffer.index,
                                      self._weights_ready(layer, buffer, tracer))

    def _prefill_item(self, layer: int, mb: MicroBatch, buffer: StagedLayer, tracer: Tracer,
                      worker: Any = None) -> None:
        """Prefill of one micro-batch in one layer. The prompts' K/V for a CPU cache cross the
        link once per micro-batch into pinned memory (d2h stream) and are filed into the cache's
        blocks by the CPU worker (`worker`; inline without one) while the GPU goes on with the
        FFN: the worker runs tasks in order, so every later attention sees them."""
        spec, dense = self.spec, self.w.layers[layer]
        with tracer.span("gpu", "prefill", self.streams.compute, layer):
            q, k, v = L.split_qkv(L.attention_in(mb.hidden, dense, spec, self._rope(mb)), spec)
            k_host, v_host, ready = self._prompt_kv_to_cache_device(mb, k, v, layer)
            outs, groups, token, seq = [], [], 0, 0
            while seq < len(mb.seqs):  # equal-length prompts are adjacent: one SDPA call each
                length = mb.prompt_lens[seq]
                n = next((j for j in range(seq, len(mb.seqs)) if mb.prompt_lens[j] != length),
                         len(mb.seqs)) - seq
                shape = (n, length, -1, spec.head_dim)
                qg, kg, vg = (t[token:token + n * length].reshape(shape) for t in (q, k, v))
                outs.append(L.prefill_attention(qg, kg, vg).reshape(n * length, -1))
                groups.append((slice(mb.slots.start + seq, mb.slots.start + seq + n), token,
                               shape))
                token, seq = token + n * length, seq + n
            if worker is None or mb.cache is not self.cpu_cache:
                self._file_prompts(layer, mb, groups, k_host, v_host, ready, tracer)
            else:
                worker.submit(self._file_prompts, layer, mb, groups, k_host, v_host, ready,
                              tracer)
            x = L.attention_out(mb.hidden, torch.cat(outs), dense, self.shard.all_reduce)
            x = L.moe_ffn(x, dense, spec, self._experts(layer, buffer, tracer), self.renorm,
                          self.shard.all_reduce)
            if layer == spec.num_layers - 1:
                ends = index_tensor(mb.prompt_lens, self.device).cumsum(0) - 1
                self._lm_head_and_sample(mb, x[ends])
                mb.positions = index_tensor(mb.prompt_lens, self.device)
            else:
                mb.hidden = x

    def _prompt_kv_to_cache_device(self, mb: MicroBatch, k: torch.Tensor, v: torch.Tensor,
                                   layer: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """k, v on the cache's device: for the engine's CPU cache on CUDA, pinned copies queued on
        the d2h stream after the compute that made them (with the event marking them done);
        other caches (on the GPU, or the continuous scheduler's block pool) get plain copies."""
        if mb.cache is not self.cpu_cache:
            device = mb.cache.k[layer][0].device
            return k.to(device), v.to(device), None
        self.bytes["kv_d2h"] += 2 * k.numel() * k.element_size()
        return self._to_host(k, v)

    def _file_prompts(self, layer: int, mb: MicroBatch, groups: list[tuple[slice, int, tuple]],
                      k: torch.Tensor, v: torch.Tensor, ready: Any, tracer: Tracer) -> None:
        """File the prompts' K/V ([tokens, n_kv, D], on the cache's device once `ready`) into
        the cache: one (slots, first token, [n, L, n_kv, D] shape) per equal-length group."""
        host_wait(ready)
        with tracer.span("cpu_attention", "kv_store", None, layer):
            for slots, token, shape in groups:
                count = shape[0] * shape[1]
                mb.cache.write_prompt(layer, slots, k[token:token + count].reshape(shape),
                                      v[token:token + count].reshape(shape))

    def _gather_with_new_token(self, layer: int, m: int, mb: MicroBatch, context_lens: list[int],
                               k: torch.Tensor, v: torch.Tensor, worker: Any, tracer: Tracer
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """GPU attention's K/V from the CPU cache without stalling the launching thread: the
        cached positions come up in one host-staged copy per tensor (KVCache.gather_host, then
        a DMA on the compute stream), the new token's k/v are written into that copy on the GPU
        (`L.attend_with_new_token`), and their append to the CPU cache goes to the worker once
        they have crossed (d2h stream), ready before this micro-batch's next step."""
        previous = self.appends.pop((layer, m), None)
        if previous is not None:
            previous.result()
        with tracer.span(LAUNCH_TRACK, "kv_gather", None, layer, m):
            k_host, v_host = mb.cache.gather_host(layer, mb.slots, context_lens[0] + 1,
                                                  pinned=self.device.type == "cuda")
        with tracer.span(KV_DMA_TRACK, "kv_h2d", self.streams.compute, layer, m):
            kc, vc = (t.to(self.device, non_blocking=True) for t in (k_host, v_host))
        self.bytes["kv_h2d"] += 2 * kc.numel() * kc.element_size()
        k_host, v_host, ready = self._to_host(k, v)
        self.appends[(layer, m)] = worker.submit(self._append_host, layer, mb, context_lens,
                                                 k_host, v_host, ready, tracer)
        return kc, vc

    def _to_host(self, *tensors: torch.Tensor, into: tuple[torch.Tensor, ...] | None = None
                 ) -> tuple[Any, ...]:
        """Pinned host copies of GPU tensors queued on the d2h stream after the compute that
        made them, into `into` (host tensors of their shapes) or new pinned tensors, and the
        event marking them done. On the CPU: the tensors themselves, or copies into `into`."""
        if self.device.type != "cuda":
            if into is None:
                return (*tensors, None)
            for host, t in zip(into, tensors, strict=True):
                host.copy_(t)
            return (*into, None)
        d2h = self.streams.d2h
        wait(d2h, record(self.streams.compute))
        hosts = []
        with on(d2h):
            for i, t in enumerate(tensors):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if into is None \
                    else into[i]
                host.copy_(t, non_blocking=True)
                t.record_stream(d2h)
                hosts.append(host)
        return (*hosts, record(d2h))

    def _append_host(self, layer: int, mb: MicroBatch, context_lens: list[int],
                     k: torch.Tensor, v: torch.Tensor, ready: Any, tracer: Tracer) -> None:
        """Worker thread: file one token's k/v per sequence into the CPU cache."""
        host_wait(ready)
        with tracer.span("cpu_attention", "kv_append", None, layer):
            mb.cache.append(layer, mb.slots, context_lens, k, v)

    def _decode_pre(self, layer: int, m: int, mb: MicroBatch, worker: Any, tracer: Tracer
                    ) -> Any:
        """QKV on the GPU; then attention: started on the CPU worker (returns its future) or
        done on the GPU (returns the output tensor). The launching thread's time is traced
        (LAUNCH_TRACK): launch_pre, then the hand-off to the worker (handoff_send)."""
        spec, compute = self.spec, self.streams.compute
        with tracer.span(LAUNCH_TRACK, "launch_pre", None, layer, m):
            with tracer.span("gpu", "pre_attn", compute, layer, m):
                qkv = L.attention_in(mb.hidden, self.w.layers[layer], spec, self._rope(mb))
            context_lens = [n + len(mb.tokens) - 1 for n in mb.prompt_lens]  # before this token
            if not self.cpu_attention:
                with tracer.span("gpu", "gpu_attn", compute, layer, m):
                    q, k, v = L.split_qkv(qkv, spec)
                    at = mb.positions   # = context_lens, already on the device
                    if mb.cache is self.cpu_cache:
                        kc, vc = self._gather_with_new_token(layer, m, mb, context_lens, k, v,
                                                             worker, tracer)
                        return L.attend_with_new_token(q, k, v, kc, vc, at)
                    mb.cache.append(layer, mb.slots, context_lens, k, v)
                    kc, vc = mb.cache.gather(layer, mb.slots, context_lens[0] + 1, self.device)
                    return L.gpu_decode_attention(q, kc.to(q.dtype), vc.to(q.dtype), at + 1)
        with tracer.span(LAUNCH_TRACK, "handoff_send", None, layer, m):
            host, done = self.attn_link.send(m, qkv, tracer, layer)
            if done is not None:
                self.bytes["qkv_d2h"] += host.numel() * host.element_size()
            return worker.submit(self._cpu_attention, layer, m, mb, host, done, context_lens,
                                 tracer)

    def _cpu_attention(self, layer: int, m: int, mb: MicroBatch, qkv: torch.Tensor, ready: Any,
                       context_lens: list[int], tracer: Tracer) -> torch.Tensor:
        """Worker thread: append k/v to the CPU cache, attend; the output in pinned memory (the
        launching thread brings it up: AttentionLink.receive)."""
        host_wait(ready)
        spec, n = self.spec, len(mb.seqs)
        with tracer.span("cpu_attention", "cpu_attn", None, layer, m):
            q, k, v = L.split_qkv(qkv, spec)
            mb.cache.append(layer, mb.slots, context_lens, k, v)
            lens = [c + 1 for c in context_lens]
            out = mb.cache.attend(layer, mb.slots, q, lens).reshape(n, -1)
        return self.attn_link.finish(m, out)

    def _decode_post(self, layer: int, m: int, mb: MicroBatch, attention: Any,
                     buffer: StagedLayer, tracer: Tracer) -> None:
        """The attention output (GPU attention's tensor, or the CPU worker's future: waited for
        (attn_wait) and brought up (handoff_receive)), then O projection and MoE FFN."""
        if isinstance(attention, torch.Tensor):
            attn = attention
        else:
            with tracer.span(LAUNCH_TRACK, "attn_wait", None, layer, m):
                host = attention.result()
            with tracer.span(LAUNCH_TRACK, "handoff_receive", None, layer, m):
                attn = self.attn_link.receive(m, host, tracer, layer)
                if self.device.type == "cuda":
                    self.bytes["attn_out_h2d"] += host.numel() * host.element_size()
        compute = self.streams.compute
        dense = self.w.layers[layer]
        with tracer.span(LAUNCH_TRACK, "launch_post", None, layer, m), \
                tracer.span("gpu", "post_attn", compute, layer, m):
            x = L.attention_out(mb.hidden, attn, dense, self.shard.all_reduce)
            x = L.moe_ffn(x, dense, self.spec, self._experts(layer, buffer, tracer),
                          self.renorm, self.shard.all_reduce,
                          self._stacked(layer, buffer, tracer))
            if layer == self.spec.num_layers - 1:
                self._lm_head_and_sample(mb, x)
                mb.positions = mb.positions + 1
            else:
                mb.hidden = x

    # ---- phases ----------------------------------------------------------------------------
    def _prefill(self, mbs: list[MicroBatch], prompts: list[list[int]], weights: Any,
                 visit: int, worker: Any, tracer: Tracer) -> int:
        for mb in mbs:
            mb.positions = torch.cat([torch.arange(n, device=self.device)
                                      for n in mb.prompt_lens])
        park = len(mbs) > 1
        parked: list[Any] = [None] * len(mbs)
        for layer in range(self.spec.num_layers):
            buffer = weights.acquire(visit, self.streams.compute)
            if not self.overlap:   # serial schedules: the layer starts once its weights are in
                buffer.ready()
            for m, mb in enumerate(mbs):
                if layer == 0:  # embedded when its turn comes, not all micro-batches up front
                    ids = index_tensor([t for i in mb.seqs for t in prompts[i]], self.device)
                    mb.hidden = self.w.embed[ids]
                elif parked[m] is not None:
                    mb.hidden = self._unpark(*parked[m])
                self._prefill_item(layer, mb, buffer, tracer, worker)
                if park and layer < self.spec.num_layers - 1:
                    parked[m] = self._park(m, mb.hidden)
                    mb.hidden = None  # the GPU copy is freed once it has crossed
            weights.release(visit, self.streams.compute)
            visit += 1
        return visit

    def _park(self, m: int, hidden: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Micro-batch m's prefill hidden states wait in its pinned slot of the parking pool
        while the other micro-batches run the layer (d2h stream; the GPU copy is freed once it
        has crossed), so the GPU holds one micro-batch's activations, as the cost model assumes.
        The slot is rewritten only after the compute that read its previous contents, which
        waited for their H2D (`_unpark`)."""
        self.bytes["hidden_d2h"] += hidden.numel() * hidden.element_size()
        slot = self.park_host[m][:hidden.numel()].view(hidden.shape)
        return self._to_host(hidden, into=(slot,))

    def _unpark(self, host: torch.Tensor, parked: Any) -> torch.Tensor:
        """The hidden states back on the GPU (h2d stream), ordered before the compute using
        them."""
        h2d = self.streams.h2d
        wait(h2d, parked)
        with on(h2d):  # allocated in the h2d stream's order, which writes it
            hidden = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            hidden.copy_(host, non_blocking=self.device.type == "cuda")
        wait(self.streams.compute, record(h2d))
        if self.device.type == "cuda":  # not reused before the compute stream is done with it
            hidden.record_stream(self.streams.compute)
        self.bytes["hidden_h2d"] += hidden.numel() * hidden.element_size()
        return hidden

    def _decode_step(self, mbs: list[MicroBatch], weights: Any, visit: int, worker: Any,
                     tracer: Tracer) -> int:
        """One decode step over all layers and micro-batches (module docstring for the order)."""
        pending: tuple[int, int, Any] | None = None
        buffers: dict[int, StagedLayer] = {}
        last = len(mbs) - 1

        def post(layer: int, m: int, attention: Any) -> None:
            g = visit + layer
            if g not in buffers:
                buffers[g] = weights.acquire(g, self.streams.compute)
            self._decode_post(layer, m, mbs[m], attention, buffers[g], tracer)
            if m == last:
                weights.release(g, self.streams.compute)

        for layer in range(self.spec.num_layers):
            if not self.overlap:
                buffers[visit + layer] = weights.acquire(visit + layer, self.streams.compute)
                buffers[visit + layer].ready()
            for m, mb in enumerate(mbs):
                if pending is not None and pending[1] == m:  # this micro-batch's previous layer
                    post(*pending)
                    pending = None
                attention = self._decode_pre(layer, m, mb, worker, tracer)
                if pending is not None:
                    post(*pending)
                pending = (layer, m, attention)
                if not self.overlap:
                    post(*pending)
                    pending = None
        if pending is not None:
            post(*pending)
        return visit + self.spec.num_layers

    def generate(self, prompts: list[list[int]], gen_len: int) -> Generation:
        """Generate `gen_len` tokens for every prompt; outputs in input order (cut after EOS)."""
        if not prompts or any(not p for p in prompts):
            raise HRMError("every prompt needs at least one token")
        caps = Workload.from_lens([len(p) for p in prompts], gen_len).slot_capacities(
            self.policy.batch_size)
        if any(need > cap for need, cap in zip(caps, self.plan.capacities, strict=False)):
            raise HRMError("these prompts + gen_len do not fit the KV slots the engine was "
                           "built for; build it for these prompt lengths and gen_len")
        bad = [t for p in prompts for t in p if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise HRMError(f"token id {bad[0]} is outside the vocabulary "
                           f"(size {self.spec.vocab_size})")
        tracer = Tracer(self.device)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        rounds = [order[s:s + self.policy.batch_size]
                  for s in range(0, len(prompts), self.policy.batch_size)]
        visits = len(rounds) * self.spec.num_layers * gen_len
        outputs: list[list[int]] = [[] for _ in prompts]
        logits: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        prefill_s = decode_s = 0.0
        windows = []
        with pipeline_threads(self.w.experts, self.streams, tracer) as (link, worker):
            weights = LayerWeightsInFlight(link, self.spec.num_layers, visits, self.overlap,
                                           self.policy.staging_buffers)
            visit = 0
            with torch.inference_mode():
                for seqs in rounds:
                    mbs = self._micro_batches(seqs, prompts)
                    t0 = tracer.now_s()
                    visit = self._prefill(mbs, prompts, weights, visit, worker, tracer)
                    worker.submit(self._sync).result()  # the prompts are filed, the GPU done
                    t1 = tracer.now_s()
                    for _ in range(gen_len - 1):
                        visit = self._decode_step(mbs, weights, visit, worker, tracer)
                    worker.submit(self._sync).result()  # the GPU and the worker's appends done
                    self.appends.clear()
                    t2 = tracer.now_s()
                    prefill_s, decode_s = prefill_s + t1 - t0, decode_s + t2 - t1
                    windows.append((t1, t2))
                    for mb in mbs:
                        tokens = torch.stack(mb.tokens, dim=1).tolist()
                        for seq, row in zip(mb.seqs, tokens, strict=True):
                            outputs[seq] = self._cut_at_eos(row)
                        if self.keep_logits:
                            for j, seq in enumerate(mb.seqs):
                                logits[seq] = torch.stack([s[j] for s in mb.logits])
            self.bytes["weights_h2d_pinned"] = link.bytes_pinned_path
            self.bytes["weights_h2d_staged"] = link.bytes_staged_path
        return Generation(outputs, prefill_s, decode_s, tracer.spans(), windows, dict(self.bytes),
                          logits if self.keep_logits else None)

    def warm_up(self, prompts: list[list[int]]) -> float:
        """One untimed generate (2 tokens) of a micro-batch of the longest prompts, so that the
        measured run does not pay one-time costs (CUDA's lazy loading of kernels, the caching
        allocator's growth, library handles; on the GPU machine, 2026-11-29, the first prefill
        layer took most of a 19 s run without it). Resets the byte counters and the sampling
        seed. Returns its wall time (s), reported as `warmup_s`."""
        start = time.perf_counter()
        self.generate(sorted(prompts, key=len, reverse=True)[:self.policy.micro_batch_size], 2)
        self.bytes = dict.fromkeys(self.bytes, 0)
        self.generator.manual_seed(self.sampling.seed)
        return time.perf_counter() - start

    def _cut_at_eos(self, tokens: list[int]) -> list[int]:
        if self.eos is not None and self.eos in tokens:
            return tokens[:tokens.index(self.eos) + 1]
        return tokens

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_cpu_mem_bytes() -> int:
    """Peak resident set size of this process (bytes; Linux reports ru_maxrss in KiB). Pinned
    buffers are in it, each at the power of two torch's pinned allocator rounds it to
    (benchmarks/diag_pinned_memory.py)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_weights(model: str, policy: Policy, *, device: torch.device, resident: list[int],
                 checkpoint: str | None = None, pin_budget_bytes: float = 0.0, seed: int = 0,
                 shard: Shard = Shard()) -> ModelWeights:
    """The shard's weights placed as `resident` says: from `checkpoint`, else random at the
    shapes of `model` (a shipped name or config path)."""
    dtype = torch_dtype(policy.weight_dtype)
    if checkpoint:
        return load_checkpoint(checkpoint, dtype=dtype, device=device, resident=resident,
                               page_bytes=policy.weight_page_bytes,
                               pin_budget_bytes=pin_budget_bytes, shard=shard)
    spec, config = read_model(model)
    return random_weights(spec, config, dtype=dtype, device=device, resident=resident,
                          page_bytes=policy.weight_page_bytes,
                          pin_budget_bytes=pin_budget_bytes, seed=seed, shard=shard)


def build_engine(model: str, policy: Policy, *, device: torch.device, prompt_lens: list[int],
                 gen_len: int, checkpoint: str | None = None, gpu_mem_bytes: float,
                 cpu_mem_bytes: float, pin_budget_bytes: float = 0.0,
                 sampling: Sampling = Sampling(), eos_token_id: int | None = None,
                 keep_logits: bool = False, seed: int = 0,
                 kv_block_tokens: int = BLOCK_TOKENS, shard: Shard = Shard()) -> Engine:
    """Check the memory plan of the shard (memory limits are per rank), then load (checkpoint)
    or create (random) its weights and the engine. `model` names a shipped config or a config
    path when `checkpoint` is None."""
    spec = shard.spec(read_model(checkpoint or model)[0])
    resident = resident_experts_per_layer(spec, policy.weights_gpu_fraction)
    plan = plan_memory(spec, policy, resident, prompt_lens, gen_len, kv_block_tokens)
    plan.check(gpu_mem_bytes, cpu_mem_bytes)
    weights = load_weights(model, policy, device=device, resident=resident,
                           checkpoint=checkpoint, pin_budget_bytes=pin_budget_bytes, seed=seed,
                           shard=shard)
    return Engine(weights, policy, device, plan, sampling, eos_token_id, keep_logits, shard)


def run_facts(engine: Engine) -> dict[str, Any]:
    """What result.json reports of an engine after its run: placement as realized, the memory
    plan and the peak memory of every rank (rank order; on the CPU stand-in the "GPU" peak is
    the bytes of the tensors in the GPU role)."""
    store = engine.w.experts
    if engine.device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(engine.device)
    else:
        peak_gpu = sum(engine.w.gpu_bytes.values()) + engine.gpu_cache.nbytes
    layers = range(len(store.cpu))
    pinned_bytes = sum(store.pinned_bytes(i) for i in layers)
    pageable_bytes = sum(store.streamed_bytes(i) for i in layers) - pinned_bytes
    return {"realized": {"weights_gpu_fraction": store.realized_gpu_fraction(),
                         "kv_gpu_fraction": engine.n_gpu_mb / engine.policy.num_micro_batches,
                         "resident_experts_per_layer": store.resident,
                         "fully_pinned_layers": sum(store.fully_pinned(i) for i in layers),
                         "pinned_weight_bytes": pinned_bytes,
                         "pageable_weight_bytes": pageable_bytes},
            "gpu_mem_plan_bytes": engine.plan.gpu, "cpu_mem_plan_bytes": engine.plan.cpu,
            "peak_gpu_mem_bytes_per_rank": engine.shard.gather(peak_gpu),
            "peak_cpu_mem_bytes_per_rank": engine.shard.gather(peak_cpu_mem_bytes())}


def generate_on_rank(shard: Shard, model: str, policy: Policy, prompts: list[list[int]],
                     gen_len: int, build: dict[str, Any]) -> dict[str, Any]:
    """One rank's run: cap its GPU at build["gpu_mem_bytes"], build the engine of its shard
    (`build_engine` keyword arguments `build`; device "cuda" means this rank's GPU), generate.
    Returns the generation, the load time and `run_facts`."""
    device = build["device"]
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        if build["gpu_mem_bytes"] < total:
            torch.cuda.set_per_process_memory_fraction(build["gpu_mem_bytes"] / total, device)
    start = time.perf_counter()
    engine = build_engine(model, policy, prompt_lens=[len(p) for p in prompts], gen_len=gen_len,
                          shard=shard, **dict(build, device=device))
    load_s = time.perf_counter() - start
    warmup_s = engine.warm_up(prompts) if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = engine.generate(prompts, gen_len)
    return {"generation": gen, "load_s": load_s, "warmup_s": warmup_s, **run_facts(engine)}
