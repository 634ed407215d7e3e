"""The cost model: stage equations, memory accounting by hand, monotonicity, the timeline."""

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hrm.cost import (
    COPY_BESIDE_ALL,
    CPU_USABLE_FRACTION,
    STAGING_RING_SLOTS,
    STAGING_SLOT_PAGES,
    STAGING_TERM,
    check_fits,
    cost_terms,
    interfered,
    memory_footprint,
    pinned_allocation_bytes,
    predict,
    timeline,
)
from hrm.errors import PolicyError
from hrm.hardware import Interference, SaturatingCurve, load_profile
from hrm.model import load_model_spec
from hrm.policy import Policy
from hrm.roofline import (
    OPS_ATTENTION_IN,
    OPS_ATTENTION_OUT,
    OPS_GPU_DECODE_ATTENTION,
    OPS_MOE_GROUPED,
    OPS_MOE_ROUTING,
    OPS_PER_EXPERT,
    experts_touched,
    kv_bytes_per_token_layer,
)
from hrm.units import GiB, KiB
from hrm.workload import Workload

MIXTRAL = load_model_spec("mixtral-8x7b")
T4, H100 = load_profile("t4"), load_profile("h100")
WORK = Workload(num_seqs=10000, prompt_len=100, gen_len=128)
#: T4 with launches at t_launch exactly (no interference; its shipped profile has no launch cost)
T4_LAUNCHES = replace(T4, interference=Interference(),
                      gpu=replace(T4.gpu, op_overhead_s=10e-6, attention_handoff_s=300e-6))
W_LAYER = 8 * 3 * 4096 * 14336 * 2          # routed experts of one Mixtral layer, bf16 bytes


def test_memory_accounting_by_hand():
    policy = Policy(batch_size=64, micro_batch_size=32, weights_gpu_fraction=0.25)
    mem = memory_footprint(MIXTRAL, T4, WORK, policy)
    gpu = {k.split(" (")[0]: v for k, v in mem.gpu_breakdown.items()}
    assert gpu["dense weights"] == pytest.approx(3.2113e9, rel=1e-4)
    assert gpu["resident experts"] == pytest.approx(0.25 * 32 * W_LAYER)
    # two buffers of the largest streamed layer: R = 0.25 * 32 * 8 = 64 resident experts, 2 per
    # layer, so 6 of 8 experts stream
    assert gpu["expert staging"] == pytest.approx(2 * 0.75 * W_LAYER)
    assert mem.cpu_breakdown["offloaded experts"] == pytest.approx(0.75 * 32 * W_LAYER)
    # 100 + 128 tokens per sequence, allocated in blocks of 64: 256
    assert mem.cpu_breakdown["KV cache"] == 64 * 256 * 128 * KiB
    assert mem.gpu_bytes == pytest.approx(sum(mem.gpu_breakdown.values()))
    assert mem.cpu_bytes == pytest.approx(sum(mem.cpu_breakdown.values()))
    assert mem.cpu_capacity_bytes == CPU_USABLE_FRACTION * T4.cpu.memory_bytes


@pytest.mark.parametrize(("r_w", "streamed_experts"), [(0.0, 8), (0.05, 8), (0.124, 7), (0.25, 6)])
def test_staging_buffers_hold_the_largest_streamed_layer(r_w, streamed_experts):
    """The footprint sizes the staging buffers as the executor does (R = round(r_w l n_e)
    resident experts, R // l in the layers that keep fewest); the MILP's affine term is an upper
    bound of it at every r_w."""
    policy = Policy(batch_size=64, micro_batch_size=32, weights_gpu_fraction=r_w)
    mem = memory_footprint(MIXTRAL, T4, WORK, policy)
    staging = next(v for k, v in mem.gpu_breakdown.items() if k.startswith("expert staging"))
    assert staging == pytest.approx(2 * streamed_experts * W_LAYER / 8)
    bound = cost_terms(MIXTRAL, T4, WORK, policy).gpu_memory["decode"][STAGING_TERM]
    assert bound(r_w, 0.0) >= staging


def test_gpu_kv_fraction_moves_kv_to_the_gpu():
    policy = Policy(batch_size=64, micro_batch_size=32, attn_decode_device="gpu",
                    kv_gpu_fraction=0.5)
    mem = memory_footprint(MIXTRAL, H100, WORK, policy)
    kv = 64 * 256 * 128 * KiB   # 228 tokens in blocks of 64
    assert mem.cpu_breakdown["KV cache"] == pytest.approx(0.5 * kv)
    assert any(k.startswith("KV cache") and v == pytest.approx(0.5 * kv)
               for k, v in mem.gpu_breakdown.items())


def test_decode_stage_equations_without_curves():
    n_ub, mu = 4, 64
    policy = Policy(batch_size=n_ub * mu, micro_batch_size=mu)
    layer = predict(MIXTRAL, T4, WORK, policy).decode_layer
    out_bytes = n_ub * mu * 4096 * 2                     # attention outputs, bf16
    assert layer.h2d_s == pytest.approx((W_LAYER + out_bytes) / T4.link.h2d_pinned_bps)
    qkv_bytes = n_ub * mu * (4096 + 2 * 1024) * 2
    assert layer.d2h_s == pytest.approx(qkv_bytes / T4.link.d2h_pinned_bps)
    kv_read = n_ub * mu * WORK.mean_decode_context * 8 * 128 * 2 * 2
    assert layer.cpu_attn_s >= kv_read / T4.cpu.dram_bandwidth_bps
    assert layer.layer_s == pytest.approx(max(layer.by_stage().values()))
    # all experts resident: nothing but activations crosses the link
    resident = predict(MIXTRAL, T4, WORK, replace(policy, weights_gpu_fraction=1.0))
    assert resident.decode_layer.h2d_s == pytest.approx(out_bytes / T4.link.h2d_pinned_bps)


def test_throughput_is_generated_tokens_over_prefill_plus_decode():
    pred = predict(MIXTRAL, T4, WORK, Policy(batch_size=512, micro_batch_size=128))
    assert pred.decode_s == pytest.approx((WORK.gen_len - 1) * pred.decode_step_s)
    assert pred.throughput_tok_s == pytest.approx(512 * 128 / (pred.prefill_s + pred.decode_s))
    assert pred.decode_step_s > MIXTRAL.num_layers * pred.decode_layer.layer_s   # + head, fill
    assert pred.bottleneck == "link" and pred.bottleneck_slack > 1
    doc = json.loads(json.dumps(pred.to_dict()))
    for key in ("policy", "throughput_tok_s", "prefill_s", "decode_s", "bottleneck",
                "gpu_mem_bytes", "cpu_mem_bytes", "stages"):
        assert key in doc


def test_serial_schedules_sum_the_stages():
    base = Policy(batch_size=512, micro_batch_size=128)
    piped = predict(MIXTRAL, T4, WORK, base)
    serial = predict(MIXTRAL, T4, WORK, replace(base, schedule="cgopipe-serial"))
    stages = serial.decode_layer.by_stage()
    assert serial.decode_layer.layer_s == pytest.approx(sum(stages.values()))
    assert piped.throughput_tok_s > serial.throughput_tok_s
    layerwise = predict(MIXTRAL, T4, WORK, replace(base, schedule="layerwise",
                                                   attn_decode_device="gpu"))
    # the KV now comes up from the CPU cache, host-staged, while the compute stream waits
    kv_s = (512 * WORK.mean_decode_context * kv_bytes_per_token_layer(MIXTRAL, "bf16")
            / T4.link.h2d_pageable_bps)
    assert layerwise.decode_layer.cpu_attn_s == 0
    assert layerwise.decode_layer.gpu_s > piped.decode_layer.gpu_s + 0.99 * kv_s


def test_interference_slows_overlapped_stages():
    """The link is slowed while CPU attention runs beside it: by (f - 1) t_cpu_attn."""
    policy = Policy(batch_size=512, micro_batch_size=128)
    slow = replace(T4, interference=Interference(link=1.2, gpu=1.0, cpu_attention=1.0))
    a, b = predict(MIXTRAL, T4, WORK, policy), predict(MIXTRAL, slow, WORK, policy)
    assert a.bottleneck == b.bottleneck == "link"
    assert 0 < a.decode_layer.cpu_attn_s < a.decode_layer.h2d_s
    assert b.decode_layer.layer_s == pytest.approx(a.decode_layer.layer_s
                                                   + 0.2 * a.decode_layer.cpu_attn_s)
    # the GPU stage: its kernels slowed by the GPU's factor, the launching thread's host work
    # (launches, hand-offs) by the launch factor, or by the GPU's where it was not measured
    on_gpu = replace(policy, weights_gpu_fraction=1.0)
    host = replace(T4, gpu=replace(T4.gpu, op_overhead_s=20e-6, attention_handoff_s=300e-6))
    no_host = replace(T4, gpu=replace(T4.gpu, op_overhead_s=0.0, attention_handoff_s=0.0))
    kernel_s = predict(MIXTRAL, no_host, WORK, on_gpu).decode_layer.gpu_s
    host_s = predict(MIXTRAL, host, WORK, on_gpu).decode_layer.gpu_s - kernel_s
    assert host_s > 0
    for launch, f_host in ((0.0, 1.3), (1.1, 1.1)):
        inter = Interference(link=1.0, gpu=1.3, cpu_attention=1.0, launch=launch)
        c = predict(MIXTRAL, replace(host, interference=inter), WORK, on_gpu)
        assert c.bottleneck == "gpu"
        assert c.decode_layer.gpu_s == pytest.approx(1.3 * kernel_s + f_host * host_s)
        assert c.decode_layer.layer_s == pytest.approx(c.decode_layer.gpu_s)


def test_one_micro_batch_runs_its_gpu_stage_and_cpu_attention_at_solo_speed():
    """cgopipe with one decode micro-batch: the GPU stage and CPU attention wait for each other,
    so the factors measured beside each other (GPU, launches, pipeline calibration, CPU
    attention) do not apply; with two micro-batches they do (every expert resident: no link to
    hide them behind)."""
    slow = Interference(gpu=1.5, cpu_attention=1.7, launch=1.6, pipeline=1.8)
    hw = replace(H100, gpu=replace(H100.gpu, op_overhead_s=10e-6, attention_handoff_s=300e-6))
    for n_ub in (1, 2):
        policy = Policy(batch_size=128 * n_ub, micro_batch_size=128, weights_gpu_fraction=1.0)
        plain = predict(MIXTRAL, replace(hw, interference=Interference()), WORK, policy)
        interfered_ = predict(MIXTRAL, replace(hw, interference=slow), WORK, policy)
        same = interfered_.decode_step_s == pytest.approx(plain.decode_step_s, rel=1e-12)
        assert same == (n_ub == 1)
        if n_ub == 2:
            assert interfered_.decode_layer.gpu_s == pytest.approx(1.8 * plain.decode_layer.gpu_s)


def test_grouped_experts_take_their_own_curve_where_the_profile_has_one():
    """The decode expert FFN of grouped layers is timed by curve 'gpu_grouped_experts' (the
    grouped kernel as the executor runs it), else by 'gpu_gemm'; the loop's by 'gpu_gemm'."""
    from hrm.hardware import SaturatingCurve
    from hrm.roofline import GROUPED_EXPERTS_CURVE, layer_operators

    slow = SaturatingCurve(peak=100e12, half=5000.0)
    hw = replace(H100, interference=Interference())
    with_curve = replace(hw, curves={**hw.curves, GROUPED_EXPERTS_CURVE: slow})
    loop = Policy(batch_size=512, micro_batch_size=64, weights_gpu_fraction=1.0)
    grouped = replace(loop, expert_kernel="grouped")
    ffn = {share: next(op for op in layer_operators(
        MIXTRAL, micro_batch_size=64, num_micro_batches=8, context_len=200, phase="decode",
        grouped_share=share) if op.name == "expert_ffn") for share in (0.0, 1.0)}
    assert (ffn[0.0].curve, ffn[1.0].curve) == ("gpu_gemm", GROUPED_EXPERTS_CURVE)
    for policy, moved in ((loop, False), (grouped, True)):
        a, b = (predict(MIXTRAL, h, WORK, policy).decode_layer.gpu_s for h in (hw, with_curve))
        assert (b > a * (1 + 1e-9)) == moved
        if not moved:
            assert b == pytest.approx(a, rel=1e-12)


def test_a_step_of_one_micro_batch_is_one_chain_per_layer():
    """cgopipe, one decode micro-batch, nothing streamed: each layer is that micro-batch's chain
    (pre-attention, q/k/v down, CPU attention, output up, post-attention), so a step is the LM
    head plus l chains; the fill adds none (CostTerms.filled_layer_counts). With n_ub
    micro-batches the filled sum counts l - 1/n_ub layer maxima."""
    from hrm.cost import cost_terms

    hw = replace(H100, interference=Interference())
    for n_ub in (1, 4):
        policy = Policy(batch_size=64 * n_ub, micro_batch_size=64, weights_gpu_fraction=1.0)
        terms = cost_terms(MIXTRAL, hw, WORK, policy)
        assert terms.filled_layer_counts() == {"moe": MIXTRAL.num_layers - 1 / n_ub}
        if n_ub == 1:
            chain_s = terms.decode_stages["moe"]["chain"](1.0, 0.0, 0.0)
            head_s = terms.decode_extra_s(1.0, 0.0, 0.0)
            assert terms.decode_step_s(1.0, 0.0) == pytest.approx(
                head_s + MIXTRAL.num_layers * chain_s, rel=1e-12)


@given(link=st.floats(0.0, 10.0), cpu=st.floats(0.0, 10.0), gpu=st.floats(0.0, 10.0),
       f_link=st.floats(1.0, 2.0), f_gpu=st.floats(1.0, 2.0), f_cpu=st.floats(1.0, 2.0))
def test_interfered_stages_are_bounded(link, cpu, gpu, f_link, f_cpu, f_gpu):
    """Each stage is no faster than alone; the link no slower than f_link t_link while CPU
    attention is the shorter stage; GPU and CPU attention exactly f t."""
    factors = {"h2d": f_link, "d2h": f_link, "cpu_attn": f_cpu, "gpu": f_gpu}
    t = interfered({"h2d": link, "cpu_attn": cpu, "gpu": gpu}, factors)
    assert t["h2d"] >= link and t["gpu"] == pytest.approx(f_gpu * gpu)
    assert t["cpu_attn"] == pytest.approx(f_cpu * cpu)
    if cpu <= link:
        assert t["h2d"] <= f_link * link + 1e-12


@given(copy=st.floats(0.0, 10.0), cpu=st.floats(0.0, 10.0), f_cl=st.floats(1.0, 2.0),
       f_c=st.floats(1.0, 3.0), f_cpu=st.floats(1.0, 2.0))
def test_the_copy_thread_runs_between_its_two_measured_paces(copy, cpu, f_cl, f_c, f_cpu):
    """The copy thread beside the link throughout and beside all three stages while CPU
    attention runs: no faster than beside the link alone (f_cl t), and, where it outlasts
    attention, no slower than beside all three throughout (f_c t); an idle copy stays idle."""
    f_c = max(f_c, f_cl)
    factors = {"cpu_attn": f_cpu, "copy_thread": f_cl, COPY_BESIDE_ALL: f_c}
    t = interfered({"copy_thread": copy, "cpu_attn": cpu}, factors)
    if copy == 0:
        assert t["copy_thread"] == 0
        return
    assert t["copy_thread"] >= f_cl * copy * (1 - 1e-12)
    if t["copy_thread"] >= t["cpu_attn"]:
        assert t["copy_thread"] <= f_c * copy * (1 + 1e-9)


def test_policies_that_stage_weights_take_the_staged_pipeline_factor():
    """interference.pipeline_staged slows the GPU stage of a policy whose weights cannot all be
    pinned; a policy that pins them all keeps interference.pipeline."""
    policy = Policy(batch_size=256, micro_batch_size=128)
    base = H100.with_memory(pinned_max_bytes=8 * GiB)
    calibrated = replace(base, interference=replace(base.interference, pipeline=1.2))
    staged = replace(calibrated, interference=replace(calibrated.interference,
                                                      pipeline_staged=1.8))
    gpu_s = {name: predict(MIXTRAL, hw, WORK, policy).decode_layer.gpu_s
             for name, hw in (("pipeline", calibrated), ("staged", staged))}
    assert gpu_s["staged"] == pytest.approx(1.8 / 1.2 * gpu_s["pipeline"])
    unlimited = [predict(MIXTRAL, hw.with_memory(pinned_max_bytes=float("inf")), WORK,
                         policy).decode_layer.gpu_s for hw in (calibrated, staged)]
    assert unlimited[0] == pytest.approx(unlimited[1])


def test_pinned_overflow_goes_through_the_copy_thread():
    policy = Policy(batch_size=256, micro_batch_size=128)
    pred = predict(MIXTRAL, H100, WORK, policy)
    buffers = pred.memory.cpu_breakdown["activation buffers"]
    ring = STAGING_RING_SLOTS * STAGING_SLOT_PAGES * policy.weight_page_bytes
    # the budget is the weights' (executor.weights.pin_plan); buffers and ring are pinned beside
    overflow = 32 * W_LAYER - 60e9
    assert pred.pinned_overflow_bytes == pytest.approx(overflow)
    per_layer = overflow / 32
    assert pred.decode_layer.copy_thread_s == pytest.approx(per_layer / 42e9)
    no_pin_limit = H100.with_memory(pinned_max_bytes=float("inf"))
    free = predict(MIXTRAL, no_pin_limit, WORK, policy).decode_layer
    # the staged bytes cross the link as the pinned ones do, while the copy thread memcpys the
    # next chunks: the two legs are stages of their own, max((p + o) / B_pinned, o / B_copy)
    assert pred.decode_layer.h2d_s == pytest.approx(free.h2d_s)
    assert pred.decode_layer.layer_s >= pred.decode_layer.copy_thread_s
    # the copy's DRAM read + write slows CPU attention (MoE-Lens Eq. 5)
    assert pred.decode_layer.cpu_attn_s - free.cpu_attn_s == pytest.approx(
        2 * per_layer / H100.cpu.dram_bandwidth_bps)
    assert pred.memory.pinned_bytes == pytest.approx(60e9 + buffers + ring)
    # keep half the experts on the GPU: the rest fits in pinned memory
    half = predict(MIXTRAL, H100, WORK, replace(policy, weights_gpu_fraction=0.5))
    assert half.pinned_overflow_bytes == 0 and half.decode_layer.copy_thread_s == 0


def test_fitted_curves_replace_the_peaks():
    policy = Policy(batch_size=512, micro_batch_size=128)
    slow_gemm = replace(T4, curves={"gpu_gemm": SaturatingCurve(peak=20e12, half=64.0)})
    assert predict(MIXTRAL, slow_gemm, WORK, policy).decode_layer.gpu_s > \
        predict(MIXTRAL, T4, WORK, policy).decode_layer.gpu_s
    attn_curve = SaturatingCurve(peak=40e9, half=1e6)
    cpu = replace(T4, curves={"cpu_attention": attn_curve})
    kv_per_ub = 128 * WORK.mean_decode_context * 8 * 128 * 2 * 2
    layer = predict(MIXTRAL, cpu, WORK, policy).decode_layer
    assert layer.cpu_attn_s == pytest.approx(4 * attn_curve.time_s(kv_per_ub))
    fp32_curve = SaturatingCurve(peak=60e9, half=1e6)
    both = replace(T4, curves={"cpu_attention": attn_curve, "cpu_attention_fp32": fp32_curve})
    fp32_layer = predict(MIXTRAL, both, WORK, replace(policy, kv_dtype="fp32")).decode_layer
    assert fp32_layer.cpu_attn_s == pytest.approx(4 * fp32_curve.time_s(2 * kv_per_ub))
    page_curve = replace(T4, curves={"h2d": SaturatingCurve(peak=12.89e9, half=4 * 2**20)})
    small_pages = replace(policy, weight_page_bytes=2**20)
    # pages are queued back to back: the weight stream moves at the bulk pinned rate whatever
    # the page size (the curve prices copies by their size)
    assert predict(MIXTRAL, page_curve, WORK, small_pages).decode_layer.h2d_s == \
        pytest.approx(predict(MIXTRAL, page_curve, WORK, policy).decode_layer.h2d_s, rel=1e-3)


policies = st.builds(
    lambda mu, n_ub, r_w, gpu_attn, r_c, sched: Policy(
        batch_size=mu * n_ub, micro_batch_size=mu, weights_gpu_fraction=r_w,
        attn_decode_device="gpu" if gpu_attn or sched == "layerwise" else "cpu",
        kv_gpu_fraction=r_c if gpu_attn or sched == "layerwise" else 0.0, schedule=sched),
    st.sampled_from([1, 8, 64, 256]), st.sampled_from([1, 2, 5, 16]), st.floats(0, 1),
    st.booleans(), st.floats(0, 1), st.sampled_from(["cgopipe", "cgopipe-serial", "layerwise"]))


@settings(max_examples=60, deadline=None)
@given(policy=policies, profile=st.sampled_from(["t4", "h100"]), scale=st.floats(1.0, 8.0),
       part=st.sampled_from(["h2d", "dram", "gpu"]))
def test_more_bandwidth_or_flops_never_lowers_throughput(policy, profile, scale, part):
    hw = load_profile(profile)
    if part == "h2d":
        faster = replace(hw, link=replace(hw.link, h2d_pinned_bps=hw.link.h2d_pinned_bps * scale,
                                          d2h_pinned_bps=hw.link.d2h_pinned_bps * scale))
    elif part == "dram":
        faster = replace(hw, cpu=replace(hw.cpu, dram_bandwidth_bps=hw.cpu.dram_bandwidth_bps
                                         * scale))
    else:
        faster = replace(hw, gpu=replace(hw.gpu, peak_flops={
            k: v * scale for k, v in hw.gpu.peak_flops.items()}))
    before = predict(MIXTRAL, hw, WORK, policy).throughput_tok_s
    assert predict(MIXTRAL, faster, WORK, policy).throughput_tok_s >= before * (1 - 1e-12)


@settings(max_examples=30, deadline=None)
@given(policy=policies)
def test_terms_are_affine_and_predict_evaluates_them(policy):
    terms = cost_terms(MIXTRAL, T4, WORK, policy)
    r_w, r_c = policy.weights_gpu_fraction, policy.kv_gpu_fraction
    pred = predict(MIXTRAL, T4, WORK, policy)
    assert 1.0 / terms.time_per_token_s(r_w, r_c) == pytest.approx(pred.throughput_tok_s)
    for stages in terms.decode_stages.values():
        for term in stages.values():   # affine: the midpoint is the mean of the ends
            ends = (term(0.0, 0.0), term(1.0, 1.0))
            assert term(0.5, 0.5) == pytest.approx(sum(ends) / 2, abs=1e-12)


def test_check_fits_names_what_does_not_fit():
    too_big = Policy(batch_size=65536, micro_batch_size=64)
    with pytest.raises(PolicyError, match=r"GiB CPU memory \(KV cache .*GiB given"):
        check_fits(MIXTRAL, T4, WORK, too_big)
    all_on_gpu = Policy(batch_size=8, micro_batch_size=8, weights_gpu_fraction=1.0)
    with pytest.raises(PolicyError, match=r"GiB GPU memory \(resident experts"):
        check_fits(MIXTRAL, T4, WORK, all_on_gpu)
    check_fits(MIXTRAL, T4, WORK, Policy(batch_size=64, micro_batch_size=32))
    small = T4.with_memory(cpu_memory_bytes=24 * GiB)
    with pytest.raises(PolicyError, match="21.6 GiB usable of 24.0 GiB given"):
        check_fits(MIXTRAL, small, WORK, Policy(batch_size=1, micro_batch_size=1))


@pytest.mark.parametrize("policy", [
    Policy(batch_size=1024, micro_batch_size=256, weights_gpu_fraction=0.1),
    Policy(batch_size=256, micro_batch_size=256),
    Policy(batch_size=512, micro_batch_size=128, attn_decode_device="gpu", kv_gpu_fraction=0.3),
    Policy(batch_size=512, micro_batch_size=128, schedule="cgopipe-serial"),
    Policy(batch_size=512, micro_batch_size=128, attn_decode_device="gpu", schedule="layerwise"),
])
def test_timeline_events(policy):
    events = timeline(MIXTRAL, H100, WORK, policy, n_layers=2)
    assert events and {e["tid"] for e in events} <= {"gpu", "cpu_attention", "h2d", "d2h",
                                                      "copy_thread"}
    assert all(e["ph"] == "X" and e["dur"] > 0 and e["ts"] >= 0 for e in events)
    by_tid: dict[str, list] = {}
    for e in events:
        by_tid.setdefault(e["tid"], []).append(e)
    for track in by_tid.values():     # one resource runs one task at a time
        track.sort(key=lambda e: e["ts"])
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-6
                   for a, b in zip(track, track[1:], strict=False))
    pred = predict(MIXTRAL, H100, WORK, policy)
    end_us = max(e["ts"] + e["dur"] for e in events)
    if policy.schedule == "cgopipe":
        # overlapped: at least the binding stage of two layers, less than running them serially
        assert end_us >= 2 * pred.decode_layer.layer_s * 1e6 * 0.999 - 1
        assert end_us <= 2e6 * sum(v for k, v in pred.decode_layer.by_stage().items()
                                   if k != "chain") * 1.001
    else:
        assert end_us == pytest.approx(2 * pred.decode_layer.layer_s * 1e6)


@pytest.mark.parametrize("schedule", ["layerwise", "cgopipe-serial"])
def test_serial_schedules_overlap_the_weight_streams_two_legs(schedule):
    """Serial schedules run one stage at a time, except the copy thread's staging and the H2D
    of the weights, which the staging ring overlaps chunk by chunk: layer_s = the other stages +
    max(t_h2d, t_copy). With little pinnable memory both legs are busy."""
    hw = H100.with_memory(pinned_max_bytes=8 * GiB)
    attn = "gpu" if schedule == "layerwise" else "cpu"
    policy = Policy(batch_size=512, micro_batch_size=128, schedule=schedule,
                    attn_decode_device=attn)
    layer = predict(MIXTRAL, hw, WORK, policy).decode_layer
    assert layer.copy_thread_s > 0 and layer.h2d_s > 0
    others = layer.gpu_s + layer.cpu_attn_s + layer.d2h_s
    assert layer.layer_s == pytest.approx(others + max(layer.h2d_s, layer.copy_thread_s))


@pytest.mark.parametrize("schedule", ["layerwise", "cgopipe-serial"])
def test_serial_timeline_runs_the_weight_legs_side_by_side(schedule):
    """The predicted timeline of a serial schedule with both weight legs busy lasts the model's
    2 layer_s, up to the activation copies (a few us), which the timeline places after the
    weights while the model counts them in the H2D leg."""
    hw = H100.with_memory(pinned_max_bytes=8 * GiB)
    policy = Policy(batch_size=512, micro_batch_size=128, schedule=schedule,
                    attn_decode_device="gpu" if schedule == "layerwise" else "cpu")
    events = timeline(MIXTRAL, hw, WORK, policy, n_layers=2)
    end_s = max(e["ts"] + e["dur"] for e in events) / 1e6
    assert end_s == pytest.approx(2 * predict(MIXTRAL, hw, WORK, policy).decode_layer.layer_s,
                                  rel=1e-3)
    starts = {name: min(e["ts"] for e in events if e["name"] == name and e["args"]["layer"] == 1)
              for name in ("stage_weights", "weights_h2d")}
    assert starts["stage_weights"] == pytest.approx(starts["weights_h2d"])   # side by side


@pytest.mark.parametrize("schedule", ["cgopipe", "layerwise"])
def test_gpu_attention_over_the_cpu_cache_gathers_on_the_host_then_shares_the_link(schedule):
    """The launching thread gathers whole KV blocks into pinned memory (at the profile's
    kv_gather rate, not slowed by interference: GPU stage); one DMA then crosses at the pinned
    rate: on the link in cgopipe, where the compute stream also waits for it at the half of the
    link the weight pages leave it, and waited for by the compute in the serial schedules."""
    from hrm.cost import STREAMS_SHARING_THE_LINK
    from hrm.roofline import whole_block_tokens

    hw = load_profile("h200-machine")
    cpu_kv = Policy(batch_size=512, micro_batch_size=128, attn_decode_device="gpu",
                    schedule=schedule)
    gpu_kv = replace(cpu_kv, kv_gpu_fraction=1.0)
    a, b = predict(MIXTRAL, hw, WORK, cpu_kv), predict(MIXTRAL, hw, WORK, gpu_kv)
    blocks = whole_block_tokens(WORK.mean_decode_context)
    assert blocks % 64 == 0 and WORK.mean_decode_context <= blocks < WORK.mean_decode_context + 64
    kv = 512 * blocks * kv_bytes_per_token_layer(MIXTRAL, "bf16")
    assert hw.link.kv_gather_bps > 0   # measured (KVCache.gather_host), else the memcpy rate
    gather_s, dma_s = kv / hw.link.kv_gather_bps, kv / hw.link.h2d_pinned_bps
    # a gather at half the rate takes twice as long
    measured = replace(hw, link=replace(hw.link, kv_gather_bps=hw.link.kv_gather_bps / 2))
    slow_gather = predict(MIXTRAL, measured, WORK, cpu_kv).decode_layer.gpu_s
    assert slow_gather - a.decode_layer.gpu_s == pytest.approx(gather_s, rel=1e-6)
    memcpy = replace(hw, link=replace(hw.link, kv_gather_bps=0.0))   # not measured
    memcpy_gather = predict(MIXTRAL, memcpy, WORK, cpu_kv).decode_layer.gpu_s
    assert memcpy_gather - a.decode_layer.gpu_s == pytest.approx(
        kv / hw.link.pageable_to_pinned_bps - gather_s, rel=1e-6)
    gpu_extra = a.decode_layer.gpu_s - b.decode_layer.gpu_s
    link_extra = a.decode_layer.h2d_s - b.decode_layer.h2d_s
    if schedule == "cgopipe":
        assert gpu_extra == pytest.approx(gather_s + STREAMS_SHARING_THE_LINK * dma_s,
                                          rel=1e-6)
        assert link_extra == pytest.approx(dma_s, rel=1e-6)
    else:
        assert gpu_extra == pytest.approx(gather_s + dma_s, rel=1e-6)
        assert link_extra == pytest.approx(0.0, abs=1e-12)


def test_grouped_experts_save_the_per_expert_launches_in_decode_only():
    """expert_kernel='grouped': a decode micro-batch issues OPS_MOE_GROUPED operations for its
    routing and experts instead of OPS_MOE_ROUTING + OPS_PER_EXPERT per touched expert, in the
    layers whose experts are all streamed or all resident; prefill always loops. Those layers
    read nothing back, so in cgopipe the launching thread's host work is a stage of its own
    (launcher_s) instead of adding to the kernels (gpu_s)."""
    from hrm.cost import grouped_layer_share

    hw = T4_LAUNCHES
    loop = Policy(batch_size=512, micro_batch_size=128, weights_gpu_fraction=0.0)
    grouped = replace(loop, expert_kernel="grouped")
    assert grouped_layer_share(MIXTRAL, grouped, "decode") == 1.0
    assert grouped_layer_share(MIXTRAL, grouped, "prefill") == 0.0
    assert grouped_layer_share(MIXTRAL, loop, "decode") == 0.0
    # 10 of 256 experts resident: 10 of the 32 layers hold one, staged whole, grouped too
    split = replace(grouped, weights_gpu_fraction=10 / 256)
    assert grouped_layer_share(MIXTRAL, split, "decode") == 1.0
    a, b = predict(MIXTRAL, hw, WORK, loop), predict(MIXTRAL, hw, WORK, grouped)
    touched = experts_touched(MIXTRAL.num_experts, MIXTRAL.top_k, 128)
    n_ub = loop.num_micro_batches
    saved = n_ub * (OPS_MOE_ROUTING + touched * OPS_PER_EXPERT
                    - OPS_MOE_GROUPED) * hw.gpu.op_overhead_s
    assert saved > 0
    grouped_host_s = (n_ub * (OPS_ATTENTION_IN + OPS_ATTENTION_OUT + OPS_MOE_GROUPED)
                      * hw.gpu.op_overhead_s + n_ub * hw.gpu.attention_handoff_s)
    assert b.decode_layer.launcher_s == pytest.approx(grouped_host_s, rel=1e-9)
    assert a.decode_layer.launcher_s == 0.0
    kernels_s = b.decode_layer.gpu_s
    assert a.decode_layer.gpu_s == pytest.approx(kernels_s + grouped_host_s + saved, rel=1e-9)
    assert b.decode_layer.layer_s >= max(kernels_s, grouped_host_s)
    assert a.prefill_s == pytest.approx(b.prefill_s, rel=1e-12)
    assert predict(MIXTRAL, hw, WORK, split).decode_layer.launcher_s == \
        pytest.approx(grouped_host_s, rel=1e-9)
    # every layer of a serial schedule waits for the last one: sum rule
    serial = replace(grouped, schedule="cgopipe-serial")
    assert predict(MIXTRAL, hw, WORK, serial).decode_layer.launcher_s == 0.0
    with pytest.raises(PolicyError, match="expert_kernel"):
        Policy(batch_size=8, micro_batch_size=8, expert_kernel="fused")
    with pytest.raises(PolicyError, match="one GPU"):
        Policy(batch_size=8, micro_batch_size=8, expert_kernel="grouped", num_gpus=2)


def test_measured_launch_blocks_time_the_decode_launches():
    """Where the profile measured the executor's decode blocks (gpu.attention_in_op_s,
    post_grouped_op_s, gpu_attention_op_s), their launches take those seconds per operation
    instead of op_overhead_s: the pre-attention block's in every decode layer, the
    post-attention block's only where the experts run grouped, GPU attention's where decode
    attends there. Prefill and the per-expert loop keep op_overhead_s."""
    base = T4_LAUNCHES
    hw = replace(base, gpu=replace(base.gpu, attention_in_op_s=25e-6, post_grouped_op_s=50e-6))
    grouped = Policy(batch_size=512, micro_batch_size=128, weights_gpu_fraction=0.0,
                     expert_kernel="grouped")
    n_ub = grouped.num_micro_batches
    a, b = predict(MIXTRAL, base, WORK, grouped), predict(MIXTRAL, hw, WORK, grouped)
    extra_s = n_ub * (OPS_ATTENTION_IN * 15e-6 + (OPS_ATTENTION_OUT + OPS_MOE_GROUPED) * 40e-6)
    assert b.decode_layer.launcher_s - a.decode_layer.launcher_s == pytest.approx(extra_s)
    assert b.decode_layer.gpu_s == pytest.approx(a.decode_layer.gpu_s)
    loop = replace(grouped, expert_kernel="loop")
    a, b = predict(MIXTRAL, base, WORK, loop), predict(MIXTRAL, hw, WORK, loop)
    assert b.decode_layer.gpu_s - a.decode_layer.gpu_s == pytest.approx(
        n_ub * OPS_ATTENTION_IN * 15e-6)
    assert b.prefill_s == pytest.approx(a.prefill_s)
    # decode attention on the GPU: its operations at the measured gpu_attention_op_s
    gpu_attn = replace(loop, attn_decode_device="gpu", kv_gpu_fraction=1.0)
    hw_attn = replace(hw, gpu=replace(hw.gpu, gpu_attention_op_s=30e-6))
    a, b = predict(MIXTRAL, hw, WORK, gpu_attn), predict(MIXTRAL, hw_attn, WORK, gpu_attn)
    assert b.decode_layer.gpu_s - a.decode_layer.gpu_s == pytest.approx(
        n_ub * OPS_GPU_DECODE_ATTENTION * 20e-6)


def test_the_grouped_kernel_stages_split_layers_whole():
    """expert_kernel='grouped' with some experts of a layer resident: both staging buffers hold
    all n_e experts (not n_e - R_i), and the weights stream also copies the resident experts
    into them on the GPU: r_w B_layer bytes read and written at the HBM rate per layer, in
    decode and prefill. The loop's staging and link are unchanged."""
    from hrm.cost import expert_staging_bytes, memory_footprint

    hw = replace(T4, interference=Interference())
    r_w = 40 / 256                      # every layer holds 1 or 2 of its 8 experts
    loop = Policy(batch_size=512, micro_batch_size=128, weights_gpu_fraction=r_w)
    grouped = replace(loop, expert_kernel="grouped")
    expert = MIXTRAL.expert_bytes("bf16")
    assert expert_staging_bytes(MIXTRAL, loop, r_w) == 2 * 7 * expert
    assert expert_staging_bytes(MIXTRAL, grouped, r_w) == 2 * 8 * expert
    for policy in (loop, grouped):
        assert expert_staging_bytes(MIXTRAL, policy, 1.0) == 0.0
        assert expert_staging_bytes(MIXTRAL, policy, 0.0) == 2 * 8 * expert
    footprint = memory_footprint(MIXTRAL, hw, WORK, grouped)
    assert [v for k, v in footprint.gpu_breakdown.items() if k.startswith(STAGING_TERM)] == \
        [2 * 8 * expert]
    a, b = predict(MIXTRAL, hw, WORK, loop), predict(MIXTRAL, hw, WORK, grouped)
    copy_s = 2 * r_w * MIXTRAL.routed_expert_bytes_per_layer("bf16") / hw.gpu.hbm_bandwidth_bps
    assert copy_s > 0
    assert b.decode_layer.h2d_s - a.decode_layer.h2d_s == pytest.approx(copy_s, rel=1e-9)
    assert b.prefill_layer.h2d_s - a.prefill_layer.h2d_s == pytest.approx(copy_s, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(request=st.floats(2.0, 2.0**40))
def test_a_pinned_allocation_is_the_next_power_of_two(request: float) -> None:
    taken = pinned_allocation_bytes(request)
    assert request <= taken < 2 * request
    assert taken == 2 ** round(math.log2(taken))
