"""Decoder-layer math shared by Mixtral and Qwen2-MoE (one code path; the architectures differ only
in QKV biases, shared experts with a sigmoid gate, and whether top-k router weights are
renormalized). Functions are pure: tensors in, tensors out; weights come as `DenseLayer` views and
an `expert` callable, so the same code runs on GPU-resident, streamed or CPU tensors.

Per layer (pre-norm):   a = x + W_o Attn(RoPE(W_q n1(x)), RoPE(W_k n1(x)), W_v n1(x))
                        y = a + sum_{e in topk} g_e FFN_e(n2(a)) [+ sigmoid(w_s n2(a)) FFN_s(n2(a))]
with FFN(h) = W2 (silu(W1 h) * W3 h) and g = softmax(W_r h) restricted to the top-k experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hrm.cost import EXPERT_CHUNK_ROWS
from hrm.model import ModelSpec

#: expert index -> (w13 [2*h2, h1], w2 [h1, h2]) on the compute device, or None for an expert
#: another rank holds (expert parallelism, executor/distributed.py)
ExpertFn = Callable[[int], tuple[torch.Tensor, torch.Tensor] | None]
#: sum of the ranks' partial outputs (identity on one GPU)
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class DenseLayer:
    """The always-GPU-resident weights of one decoder layer (MoE-Lightning's dense part). The
    Q, K and V projections are one weight, W_qkv = [W_q; W_k; W_v] (and one bias where the
    architecture has them): one GEMM per micro-batch instead of three."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    wqkv: torch.Tensor                       # [(n_q + 2 n_kv) D, h1]
    wo: torch.Tensor
    router: torch.Tensor
    bqkv: torch.Tensor | None = None         # [(n_q + 2 n_kv) D]
    shared_w13: torch.Tensor | None = None   # [2 * shared_intermediate, h1]
    shared_w2: torch.Tensor | None = None    # [h1, shared_intermediate]
    shared_gate: torch.Tensor | None = None  # [1, h1]


def fused_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """W_qkv (or b_qkv) from the checkpoint's separate projections, in q, k, v order."""
    return torch.cat((wq, wk, wv))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back (as transformers' MixtralRMSNorm / Qwen2MoeRMSNorm)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(spec: ModelSpec, max_positions: int, device: torch.device | str,
                dtype: torch.dtype) -> torch.Tensor:
    """[max_positions, 2, 1, D] rotary tables with base rope_theta: cos and the signed sin
    s * sin, s = -1 on the first half of each head, +1 on the second (so that
    rotate_half(x) sin = roll(x, D/2) s sin: `apply_rope_`). Computed in fp32 and cast to the
    activations' dtype, as transformers' rotary embedding hands them to the attention."""
    dim = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    sign = torch.cat((-torch.ones(dim // 2), torch.ones(dim - dim // 2)))
    table = torch.stack((emb.cos(), sign * emb.sin()), dim=1)[:, :, None, :]
    return table.to(device=device, dtype=dtype)


def rope_at(table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin [T, 1, D] of the tokens at `positions` [T] (`rope_tables`)."""
    cos, sin = table[positions].unbind(1)
    return cos, sin


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place, x [T, H, D] (a view may be strided): x cos + rotate_half(x) sin, with
    rotate_half(x) = cat(-x2, x1) written as roll(x, D/2) times the sign folded into `sin`
    (`rope_tables`). The same bf16 products and sum as transformers' apply_rotary_pos_emb, in
    four operations instead of its twelve."""
    torch.add(x * cos, x.roll(x.shape[-1] // 2, dims=-1) * sin, out=x)


def attention_in(x: torch.Tensor, layer: DenseLayer, spec: ModelSpec,
                 rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, h1] tokens at the positions whose cos/sin rows `rope` holds (`rope_at`). Returns
    qkv [T, (n_q + 2 n_kv) D]: q, k, v side by side from one GEMM, RoPE applied to q and k in
    place (`split_qkv` gives the three views). The CPU attention worker gets this one tensor."""
    h = rms_norm(x, layer.input_norm, spec.rms_norm_eps)
    qkv = F.linear(h, layer.wqkv, layer.bqkv)
    heads = spec.num_heads + spec.num_kv_heads
    apply_rope_(qkv[:, :heads * spec.head_dim].view(x.shape[0], heads, spec.head_dim), *rope)
    return qkv


def split_qkv(qkv: torch.Tensor, spec: ModelSpec
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, n_q, D], k and v [T, n_kv, D]: views of `attention_in`'s output."""
    tokens, d = qkv.shape[0], spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    return (qkv[:, :q_out].view(tokens, spec.num_heads, d),
            qkv[:, q_out:q_out + kv_out].view(tokens, spec.num_kv_heads, d),
            qkv[:, q_out + kv_out:].view(tokens, spec.num_kv_heads, d))


#: SDPA backends for prefill, which is called once per distinct prompt length: cuDNN attention is
#: left out because it builds an execution plan per new shape (our reading of the GPU machine's
#: trace: the first prefill layer cost 0.6-1.6 s per micro-batch of new lengths, the second
#: 0.02-0.07 s; benchmarks/results/h200x2_2026-11-29_run2/README.md)
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                         SDPBackend.MATH]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA self-attention of n equal-length prompts: q [n, L, n_q, D], k/v [n, L, n_kv, D]
    -> [n, L, n_q * D]."""
    with sdpa_kernel(PREFILL_SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True, enable_gqa=True)
    n, _, length, _ = out.shape
    return out.transpose(1, 2).reshape(n, length, -1)


def gpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         context_lens: torch.Tensor) -> torch.Tensor:
    """Decode attention on the accelerator: q [B, n_q, D], k/v [B, n_kv, S, D] (S >= every
    length), positions >= context_lens[b] masked. Returns [B, n_q * D]."""
    positions = torch.arange(k.shape[2], device=k.device)
    mask = (positions[None, :] < context_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)
    return out.reshape(q.shape[0], -1)


def attend_with_new_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, at: torch.Tensor
                          ) -> torch.Tensor:
    """Decode attention over gathered K/V [B, n_kv, S, D] of the cached positions, this step's
    k/v [B, n_kv, D] written first at positions `at` [B] (each sequence's context before it).
    Returns [B, n_q * D]."""
    rows = torch.arange(q.shape[0], device=q.device)
    k_cache[rows, :, at] = k.to(k_cache.dtype)
    v_cache[rows, :, at] = v.to(v_cache.dtype)
    return gpu_decode_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), at + 1)


def attention_out(x: torch.Tensor, attn: torch.Tensor, layer: DenseLayer,
                  reduce: Reduce = _identity) -> torch.Tensor:
    """Residual + output projection: x + reduce(attn W_o^T). attn: [T, n_q * D] (a rank's heads
    give a partial sum, completed by `reduce`)."""
    return x + reduce(F.linear(attn.to(x.dtype), layer.wo))


def route(h: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: softmax over all experts in fp32, keep the k largest (indices [T, k] and
    weights [T, k] fp32), renormalized to sum 1 when the architecture does (Mixtral always,
    Qwen2-MoE when norm_topk_prob)."""
    probs = torch.softmax(F.linear(h, router).float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


def swiglu(h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """FFN(h) = W2 (silu(W1 h) * W3 h) with W1 and W3 stacked as w13 = [W1; W3]; written into
    `out` when given (its rows, contiguous), which saves a copy."""
    gate, up = F.linear(h, w13).chunk(2, dim=-1)
    act = F.silu(gate) * up
    return F.linear(act, w2) if out is None else torch.mm(act, w2.t(), out=out)


def host_list(t: torch.Tensor) -> list:
    """`t.tolist()` for a small device tensor, without holding the GIL while the device catches
    up. `tolist()` waits for the stream with the GIL held, which stops every other Python thread
    of the pipeline (the CPU attention worker, the weight link) until the GPU reaches this point,
    up to a whole layer's weight transfer when the stream waits for weights. Here the values go
    to pinned memory and the wait is an event's, with the GIL released."""
    if t.device.type != "cuda":
        return t.tolist()
    from executor.schedule import host_wait, record  # schedule imports this module

    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    host_wait(record(torch.cuda.current_stream(t.device)))
    return host.tolist()


def routed_experts(h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                   num_experts: int, expert: ExpertFn) -> torch.Tensor:
    """sum_k g_k FFN_{e_k}(h) for every token, as one GEMM pair per expert over the tokens routed
    to it (in chunks of at most EXPERT_CHUNK_ROWS, which bounds the intermediate activations):
    the (token, slot) pairs are sorted by expert, so each expert's rows are contiguous, and each
    GEMM pair writes its rows of the sorted output in place. The gates g_k multiply all rows at
    once afterwards, in the activations' dtype (as transformers' Mixtral and Qwen2-MoE blocks
    do): per expert the launching thread issues only its GEMM pair and what feeds it (the decode
    GPU stage is bound by that thread: hrm.roofline OPS_PER_EXPERT). Experts `expert` returns
    None for (held by another rank) contribute zero."""
    top_k = experts.shape[1]
    order = torch.argsort(experts.reshape(-1), stable=True)
    token_of = order // top_k
    rows_per_expert = host_list(torch.bincount(experts.reshape(-1), minlength=num_experts))
    h_sorted = h[token_of]
    out_sorted = torch.empty_like(h_sorted)
    start = 0
    for e, rows in enumerate(rows_per_expert):
        if not rows:
            continue
        weights_e = expert(e)
        for lo in range(start, start + rows, EXPERT_CHUNK_ROWS):  # bounded intermediates
            hi = min(lo + EXPERT_CHUNK_ROWS, start + rows)
            if weights_e is None:
                out_sorted[lo:hi] = 0
            else:
                swiglu(h_sorted[lo:hi], *weights_e, out=out_sorted[lo:hi])
        start += rows
    return _gate_and_scatter(h, out_sorted, weights, order, token_of)


def routed_experts_grouped(h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                           w13t: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    """`routed_experts` as one grouped GEMM pair over all E experts (torch._grouped_mm; w13t
    [E, h1, 2 h2] and w2t [E, h2, h1], the transposed weights of every expert in order): the
    (token, slot) pairs sorted by expert, group e the rows routed to expert e, its boundaries
    (cumulative row counts) computed on the device. No per-expert work and no host read of the
    counts: a fixed number of operations per micro-batch, and the launching thread does not wait
    for the routing (hrm.roofline OPS_MOE_GROUPED)."""
    top_k, flat = experts.shape[1], experts.reshape(-1)
    sorted_experts, order = torch.sort(flat, stable=True)
    token_of = order // top_k
    # offs[e] = rows routed to experts <= e. Not bincount: on CUDA it reads the largest index on
    # the host (a sync per micro-batch; on the H200 machine, 2026-12-02, the launching thread
    # took as long as the kernels at every micro-batch size)
    experts_in_order = torch.arange(w13t.shape[0], device=flat.device, dtype=flat.dtype)
    offs = torch.searchsorted(sorted_experts, experts_in_order, right=True, out_int32=True)
    gate, up = torch._grouped_mm(h[token_of], w13t, offs=offs).chunk(2, dim=-1)
    out_sorted = torch._grouped_mm(F.silu(gate) * up, w2t, offs=offs)
    return _gate_and_scatter(h, out_sorted, weights, order, token_of)


def _gate_and_scatter(h: torch.Tensor, out_sorted: torch.Tensor, weights: torch.Tensor,
                      order: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
    """The experts' outputs in expert order (`out_sorted`, one row per (token, slot) pair)
    times their gates, in the activations' dtype, summed back onto each token's row."""
    out_sorted.mul_(weights.reshape(-1)[order].to(h.dtype)[:, None])
    return torch.zeros_like(h).index_add_(0, token_of, out_sorted)


def moe_ffn(x: torch.Tensor, layer: DenseLayer, spec: ModelSpec, expert: ExpertFn,
            renormalize: bool, reduce: Reduce = _identity,
            stacked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x + reduce(MoE(n2(x))): routed experts plus the (gated) shared experts, if the model has
    them. The router has a row per expert of the whole model, whichever experts `expert` holds.
    With `stacked` (every expert's transposed weights: ExpertStore.stacked) the routed experts
    run as one grouped GEMM pair (`routed_experts_grouped`)."""
    h = rms_norm(x, layer.post_norm, spec.rms_norm_eps)
    experts, weights = route(h, layer.router, spec.top_k, renormalize)
    if stacked is not None:
        out = routed_experts_grouped(h, experts, weights, *stacked)
    else:
        out = routed_experts(h, experts, weights, layer.router.shape[0], expert)
    if layer.shared_w13 is not None:
        shared = swiglu(h, layer.shared_w13, layer.shared_w2)
        if layer.shared_gate is not None:
            shared = torch.sigmoid(F.linear(h, layer.shared_gate)) * shared
        out = out + shared
    return x + reduce(out)
