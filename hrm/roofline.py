"""The Hierarchical Roofline Model (MoE-Lightning §3) and the operators of one decoder layer.

Levels: i = GPU (peak P^g, HBM bandwidth B^g), j = CPU (P^c, DRAM bandwidth B^c), linked by
B^{c,g} (PCIe host-to-device). For a task x, I^i_x = FLOPs / bytes x reads at level i (Def. 3.1).

    (7)  P^i_x = min(P^i_peak, B^i_peak I^i_x, B^{j,i}_peak I^j_x)   data fetched from level j
    (8)  P^i_x = min(P^i_peak, B^i_peak I^i_x)                      data already at level i
    (9)  P1:  I^j = min(P^j_peak, B^j_peak I^j_x) / B^{j,i}_peak    below: compute in place (CPU)
    (10) P2:  I^j = min(P^i_peak, B^i_peak I^i_x) / B^{j,i}_peak    below: bound by the link
    (11) balance point: B^i_peak I^i_x = B^{j,i}_peak I^j_x

`layer_operators` lists the work of one decoder layer for one whole batch (N = mu * n_ub
sequences), with FLOPs and the bytes it touches at each level; `hrm.cost` times these operators,
and `hrm roofline` places them on the plot. With G GPUs the operators are those of one GPU's
share (tensor or expert parallel, see `layer_operators`) plus its all-reduces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from hrm.hardware import HardwareProfile
from hrm.model import ModelSpec
from hrm.units import dtype_bytes

#: activations, attention inputs/outputs and logits are bf16 on the GPU; GEMMs run in bf16
#: (int8/fp8 weights are dequantized to 16 bits for the matmul)
ACT_DTYPE = "bf16"
COMPUTE_DTYPE = "bf16"
#: Host-issued operations per micro-batch (what `launches` counts, each costing the profile's
#: op_overhead_s on the GPU stage): the aten operations the executor's layer code
#: (executor/layers.py) dispatches with bf16 activations (ACT_DTYPE), views and casts included,
#: since each costs the launching thread its Python and dispatcher time and decode micro-batches
#: are small enough to be bound by it. Counted on the executor by
#: tests/test_roofline.py::test_op_counts_match_the_executor (until 2026-12-01 they were counted
#: with fp32 weights, which dispatch no casts: 25 operations per 8-expert micro-batch too few).
#: attention_in: RMSNorm, the fused Q/K/V projection, RoPE on q and k together, in place (the
#: cos/sin lookup is once per step, not per layer). 41 until the second session of 2026-12-04:
#: three projections, RoPE on q and k apart in transformers' form, the lookup in every layer;
#: and the hand-off concatenated q, k and v (4 more, outside this count)
OPS_ATTENTION_IN = 16
#: attention_out: output projection and residual
OPS_ATTENTION_OUT = 3
#: routing and the token permutation around the experts: router GEMM, softmax, top-k, sort,
#: bincount, gather, gate weighting, scatter-add, residual, post-attention RMSNorm
OPS_MOE_ROUTING = 30
#: per touched expert: its weight views, the rows' slice, the gate/up GEMM and its split, SiLU,
#: product and the down GEMM written in place into the sorted output
OPS_PER_EXPERT = 13
#: routing and all experts of a decode micro-batch with policy expert_kernel='grouped'
#: (executor.layers.routed_experts_grouped): OPS_MOE_ROUTING's routing, the cumulative row
#: counts on the device instead of their host copy, and two grouped GEMMs with the split, SiLU
#: and product between them, whatever the experts touched
OPS_MOE_GROUPED = 34
#: the executor's decode launch blocks whose host seconds per operation `hrm profile` measures
#: by their own code (hrm.profile.launch_blocks; HardwareProfile gpu.block_op_s): the
#: pre-attention block (executor.layers.attention_in: OPS_ATTENTION_IN operations), the
#: post-attention block with grouped experts (attention_out + moe_ffn: OPS_ATTENTION_OUT +
#: OPS_MOE_GROUPED) and GPU decode attention (OPS_GPU_DECODE_ATTENTION). A 1-element add_
#: (op_overhead_s) is the cheapest operation there is: on the H200 machine (2026-12-04) it
#: measured 9 us, while in the pipeline the first two blocks took about 28 and 55 us per
#: operation (benchmarks/results/h200_2026-12-04/README.md)
ATTENTION_IN_BLOCK = "attention_in"
POST_GROUPED_BLOCK = "post_grouped"
GPU_ATTENTION_BLOCK = "gpu_attention"
#: the profile curve of the routed experts as one grouped GEMM pair (FLOP/s vs rows per expert:
#: hrm.profile.grouped_experts_series, executor.layers.routed_experts_grouped), for the expert
#: FFN of layers that run it (cost falls back to 'gpu_gemm' where a profile lacks it)
GROUPED_EXPERTS_CURVE = "gpu_grouped_experts"
#: decode attention on the GPU: q, k, v split out of the fused projection, the new token's k/v
#: written into the gathered K/V at the micro-batch's positions (on the device already), the
#: mask and SDPA (executor.layers.attend_with_new_token); the CPU cache's gather is timed as a
#: memcpy (kv_gather), and the CUDA-only copies around it (the gathered K/V's two DMAs, the new
#: k/v's two pinned copies down for the CPU cache) are not counted. Until the second session of
#: 2026-12-04 the positions crossed the link again in every layer (index_tensor)
OPS_GPU_DECODE_ATTENTION = 22
#: the launching thread's hand-off of one micro-batch's decode attention to the CPU worker and
#: back (q/k/v down, submit, the output up through its pinned buffer's alias): an operator on the
#: GPU stage (that thread drives the GPU), `launches` = hand-offs, each costing the profile's
#: gpu.attention_handoff_s (executor.schedule.AttentionLink; hrm.profile.attention_handoff)
HANDOFF_OP = "attention_handoff"
#: KV cache block (tokens): each sequence's KV is allocated in whole blocks (the executor's
#: block KV cache, executor/kv_cache.py, and the continuous scheduler use the same)
KV_BLOCK_TOKENS = 64
#: bytes per logit (the LM head's output is kept in fp32 for sampling)
LOGIT_BYTES = 4

LAYER_KINDS = ("moe", "dense")
PHASES = ("prefill", "decode")
#: all-reduces of the hidden states per layer and micro-batch with G > 1: after attention (the
#: O projection's partial sums) and after the MLP / MoE block
ALLREDUCES_PER_LAYER = 2


# ---- the roofline equations ------------------------------------------------------------------
def operational_intensity(flops: float, n_bytes: float) -> float:
    """Def. 3.1: I = FLOPs / bytes (FLOP/byte); infinite when nothing is read."""
    return flops / n_bytes if n_bytes > 0 else float("inf")


def attainable_flops(peak_flops: float, local_bps: float, local_intensity: float,
                     link_bps: float | None = None, remote_intensity: float | None = None) -> float:
    """Eq. (7) when the data comes over a link from level j (link_bps = B^{j,i},
    remote_intensity = I^j), else Eq. (8). FLOP/s."""
    roof = min(peak_flops, local_bps * local_intensity)
    if link_bps is not None and remote_intensity is not None:
        roof = min(roof, link_bps * remote_intensity)
    return roof


def ridge_point(peak_flops: float, bandwidth_bps: float) -> float:
    """Intensity (FLOP/byte) where a level's memory roof meets its compute roof: P / B."""
    return peak_flops / bandwidth_bps


def turning_point_p1(cpu_peak_flops: float, cpu_bps: float, cpu_intensity: float,
                     link_bps: float) -> float:
    """Eq. (9): the link intensity I^j below which moving the data to the GPU is slower than
    computing where it lives (on the CPU). FLOP/byte."""
    return min(cpu_peak_flops, cpu_bps * cpu_intensity) / link_bps


def turning_point_p2(gpu_peak_flops: float, gpu_bps: float, gpu_intensity: float,
                     link_bps: float) -> float:
    """Eq. (10): the link intensity I^j below which a GPU task is bound by the link. FLOP/byte."""
    return min(gpu_peak_flops, gpu_bps * gpu_intensity) / link_bps


def balance_point(gpu_bps: float, gpu_intensity: float, link_bps: float) -> float:
    """Eq. (11): the link intensity I^j at which B^i I^i = B^{j,i} I^j (HBM and link roofs
    meet). FLOP/byte."""
    return gpu_bps * gpu_intensity / link_bps


# ---- operators of one decoder layer ------------------------------------------------------------
@dataclass(frozen=True)
class Operator:
    """One piece of work of a decoder layer over a whole batch, run on `device`: a processor
    ('gpu', 'cpu') or, for data movement, a link direction ('h2d', 'd2h').

    `flops` (FLOP), `gpu_bytes` (HBM bytes touched when run on the GPU, summed over micro-batches),
    `cpu_bytes` (DRAM bytes touched when run on the CPU), `link_bytes` (bytes that must cross the
    link for it: the weights or KV it needs, or the bytes a transfer moves). `rows` is the M of its
    GEMMs (0 if not a GEMM); `launches` counts kernel launches, or copies for a transfer."""

    name: str
    device: str
    flops: float
    gpu_bytes: float
    cpu_bytes: float
    link_bytes: float
    rows: float
    launches: float
    #: the profile curve that times its GEMMs on the GPU (achieved FLOP/s vs `rows`):
    #: 'gpu_gemm', or GROUPED_EXPERTS_CURVE for the routed experts as grouped GEMMs
    curve: str = "gpu_gemm"
    #: the executor's launch block whose measured host seconds per operation time its
    #: `launches` (HardwareProfile gpu.block_op_s: ATTENTION_IN_BLOCK, POST_GROUPED_BLOCK,
    #: GPU_ATTENTION_BLOCK, each a GPUTier field <block>_op_s); "" for the profile's tiny-op
    #: launch cost (op_overhead_s)
    host_block: str = ""

    @property
    def gpu_intensity(self) -> float:
        return operational_intensity(self.flops, self.gpu_bytes)

    @property
    def cpu_intensity(self) -> float:
        return operational_intensity(self.flops, self.cpu_bytes)

    @property
    def link_intensity(self) -> float:
        return operational_intensity(self.flops, self.link_bytes)


def experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts hit by `tokens` tokens under balanced random top-k routing:
    E_act = E (1 - (1 - k/E)^tokens)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def busiest_gpu_pairs(num_experts: int, top_k: int, tokens: float, num_gpus: int) -> float:
    """Expert parallel: expected token-expert pairs of the busiest of G GPUs when the E experts
    are dealt round-robin (the GPU with ceil(E/G) experts). Per token, the pairs landing on one
    GPU with m experts are hypergeometric (mean k m / E, variance k (m/E)(1 - m/E)(E - k)/(E - 1));
    over T tokens the load is about normal, and the expected maximum of G of them is bounded by
    mean + sigma sqrt(2 ln G) (the Gaussian maximal inequality; the bound is used as the
    estimate). Capped at T min(k, m)."""
    m = math.ceil(num_experts / num_gpus)
    p = m / num_experts
    mean = tokens * top_k * p
    var = tokens * top_k * p * (1.0 - p) * (num_experts - top_k) / max(num_experts - 1, 1)
    return min(mean + math.sqrt(2.0 * math.log(num_gpus) * var), tokens * min(top_k, m))


def qkv_elements_per_token(model: ModelSpec) -> int:
    """Per token and layer: the query plus the new cache entry (K and V, or MLA's latent) that
    pre-attention produces and CPU attention consumes."""
    return model.num_heads * model.qk_head_dim + model.kv_elements_per_token_per_layer()


def attn_out_elements_per_token(model: ModelSpec) -> int:
    """Per token and layer: the attention output (before the O projection)."""
    return model.num_heads * model.v_dim


def kv_bytes_per_token_layer(model: ModelSpec, kv_dtype: str) -> float:
    return model.kv_elements_per_token_per_layer() * dtype_bytes(kv_dtype)


def whole_block_tokens(tokens: float) -> float:
    """`tokens` rounded up to whole KV_BLOCK_TOKENS blocks, ceil(tokens / T) T: the positions a
    sequence's KV takes in the block cache (executor/kv_cache.py), and those the KV gather for
    GPU attention copies and sends for a context of `tokens` (KVCache.gather_host copies every
    row of a micro-batch to its last block)."""
    return math.ceil(tokens / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def _gemm(name: str, model_params: float, tokens_per_ub: float, num_ub: int,
          weight_dtype: str, in_width: float, out_width: float, launches_per_ub: float,
          host_block: str = "") -> Operator:
    """A dense GEMM of `model_params` weights over `tokens_per_ub` rows, run once per
    micro-batch: the weights and the in/out activations are read/written in HBM."""
    act = dtype_bytes(ACT_DTYPE)
    weight_bytes = model_params * dtype_bytes(weight_dtype)
    return Operator(
        name=name, device="gpu", flops=2.0 * model_params * tokens_per_ub * num_ub,
        gpu_bytes=num_ub * (weight_bytes + tokens_per_ub * (in_width + out_width) * act),
        cpu_bytes=num_ub * weight_bytes, link_bytes=weight_bytes, rows=tokens_per_ub,
        launches=num_ub * launches_per_ub, host_block=host_block)


def layer_operators(model: ModelSpec, *, micro_batch_size: int, num_micro_batches: int,
                    context_len: float, phase: str, attn_device: str = "cpu",
                    layer_kind: str = "moe", weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                    prompt_len: float = 1.0, num_gpus: int = 1,
                    parallelism: str = "tp", grouped_share: float = 0.0,
                    padded_context_len: float | None = None) -> list[Operator]:
    """The operators of one decoder layer for a batch of N = mu * n_ub sequences.

    `grouped_share`: the fraction of the layers whose routed experts run as grouped GEMMs
    (OPS_MOE_GROUPED launches per micro-batch in all, instead of OPS_MOE_ROUTING + OPS_PER_EXPERT
    per touched expert); a layer's launches are the mean over the layers.

    decode: one new token per sequence, attending over `context_len` cached tokens; on the GPU
    over `padded_context_len` (default `context_len`): its dense KV copy pads every row of a
    micro-batch to the longest (Workload.padded_decode_context), and the gather and DMA of a
    CPU KV cache move that copy. CPU attention reads the ragged contexts in place.
    prefill: `prompt_len` tokens per sequence, causal attention (mean context prompt_len / 2).
    The weight transfer lists the bytes of all routed experts (r_w = 0); the KV transfers all of
    the KV (r_c = 0); `hrm.cost` scales them by (1 - r_w) and (1 - r_c).

    With G = `num_gpus` > 1 the operators are one GPU's share (every GPU sees every token):
    attention heads (Q/K/V/O projections, KV heads; MLA's shared latent stays whole), shared
    experts and dense MLPs are split 1/G; the router, norms and the hidden states are
    replicated. parallelism 'tp' splits every routed expert's intermediate dim 1/G (all touched
    experts, each 1/G as wide); 'ep' deals whole experts round-robin: a GPU holds ceil(E/G) of
    them, touches E_act ceil(E/G)/E of them and runs the busiest GPU's token-expert pairs
    (`busiest_gpu_pairs`). Two all-reduces of the hidden states per layer and micro-batch
    (device 'comm', `link_bytes` = what each GPU sends in a ring). CPU attention is listed
    whole: the G processes share one CPU tier."""
    if phase not in PHASES or layer_kind not in LAYER_KINDS:
        raise ValueError(f"phase must be in {PHASES} and layer_kind in {LAYER_KINDS}")
    mu, n_ub, g = micro_batch_size, num_micro_batches, num_gpus
    act = dtype_bytes(ACT_DTYPE)
    tokens_per_seq = prompt_len if phase == "prefill" else 1.0
    tokens_ub = mu * tokens_per_seq                 # rows of every GEMM of one micro-batch
    tokens = tokens_ub * n_ub                       # tokens of the whole batch
    h1 = model.hidden_size
    heads = 1.0 / g                                 # this GPU's share of the attention heads
    kv_heads = 1.0 if model.is_mla else heads       # MLA's latent KV is shared by all heads
    q_width = model.num_heads * model.qk_head_dim
    kv_width = model.kv_elements_per_token_per_layer()
    qkv_width = q_width * heads + kv_width * kv_heads
    out_width = attn_out_elements_per_token(model) * heads
    kv_token_all = kv_bytes_per_token_layer(model, kv_dtype)
    kv_token = kv_token_all * kv_heads
    attn_params = model.attention_params()
    o_params = model.num_heads * model.v_dim * h1
    # the launch blocks whose host time per operation the profile measures (decode): the
    # pre-attention block, and the post-attention block where every layer runs grouped
    post_block = POST_GROUPED_BLOCK if phase == "decode" and grouped_share == 1.0 else ""
    ops = [
        _gemm("qkv_proj", (attn_params - o_params) * heads, tokens_ub, n_ub, weight_dtype, h1,
              qkv_width, OPS_ATTENTION_IN, ATTENTION_IN_BLOCK if phase == "decode" else ""),
    ]

    # attention core: decode reads the whole cached context; prefill is causal, mean ctx s/2.
    # On the CPU the G processes' shares run at once on one CPU: listed as one whole operator
    on_gpu = attn_device == "gpu"
    kv_share = kv_heads if on_gpu else 1.0
    read_ctx = padded_context_len if on_gpu and padded_context_len is not None else context_len
    attn_ctx = read_ctx if phase == "decode" else tokens_per_seq / 2.0
    attn_flops = tokens * model.attention_core_flops_per_token(attn_ctx) * (heads if on_gpu
                                                                            else 1.0)
    kv_read_bytes = (mu * n_ub * read_ctx if phase == "decode" else tokens) * \
        kv_token_all * kv_share
    io_width = (qkv_width + out_width if on_gpu
                else q_width + kv_width + attn_out_elements_per_token(model))
    io_bytes = tokens * io_width * act
    ops.append(Operator(
        name=f"attention_{phase}", device=attn_device, flops=attn_flops,
        gpu_bytes=kv_read_bytes + io_bytes, cpu_bytes=kv_read_bytes + io_bytes,
        link_bytes=kv_read_bytes, rows=0.0,
        launches=n_ub * (OPS_GPU_DECODE_ATTENTION if on_gpu and phase == "decode" else 1),
        host_block=GPU_ATTENTION_BLOCK if on_gpu and phase == "decode" else ""))
    ops.append(_gemm("o_proj", o_params * heads, tokens_ub, n_ub, weight_dtype, out_width, h1,
                     OPS_ATTENTION_OUT, post_block))

    if layer_kind == "dense":
        ops.append(_gemm("dense_mlp", model.dense_mlp_params() * heads, tokens_ub, n_ub,
                         weight_dtype, h1, h1 + 2 * model.dense_intermediate_size * heads,
                         OPS_PER_EXPERT))
    else:
        ops.append(_gemm("router", model.router_params(), tokens_ub, n_ub, weight_dtype, h1,
                         model.num_experts, (1.0 - grouped_share) * OPS_MOE_ROUTING
                         + grouped_share * OPS_MOE_GROUPED, post_block))
        if model.shared_intermediate_size:
            ops.append(_gemm("shared_experts", model.shared_expert_params() * heads, tokens_ub,
                             n_ub, weight_dtype, h1,
                             h1 + 2 * model.shared_intermediate_size * heads,
                             OPS_PER_EXPERT))
        ops += _expert_operators(model, tokens_ub, n_ub, weight_dtype, g, parallelism,
                                 1.0 - grouped_share)

    # data movement between the tiers for this placement (this GPU's share, over its link)
    if attn_device == "cpu":
        if phase == "decode":
            ops.append(Operator(name=HANDOFF_OP, device="gpu", flops=0.0, gpu_bytes=0.0,
                                cpu_bytes=0.0, link_bytes=0.0, rows=0.0, launches=n_ub))
        ops.append(_transfer("qkv_d2h", "d2h", tokens * qkv_width * act, n_ub))
        ops.append(_transfer("attn_out_h2d", "h2d", tokens * out_width * act, n_ub))
    elif phase == "decode":
        # FlexGen S4: the CPU-resident KV comes to the GPU (gathered into pinned memory on the
        # host, then one DMA), whole blocks; the new token's entry goes back
        gathered_bytes = mu * n_ub * whole_block_tokens(read_ctx) * kv_token
        ops.append(_transfer("kv_gather", "h2d", gathered_bytes, n_ub))
        ops.append(_transfer("kv_h2d", "h2d", gathered_bytes, n_ub))
        ops.append(_transfer("kv_append_d2h", "d2h", tokens * kv_token, n_ub))
    if phase == "prefill":
        if attn_device == "gpu":
            ops.append(_transfer("kv_offload_d2h", "d2h", tokens * kv_token, n_ub))
        if n_ub > 1:
            # the batch's hidden states wait in pinned CPU memory between micro-batches
            ops.append(_transfer("hidden_h2d", "h2d", tokens * h1 * act, n_ub))
            ops.append(_transfer("hidden_d2h", "d2h", tokens * h1 * act, n_ub))
    if g > 1:   # ring all-reduce of S bytes: each GPU sends 2 (G - 1) / G * S
        calls = ALLREDUCES_PER_LAYER * n_ub
        ops.append(Operator(name="allreduce", device="comm", flops=0.0, gpu_bytes=0.0,
                            cpu_bytes=0.0, link_bytes=2.0 * (g - 1) / g * calls * tokens_ub * h1
                            * act, rows=0.0, launches=calls))
    return ops


def _expert_operators(model: ModelSpec, tokens_ub: float, n_ub: int, weight_dtype: str,
                      num_gpus: int, parallelism: str, loop_share: float = 1.0
                      ) -> list[Operator]:
    """One GPU's routed-expert FFN and its weight stream (see `layer_operators`); the
    per-expert launches in the `loop_share` of the layers that loop over their experts."""
    act = dtype_bytes(ACT_DTYPE)
    h1 = model.hidden_size
    e, k, h2 = model.num_experts, model.top_k, model.expert_intermediate_size
    e_act = experts_touched(e, k, tokens_ub)
    expert_w = model.expert_bytes(weight_dtype)
    routed_rows = tokens_ub * k                     # token-expert pairs of one micro-batch
    if parallelism == "tp":
        width = 1.0 / num_gpus                      # every expert, 1/G of its intermediate dim
        touched, pairs, held = e_act, routed_rows, float(e)
    elif parallelism == "ep":
        width = 1.0                                 # whole experts, ceil(E/G) of them here
        held = float(math.ceil(e / num_gpus))
        touched = e_act * held / e
        pairs = (routed_rows if num_gpus == 1
                 else busiest_gpu_pairs(e, k, tokens_ub, num_gpus))
    else:
        raise ValueError(f"parallelism must be 'tp' or 'ep', got {parallelism!r}")
    return [
        Operator(
            name="expert_ffn", device="gpu",
            flops=n_ub * pairs * model.expert_params() * 2.0 * width,
            gpu_bytes=n_ub * (touched * expert_w * width + pairs * (2 * h1 + 3 * h2 * width)
                              * act),
            cpu_bytes=n_ub * touched * expert_w * width, link_bytes=held * expert_w * width,
            rows=routed_rows / e_act, launches=loop_share * n_ub * touched * OPS_PER_EXPERT,
            curve="gpu_gemm" if loop_share else GROUPED_EXPERTS_CURVE),
        Operator(
            name="weight_h2d", device="h2d", flops=0.0, gpu_bytes=0.0,
            cpu_bytes=held * expert_w * width, link_bytes=held * expert_w * width, rows=0.0,
            launches=1),
    ]


def _transfer(name: str, direction: str, n_bytes: float, copies: int) -> Operator:
    return Operator(name=name, device=direction, flops=0.0, gpu_bytes=n_bytes, cpu_bytes=n_bytes,
                    link_bytes=n_bytes, rows=0.0, launches=copies)


def head_operators(model: ModelSpec, *, micro_batch_size: int, num_micro_batches: int,
                   weight_dtype: str = "bf16") -> list[Operator]:
    """The LM head for one token of each of the N sequences (once per decode step, and once at
    the end of prefill), fp32 logits."""
    h1, vocab = model.hidden_size, model.vocab_size
    op = _gemm("lm_head", vocab * h1, micro_batch_size, num_micro_batches, weight_dtype, h1, 0, 1)
    logits = num_micro_batches * micro_batch_size * vocab * LOGIT_BYTES
    return [replace(op, gpu_bytes=op.gpu_bytes + logits)]


# ---- turning batch sizes --------------------------------------------------------------------
def expert_ffn_link_intensity(model: ModelSpec, batch_size: float,
                              weight_dtype: str = "bf16") -> float:
    """I^c of the decode expert FFN with all experts streamed: the FLOPs of N tokens over the
    bytes of all routed experts of one layer, 2 N k / (E b). FLOP/byte."""
    return 2.0 * batch_size * model.top_k / (model.num_experts * dtype_bytes(weight_dtype))


def turning_batch_size(model: ModelSpec, hw: HardwareProfile, *, roof: str = "compute",
                       micro_batch_size: int = 128, weight_dtype: str = "bf16") -> float:
    """Batch size N (sequences per pass over the weights) at which the decode expert FFN, with
    every routed expert streamed over the link, stops being link bound:

    roof='compute': B^{c,g} I^c(N) = P^g_peak          (P2 with a compute-bound GPU kernel)
    roof='hbm':     B^{c,g} I^c(N) = B^g I^g(mu)         (balance point, Eq. 11)

    I^g(mu) is the HBM intensity of one micro-batch's expert GEMMs (touched experts' weights)."""
    link_bps = hw.link.h2d_pinned_bps
    if roof == "compute":
        target_flops = hw.gpu.flops(COMPUTE_DTYPE)
    elif roof == "hbm":
        ops = layer_operators(model, micro_batch_size=micro_batch_size, num_micro_batches=1,
                              context_len=1.0, phase="decode", weight_dtype=weight_dtype)
        ffn = next(op for op in ops if op.name == "expert_ffn")
        target_flops = hw.gpu.hbm_bandwidth_bps * ffn.gpu_intensity
    else:
        raise ValueError(f"roof must be 'compute' or 'hbm', got {roof!r}")
    per_seq_intensity = expert_ffn_link_intensity(model, 1.0, weight_dtype)
    return target_flops / (link_bps * per_seq_intensity)


# ---- the HRM of one decode layer (what `hrm roofline` plots) --------------------------------
@dataclass(frozen=True)
class OperatorPoint:
    """An operator on the HRM: its intensities (FLOP/byte) at each level, the attainable
    FLOP/s with its data on the GPU (Eq. 8), fetched over the link (Eq. 7) and on the CPU
    (Eq. 8 at the CPU), and its turning points P1 (Eq. 9), P2 (Eq. 10) and balance (Eq. 11)."""

    name: str
    gpu_intensity: float
    cpu_intensity: float
    link_intensity: float
    gpu_resident_flops: float
    offloaded_flops: float
    cpu_flops: float
    p1_intensity: float
    p2_intensity: float
    balance_intensity: float

    @property
    def best_device(self) -> str:
        """Left of P1 moving the data costs more than computing where it lives (the CPU)."""
        return "cpu" if self.link_intensity < self.p1_intensity else "gpu"


@dataclass(frozen=True)
class RooflineSummary:
    model: str
    hardware: str
    batch_size: int
    micro_batch_size: int
    context_len: float
    gpu_peak_flops: float
    gpu_bps: float
    cpu_peak_flops: float
    cpu_bps: float
    link_bps: float
    ridge_points: dict[str, float]
    operators: list[OperatorPoint]
    turning_batch_sizes: dict[str, float]

    def to_dict(self) -> dict:
        out = asdict(self)
        for op, point in zip(out["operators"], self.operators, strict=True):
            op["best_device"] = point.best_device
        return out


def summarize(model: ModelSpec, hw: HardwareProfile, *, batch_size: int, micro_batch_size: int,
              context_len: float, weight_dtype: str = "bf16",
              kv_dtype: str = "bf16") -> RooflineSummary:
    """Roofs, ridge points and the decode operators of one MoE layer at (N, mu, context)."""
    p_g, b_g = hw.gpu.flops(COMPUTE_DTYPE), hw.gpu.hbm_bandwidth_bps
    p_c, b_c, b_cg = hw.cpu.peak_flops, hw.cpu.dram_bandwidth_bps, hw.link.h2d_pinned_bps
    n_ub = max(1, batch_size // micro_batch_size)
    ops = layer_operators(model, micro_batch_size=micro_batch_size, num_micro_batches=n_ub,
                          context_len=context_len, phase="decode", attn_device="cpu",
                          weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    points = []
    for op in ops:
        if op.flops <= 0:
            continue
        i_g, i_c, i_l = op.gpu_intensity, op.cpu_intensity, op.link_intensity
        points.append(OperatorPoint(
            name=op.name, gpu_intensity=i_g, cpu_intensity=i_c, link_intensity=i_l,
            gpu_resident_flops=attainable_flops(p_g, b_g, i_g),
            offloaded_flops=attainable_flops(p_g, b_g, i_g, b_cg, i_l),
            cpu_flops=attainable_flops(p_c, b_c, i_c),
            p1_intensity=turning_point_p1(p_c, b_c, i_c, b_cg),
            p2_intensity=turning_point_p2(p_g, b_g, i_g, b_cg),
            balance_intensity=balance_point(b_g, i_g, b_cg)))
    return RooflineSummary(
        model=model.name, hardware=hw.name, batch_size=micro_batch_size * n_ub,
        micro_batch_size=micro_batch_size, context_len=context_len, gpu_peak_flops=p_g,
        gpu_bps=b_g, cpu_peak_flops=p_c, cpu_bps=b_c, link_bps=b_cg,
        ridge_points={"gpu": ridge_point(p_g, b_g), "cpu": ridge_point(p_c, b_c),
                      "link": ridge_point(p_g, b_cg)},
        operators=points,
        turning_batch_sizes={
            roof: turning_batch_size(model, hw, roof=roof, micro_batch_size=micro_batch_size,
                                     weight_dtype=weight_dtype) for roof in ("compute", "hbm")})
