"""The HRM equations, the operators of a decoder layer and the turning batch sizes."""

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hrm.hardware import load_profile
from hrm.model import load_model_spec, shipped_models
from hrm.roofline import (
    attainable_flops,
    balance_point,
    experts_touched,
    layer_operators,
    ridge_point,
    summarize,
    turning_batch_size,
    turning_point_p1,
    turning_point_p2,
    whole_block_tokens,
)
from hrm.workload import Workload

MIXTRAL = load_model_spec("mixtral-8x7b")


def test_roofline_equations_by_hand():
    # GPU 100 FLOP/s, HBM 10 B/s, link 1 B/s
    assert attainable_flops(100, 10, 2) == 20                # Eq. 8, memory bound
    assert attainable_flops(100, 10, 50) == 100              # Eq. 8, compute bound
    assert attainable_flops(100, 10, 50, 1, 30) == 30        # Eq. 7, link bound
    assert ridge_point(100, 10) == 10
    # P1: CPU 5 FLOP/s, DRAM 2 B/s, I_cpu 1 -> min(5, 2) / link 1 = 2
    assert turning_point_p1(5, 2, 1, 1) == 2
    # P2: min(100, 10 * 4) / 1 = 40, the balance point of the same op too (memory bound GPU)
    assert turning_point_p2(100, 10, 4, 1) == 40 == balance_point(10, 4, 1)
    assert turning_point_p2(100, 10, 50, 1) == 100


@given(tokens=st.floats(1, 1e5), e=st.integers(2, 128), k=st.integers(1, 8))
def test_experts_touched_is_bounded_and_monotone(tokens, e, k):
    k = min(k, e)
    touched = experts_touched(e, k, tokens)
    assert k - 1e-9 <= touched <= e + 1e-9
    assert experts_touched(e, k, tokens + 1) >= touched - 1e-9


def test_decode_operator_flops_match_the_model():
    n_ub, mu, ctx = 4, 32, 300.0
    ops = {op.name: op for op in layer_operators(
        MIXTRAL, micro_batch_size=mu, num_micro_batches=n_ub, context_len=ctx, phase="decode")}
    tokens = mu * n_ub
    gemm = sum(ops[n].flops for n in ("qkv_proj", "o_proj", "router", "expert_ffn"))
    per_token = (MIXTRAL.attention_proj_flops_per_token() + MIXTRAL.router_flops_per_token()
                 + MIXTRAL.expert_flops_per_token())
    assert gemm == pytest.approx(tokens * per_token)
    kv_layer = MIXTRAL.kv_elements_per_token_per_layer() * 2
    assert ops["attention_decode"].cpu_bytes >= tokens * ctx * kv_layer
    assert ops["weight_h2d"].link_bytes == MIXTRAL.routed_expert_bytes_per_layer()
    # decode on the CPU moves q/k/v down and the attention output up, never the KV
    assert {"qkv_d2h", "attn_out_h2d"} <= set(ops) and "kv_h2d" not in ops
    # every touched expert's weights are read once per micro-batch
    assert ops["expert_ffn"].gpu_bytes > n_ub * experts_touched(8, 2, mu) * \
        MIXTRAL.expert_bytes()


def test_gpu_attention_streams_kv_and_prefill_offloads_it():
    decode = {op.name for op in layer_operators(
        MIXTRAL, micro_batch_size=8, num_micro_batches=2, context_len=100, phase="decode",
        attn_device="gpu")}
    assert {"kv_h2d", "kv_append_d2h"} <= decode
    prefill = {op.name: op for op in layer_operators(
        MIXTRAL, micro_batch_size=8, num_micro_batches=2, context_len=100, phase="prefill",
        attn_device="gpu", prompt_len=100)}
    assert prefill["kv_offload_d2h"].link_bytes == 16 * 100 * 8 * 128 * 2 * 2
    assert {"hidden_h2d", "hidden_d2h"} <= set(prefill)


@given(lens=st.lists(st.integers(1, 2000), min_size=1, max_size=64), mu=st.integers(1, 16),
       gen=st.integers(1, 256))
def test_gpu_attention_reads_each_micro_batch_padded_to_its_longest(lens, mu, gen):
    """A static batch runs prompts longest first, and GPU attention's dense KV copy pads a
    micro-batch to its first (longest) row: the padded context is every sequence's
    micro-batch's first prompt, longest first, averaged, + n/2, no shorter than the mean context
    and equal to it for uniform prompts. The gather and DMA move it; CPU attention reads the
    mean context in place."""
    w = Workload.from_lens(lens, gen)
    padded = w.padded_decode_context(mu)
    ordered = sorted(lens, reverse=True)
    firsts = [ordered[i] for i in range(0, len(lens), mu) for _ in ordered[i:i + mu]]
    assert padded == pytest.approx(sum(firsts) / len(lens) + gen / 2)
    assert padded >= sum(lens) / len(lens) + gen / 2 - 1e-9
    assert Workload.from_lens([lens[0]] * len(lens), gen).padded_decode_context(mu) == \
        pytest.approx(lens[0] + gen / 2)

    def ops(attn: str) -> dict:
        return {op.name: op for op in layer_operators(
            MIXTRAL, micro_batch_size=mu, num_micro_batches=2, context_len=w.mean_decode_context,
            phase="decode", attn_device=attn, padded_context_len=padded)}

    gpu, cpu = ops("gpu"), ops("cpu")
    kv_token = 2 * 8 * 128 * 2
    assert gpu["kv_h2d"].link_bytes == 2 * mu * whole_block_tokens(padded) * kv_token
    assert gpu["attention_decode"].link_bytes == pytest.approx(2 * mu * padded * kv_token)
    assert cpu["attention_decode"].link_bytes == pytest.approx(
        2 * mu * w.mean_decode_context * kv_token)


@pytest.mark.parametrize("name", shipped_models())
def test_every_model_has_operators(name):
    model = load_model_spec(name)
    for phase in ("prefill", "decode"):
        ops = layer_operators(model, micro_batch_size=4, num_micro_batches=2, context_len=64,
                              phase=phase, prompt_len=32)
        assert all(op.flops >= 0 and op.gpu_bytes >= 0 for op in ops)
        assert any(op.name == "expert_ffn" for op in ops)


def test_turning_batch_size_lands_on_the_roof():
    hw = load_profile("t4")
    n_compute = turning_batch_size(MIXTRAL, hw, roof="compute")
    ops = layer_operators(MIXTRAL, micro_batch_size=1, num_micro_batches=int(n_compute),
                          context_len=1, phase="decode")
    ffn = next(op for op in ops if op.name == "expert_ffn")
    # at the turning batch the link roof reaches the GPU peak (within the rounding of N)
    assert hw.link.h2d_pinned_bps * ffn.link_intensity == pytest.approx(hw.gpu.flops("bf16"),
                                                                        rel=1e-3)
    n_hbm = turning_batch_size(MIXTRAL, hw, roof="hbm", micro_batch_size=128)
    assert 0 < n_hbm < n_compute
    # twice the link bandwidth halves the batch needed
    fast = replace(hw, link=replace(hw.link, h2d_pinned_bps=2 * hw.link.h2d_pinned_bps))
    assert turning_batch_size(MIXTRAL, fast) == pytest.approx(n_compute / 2)


def test_turning_batch_size_is_moe_lens_eq2():
    """MoE-Lens Eq. 2: GEMMs saturate the GPU at n >= (C_GPU / B_IO) (N_e / N_k) tokens."""
    a40 = load_profile("a40")
    a40 = replace(a40, link=replace(a40.link, h2d_pinned_bps=32e9))
    expected = a40.gpu.flops("bf16") / 32e9 * 8 / 2
    assert turning_batch_size(MIXTRAL, a40) == pytest.approx(expected)
    assert 18_000 < expected < 20_000          # MoE-Lens Table 2 quotes 19.2k for the A40


def test_summary_places_expert_ffn_between_p1_and_p2():
    s = summarize(MIXTRAL, load_profile("t4"), batch_size=1024, micro_batch_size=128,
                  context_len=512)
    ffn = next(p for p in s.operators if p.name == "expert_ffn")
    assert ffn.p1_intensity < ffn.link_intensity < ffn.p2_intensity   # link bound, worth moving
    assert ffn.best_device == "gpu"
    attn = next(p for p in s.operators if p.name == "attention_decode")
    assert attn.best_device == "cpu"            # MoE-Lightning §3: attention left of P1
    assert s.to_dict()["operators"][0]["best_device"] in ("cpu", "gpu")


def test_op_counts_match_the_executor():
    """The host-issued operations the model charges per micro-batch (OPS_*) are the aten
    operations the executor's layer code dispatches (counted, not fitted) with bf16 weights and
    activations, as on the GPU: a decode micro-batch of tiny-mixtral touching 2 experts (one
    token, top-2) and all 8 (64 tokens), its experts in a loop and as grouped GEMMs."""
    torch = pytest.importorskip("torch")

    import executor.layers as L
    from executor.weights import random_weights, read_model
    from hrm.profile import dispatched_ops
    from hrm.roofline import (
        OPS_ATTENTION_IN,
        OPS_ATTENTION_OUT,
        OPS_GPU_DECODE_ATTENTION,
        OPS_MOE_GROUPED,
        OPS_MOE_ROUTING,
        OPS_PER_EXPERT,
    )

    spec, config = read_model("tiny-mixtral")
    bf16 = torch.bfloat16
    w = random_weights(spec, config, dtype=bf16, device=torch.device("cpu"),
                       resident=[spec.num_experts] * spec.num_layers, page_bytes=1 << 20,
                       pin_budget_bytes=0, seed=0)
    table = L.rope_tables(spec, 8, "cpu", bf16)

    def check(tokens: int) -> None:
        x = torch.randn(tokens, spec.hidden_size, dtype=bf16)
        pos = torch.zeros(tokens, dtype=torch.long)
        attn = torch.randn(tokens, spec.num_heads * spec.head_dim, dtype=bf16)
        rope = L.rope_at(table, pos)   # looked up once per step, for every layer
        stacked = w.experts.stacked(0, 0)
        # the engine asks for them per micro-batch: made once, not counted
        assert dispatched_ops(lambda: w.experts.stacked(0, 0)) == 0
        assert w.experts.stacked(0, 0) is stacked
        counts = [
            dispatched_ops(lambda: L.attention_in(x, w.layers[0], spec, rope)),
            dispatched_ops(lambda: L.attention_out(x, attn, w.layers[0])),
            dispatched_ops(lambda: L.moe_ffn(x, w.layers[0], spec, w.experts.expert_fn(0, 0),
                                             True)),
            dispatched_ops(lambda: L.moe_ffn(   # policy expert_kernel='grouped'
                x, w.layers[0], spec, w.experts.expert_fn(0, 0), True, stacked=stacked)),
        ]
        touched = min(spec.num_experts, tokens * spec.top_k)
        assert counts == [OPS_ATTENTION_IN, OPS_ATTENTION_OUT,
                          OPS_MOE_ROUTING + touched * OPS_PER_EXPERT, OPS_MOE_GROUPED]
        # decode attention on the GPU over K/V gathered from the CPU cache (engine order)
        qkv = L.attention_in(x, w.layers[0], spec, rope)
        kc, vc = (torch.zeros(tokens, spec.num_kv_heads, 128, spec.head_dim, dtype=bf16)
                  for _ in range(2))

        def gpu_attention() -> None:
            q, k, v = L.split_qkv(qkv, spec)
            L.attend_with_new_token(q, k, v, kc, vc, pos)

        if tokens > 1:   # a lone sequence's SDPA dispatches 2 more on the CPU
            assert dispatched_ops(gpu_attention) == OPS_GPU_DECODE_ATTENTION

    for tokens in (1, 64):
        check(tokens)
