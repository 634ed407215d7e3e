"""The continuous-scheduling model (hrm/continuous.py) and its optimizer."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.scheduler import simulate
from hrm.continuous import (
    STEADY_FRACTION,
    LengthStats,
    PassShape,
    block_passes,
    ceil_sum,
    gpu_need_bytes,
    max_weights_gpu_fraction,
    optimize_continuous,
    pass_model,
    predict_continuous,
    predict_passes,
    steady_window,
)
from hrm.cost import GPU_USABLE_FRACTION, cost_terms
from hrm.errors import InfeasibleError, PolicyError
from hrm.hardware import load_profile
from hrm.model import load_model_spec
from hrm.policy import Policy
from hrm.units import GiB
from hrm.workload import Workload, synthetic_workload

MIXTRAL = load_model_spec("mixtral-8x7b")
H100 = load_profile("h100-machine")
#: the issue's setting: Mixtral-8x7B, GPU capped at 16 GiB
H100_16G = H100.with_memory(gpu_memory_bytes=16 * GiB)
POLICY = Policy(batch_size=4096, micro_batch_size=256, weights_gpu_fraction=0.05)


@given(n=st.integers(0, 5000), b=st.integers(1, 128))
def test_ceil_sum_closed_form(n, b):
    assert ceil_sum(n, b) == sum(-(-x // b) for x in range(1, n + 1))


@given(p=st.integers(1, 300), g=st.integers(1, 300), b=st.integers(1, 64))
def test_block_passes_is_blocks_held_over_life(p, g, b):
    assert block_passes(p, g, b) == sum(-(-(p + t) // b) for t in range(g))


def test_length_stats_by_hand():
    """p = 100, g = 3, b = 64: passes hold ceil(100/64), ceil(101/64), ceil(102/64) = 2 blocks;
    decode tokens attend over 101 and 102 tokens."""
    stats = LengthStats.of(Workload(num_seqs=4, prompt_len=100, gen_len=3), 64)
    assert stats.blocks_per_running_seq == 2.0
    assert stats.mean_decode_context == 101.5
    mixed = LengthStats.of(Workload.from_lens([10, 30], [1, 5]), 8)
    # held: ceil(10/8) + [ceil(30/8) .. ceil(34/8)] = 2 + (4+4+4+5+5); generated 6
    assert mixed.blocks_per_running_seq == pytest.approx(24 / 6)
    assert mixed.mean_decode_context == pytest.approx((31 + 32 + 33 + 34) / 4)


def test_decode_only_pass_is_the_static_decode_step():
    """A pass of N decode tokens at context s + n/2 costs what hrm.cost says one static decode
    step of batch N costs (same stage equations, same chain and LM head)."""
    work = Workload(num_seqs=512, prompt_len=100, gen_len=64)
    policy = Policy(batch_size=512, micro_batch_size=128, weights_gpu_fraction=0.3)
    static = cost_terms(MIXTRAL, H100, work, policy)
    shape = PassShape(512, 512 * work.mean_decode_context, 0, 0)
    assert pass_model(MIXTRAL, H100, work, policy).time(shape).pass_s == \
        pytest.approx(static.decode_step_s(0.3, 0.0), rel=1e-9)


def test_a_pass_of_one_micro_batch_runs_at_solo_speed():
    """A pass whose decode fits one micro-batch has its GPU stage and CPU attention wait for
    each other: the interference factors measured beside each other do not slow it (hrm.cost
    one_micro_batch); a pass of two micro-batches is slowed."""
    from hrm.hardware import Interference

    work = Workload(num_seqs=512, prompt_len=100, gen_len=64)
    slow = Interference(gpu=1.5, cpu_attention=1.7, launch=1.6, pipeline=1.8)
    resident = replace(POLICY, weights_gpu_fraction=1.0)   # no link to hide the stages behind
    for seqs, solo in ((128, True), (512, False)):
        shape = PassShape(seqs, seqs * work.mean_decode_context, 0, 0)
        times = [pass_model(MIXTRAL, replace(H100, interference=inter), work, resident
                            ).time(shape).pass_s for inter in (Interference(), slow)]
        assert (times[1] == pytest.approx(times[0], rel=1e-12)) == solo
        assert times[1] >= times[0] * (1 - 1e-12)


def test_prefill_rides_the_weight_pass():
    """Adding prefill tokens to a decode pass never streams the weights twice: the link time of
    the mixed pass is less than the decode pass's plus a prefill-only pass's."""
    work = synthetic_workload("mtbench", 2000)
    pm = pass_model(MIXTRAL, H100_16G, work, POLICY)
    decode = PassShape(1000, 1000 * 160.0, 0, 0)
    prefill = PassShape(0, 0, 20, 2000)
    mixed = PassShape(1000, 1000 * 160.0, 20, 2000)
    t = {name: pm.time(s) for name, s in (("d", decode), ("p", prefill), ("m", mixed))}
    assert t["m"].stage_s["h2d"] < t["d"].stage_s["h2d"] + 0.5 * t["p"].stage_s["h2d"]
    assert t["d"].pass_s <= t["m"].pass_s < t["d"].pass_s + t["p"].pass_s
    assert t["m"].stage_s["gpu"] > t["d"].stage_s["gpu"]


def test_kv_capacity_binds_on_the_issue_setting():
    """Mixtral-8x7B, 16 GiB GPU, MTBench-like: the KV cache (CPU memory) limits the running set
    below what the token budget allows, and relaxing it would raise throughput."""
    pred = predict_continuous(MIXTRAL, H100_16G, synthetic_workload("mtbench", 20000), POLICY)
    assert pred.running_seqs == pytest.approx(pred.running_seqs_kv)
    assert pred.running_seqs_kv < pred.running_seqs_budget
    assert pred.bottleneck == "cpu_memory_capacity"
    assert pred.unlimited_kv_tok_s > pred.throughput_tok_s
    assert pred.throughput_tok_s == pytest.approx(pred.running_seqs / pred.pass_s)
    assert pred.decode_tokens_per_pass + pred.prefill_tokens_per_pass <= POLICY.batch_size


def test_stage_binds_when_memory_is_plenty():
    """With few sequences the job, not the KV cache, limits the running set; a stage binds."""
    pred = predict_continuous(MIXTRAL, H100_16G, synthetic_workload("mtbench", 300), POLICY)
    assert pred.running_seqs == 300
    assert pred.bottleneck in {"link", "gpu", "cpu_attention", "micro_batch_chain"}


@settings(max_examples=12, deadline=None)
@given(cpu_gib=st.floats(100, 400), more=st.floats(1.0, 2.0), link=st.floats(1.0, 2.0))
def test_more_cpu_memory_or_link_never_lowers_throughput(cpu_gib, more, link):
    work = synthetic_workload("rag", 5000)
    hw = H100_16G.with_memory(cpu_memory_bytes=cpu_gib * GiB)
    base = predict_continuous(MIXTRAL, hw, work, POLICY).throughput_tok_s
    bigger = hw.with_memory(cpu_memory_bytes=cpu_gib * more * GiB)
    assert predict_continuous(MIXTRAL, bigger, work, POLICY).throughput_tok_s >= base * (1 - 1e-9)
    faster = replace(hw, link=replace(hw.link, h2d_pinned_bps=hw.link.h2d_pinned_bps * link))
    assert predict_continuous(MIXTRAL, faster, work, POLICY).throughput_tok_s >= base * (1 - 1e-9)


@pytest.mark.parametrize("kind", ["mtbench", "rag", "reasoning"])
def test_steady_state_matches_the_schedulers_dry_run(kind):
    """The analytic job estimate is within 10% of timing every pass of the scheduler's dry run
    (12x more sequences than run at once, so ramp-up and drain are a small part)."""
    cpu = {"mtbench": 100, "rag": 110, "reasoning": 100}[kind] * GiB
    hw = H100_16G.with_memory(cpu_memory_bytes=cpu)
    probe = predict_continuous(MIXTRAL, hw, synthetic_workload(kind, 1000), POLICY)
    work = synthetic_workload(kind, int(12 * probe.running_seqs_kv) + 1, seed=1)
    pred = predict_continuous(MIXTRAL, hw, work, POLICY)
    passes, stats = simulate(list(work.prompt_lens), list(work.gen_lens or
                                                          [work.gen_len] * work.num_seqs),
                             num_blocks=pred.kv_blocks, block_tokens=pred.block_tokens,
                             token_budget=POLICY.batch_size)
    traced = predict_passes(pass_model(MIXTRAL, hw, work, POLICY), [p.shape() for p in passes])
    assert traced.generated_tokens == work.generated_tokens()
    assert stats.preemptions == 0
    assert traced.throughput_tok_s == pytest.approx(pred.job_throughput_tok_s, rel=0.10)
    assert traced.throughput_tok_s < pred.throughput_tok_s * 1.02


@given(st.lists(st.integers(0, 64), max_size=40))
def test_steady_window_spans_the_full_passes(decoding):
    """The window runs from the first to the last pass at >= STEADY_FRACTION of the most
    decoding sequences, so it holds every such pass and begins and ends on one."""
    shapes = [PassShape(d, 10.0 * d, 0, 0) for d in decoding]
    window = steady_window(shapes)
    peak = max(decoding, default=0)
    full = [i for i, d in enumerate(decoding) if peak and d >= STEADY_FRACTION * peak]
    assert set(full) <= set(window)
    if full:
        assert window.start == full[0] and window.stop - 1 == full[-1]
    else:
        assert not window


def test_steady_window_leaves_out_ramp_up_and_drain():
    running = [1, 2, 4, 8, 10, 10, 9, 10, 10, 6, 3, 1]
    window = steady_window([PassShape(r, 0, 0, 0) for r in running])
    assert (window.start, window.stop) == (4, 9)


def test_optimizer_takes_the_largest_r_w_that_fits():
    work = synthetic_workload("mtbench", 5000)
    res = optimize_continuous(MIXTRAL, H100_16G, work, micro_batch_sizes=(64, 256),
                              token_budgets=(1024, 4096))
    pol = res.policy
    cap = GPU_USABLE_FRACTION * H100_16G.gpu.memory_bytes
    assert gpu_need_bytes(MIXTRAL, H100_16G, work, pol) <= cap
    assert gpu_need_bytes(MIXTRAL, H100_16G, work,
                          replace(pol, weights_gpu_fraction=pol.weights_gpu_fraction + 0.02)) > cap
    assert res.num_candidates == 4
    for n_tok, mu in ((1024, 64), (4096, 64), (1024, 256), (4096, 256)):
        other = Policy(batch_size=n_tok, micro_batch_size=mu)
        r_w = max_weights_gpu_fraction(MIXTRAL, H100_16G, work, other)
        for r in (0.0, r_w / 2):
            alt = predict_continuous(MIXTRAL, H100_16G, work,
                                     replace(other, weights_gpu_fraction=r))
            assert alt.throughput_tok_s <= res.prediction.throughput_tok_s * (1 + 1e-9)


def test_infeasible_and_bad_policies():
    work = synthetic_workload("rag", 100)
    with pytest.raises(InfeasibleError, match="KV cache"):
        predict_continuous(MIXTRAL, H100_16G.with_memory(cpu_memory_bytes=80 * GiB), work,
                           POLICY)
    with pytest.raises(InfeasibleError, match="GPU memory"):
        predict_continuous(MIXTRAL, H100_16G, work, replace(POLICY, weights_gpu_fraction=0.5))
    with pytest.raises(PolicyError, match="CPU memory"):
        predict_continuous(MIXTRAL, H100_16G, work, replace(POLICY, attn_decode_device="gpu"))
    with pytest.raises(InfeasibleError):
        optimize_continuous(MIXTRAL, H100.with_memory(gpu_memory_bytes=2 * GiB), work)


def test_cli_optimize_then_predict_continuous(tmp_path, hrm_cli):
    import json

    common = ["-m", "mixtral-8x7b", "-H", "h100-machine", "--gpu-mem", "16", "--prompt-len",
              "1", "--gen-len", "128", "--synthetic", "mtbench", "--num-seqs", "3000",
              "--scheduler", "continuous"]
    policy = tmp_path / "policy.json"
    code, out, err = hrm_cli("optimize", *common, "-o", str(policy), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["bottleneck"] == "cpu_memory_capacity"
    assert doc["static"]["continuous_over_static"] > 1
    assert doc["dry_run"]["throughput_tok_s"] == pytest.approx(doc["job_throughput_tok_s"],
                                                               rel=0.10)
    assert Policy.load(policy).batch_size == doc["token_budget"]
    code, out, err = hrm_cli("predict", *common, "--policy", str(policy))
    assert code == 0, err
    assert "cpu_memory_capacity" in out and "static cgopipe" in out
    code, _, err = hrm_cli("predict", *common[:-1], "sometimes")
    assert code == 2 and "--scheduler must be static or continuous" in err
