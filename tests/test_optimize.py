"""The MILP policy search against the brute-force reference and the cost model itself."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrm.cost import predict
from hrm.errors import InfeasibleError
from hrm.hardware import load_profile
from hrm.model import load_model_spec, shipped_models
from hrm.optimize import SearchGrid, brute_force, compare_schedules, optimize
from hrm.units import GiB
from hrm.workload import Workload

#: a small candidate set keeps each MILP + brute-force pair well under a second
SMALL = SearchGrid(micro_batch_sizes=(1, 8, 32, 128), num_micro_batches=(1, 2, 4, 8))
MIXTRAL = load_model_spec("mixtral-8x7b")
T4 = load_profile("t4")


def _fits(result) -> bool:
    mem = result.prediction.memory
    return (mem.gpu_bytes <= mem.gpu_capacity_bytes * (1 + 1e-6)
            and mem.cpu_bytes <= mem.cpu_capacity_bytes * (1 + 1e-6))


cases = st.fixed_dictionaries({
    "model": st.sampled_from(shipped_models()),
    "hardware": st.sampled_from(["t4", "l4", "a40", "a100-40g", "h100"]),
    "gpu_scale": st.floats(0.2, 1.0), "cpu_scale": st.floats(0.1, 1.5),
    "link_scale": st.floats(0.25, 4.0), "pinned_gb": st.sampled_from([None, 8.0, 60.0]),
    "prompt_len": st.integers(8, 2048), "gen_len": st.integers(1, 512),
    "num_seqs": st.integers(1, 4096),
    "schedule": st.sampled_from(["cgopipe", "cgopipe", "cgopipe-serial", "layerwise"]),
})


def _setup(case):
    hw = load_profile(case["hardware"])
    hw = hw.with_memory(gpu_memory_bytes=hw.gpu.memory_bytes * case["gpu_scale"],
                        cpu_memory_bytes=hw.cpu.memory_bytes * case["cpu_scale"])
    link = replace(hw.link, h2d_pinned_bps=hw.link.h2d_pinned_bps * case["link_scale"],
                   d2h_pinned_bps=hw.link.d2h_pinned_bps * case["link_scale"])
    if case["pinned_gb"] is not None:
        link = replace(link, pinned_max_bytes=case["pinned_gb"] * 1e9,
                       pageable_to_pinned_bps=20e9)
    workload = Workload(num_seqs=case["num_seqs"], prompt_len=case["prompt_len"],
                        gen_len=case["gen_len"])
    return load_model_spec(case["model"]), replace(hw, link=link), workload


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_milp_matches_brute_force_and_the_cost_model(case):
    model, hw, workload = _setup(case)
    try:
        reference = brute_force(model, hw, workload, schedule=case["schedule"], grid=SMALL)
    except InfeasibleError:
        reference = None
    try:
        milp = optimize(model, hw, workload, schedule=case["schedule"], grid=SMALL)
    except InfeasibleError:
        assert reference is None, "the MILP found nothing where brute force found a policy"
        return
    assert milp.method == "milp" and milp.solve_s > 0
    assert _fits(milp)
    assert milp.policy.batch_size <= workload.num_seqs
    # the MILP's claimed optimum is what the cost model says of its policy
    assert milp.prediction.throughput_tok_s == pytest.approx(milp.objective_tok_s, rel=1e-4)
    if reference is not None:
        assert _fits(reference)
        assert milp.prediction.throughput_tok_s >= 0.99 * reference.prediction.throughput_tok_s


@settings(max_examples=8, deadline=None)
@given(cpu_gib=st.floats(100, 400), extra_gib=st.floats(1, 200),
       gen_len=st.sampled_from([32, 128, 256]))
def test_more_cpu_memory_never_lowers_the_optimum(cpu_gib, extra_gib, gen_len):
    workload = Workload(num_seqs=10000, prompt_len=100, gen_len=gen_len)
    low = optimize(MIXTRAL, T4.with_memory(cpu_memory_bytes=cpu_gib * GiB), workload, grid=SMALL)
    high = optimize(MIXTRAL, T4.with_memory(cpu_memory_bytes=(cpu_gib + extra_gib) * GiB),
                    workload, grid=SMALL)
    assert high.prediction.throughput_tok_s >= low.prediction.throughput_tok_s * (1 - 1e-6)


def test_shipped_case_full_grid():
    workload = Workload(num_seqs=10000, prompt_len=100, gen_len=128)
    result = optimize(MIXTRAL, T4, workload)
    again = predict(MIXTRAL, T4, workload, result.policy)
    assert again.throughput_tok_s == pytest.approx(result.objective_tok_s, rel=1e-4)
    assert result.policy.attn_decode_device == "cpu"          # MoE-Lightning: A_g = 0 on a T4
    assert result.prediction.bottleneck == "link"
    assert _fits(result) and result.num_candidates > 100


def test_infeasible_names_the_constraint_and_the_shortfall():
    workload = Workload(num_seqs=100, prompt_len=100, gen_len=32)
    with pytest.raises(InfeasibleError, match=r"needs \d+\.\d GiB GPU memory .* GiB given"):
        optimize(load_model_spec("mixtral-8x22b"), T4, workload, grid=SMALL)
    small_cpu = T4.with_memory(cpu_memory_bytes=24 * GiB)
    with pytest.raises(InfeasibleError, match=r"needs \d+\.\d GiB CPU memory .*21\.6 GiB usable "
                                              r"of 24\.0 GiB given"):
        optimize(MIXTRAL, small_cpu, workload, grid=SMALL)
    with pytest.raises(InfeasibleError, match="CPU memory"):
        brute_force(MIXTRAL, small_cpu, workload, grid=SMALL)


def test_compare_schedules_shows_what_pipelining_buys():
    workload = Workload(num_seqs=10000, prompt_len=100, gen_len=128)
    results = compare_schedules(MIXTRAL, T4, workload, grid=SMALL)
    assert set(results) == {"cgopipe", "cgopipe-serial", "layerwise"}
    tok_s = {name: r.prediction.throughput_tok_s for name, r in results.items()}
    assert tok_s["cgopipe"] > tok_s["cgopipe-serial"]
    assert results["layerwise"].policy.attn_decode_device == "gpu"
    assert results["layerwise"].policy.schedule == "layerwise"


def test_dtypes_reach_the_policy():
    workload = Workload(num_seqs=1000, prompt_len=100, gen_len=64)
    bf16 = optimize(MIXTRAL, T4, workload, grid=SMALL)
    int8 = optimize(MIXTRAL, T4, workload, grid=SMALL, weight_dtype="int8", kv_dtype="fp8")
    assert int8.policy.weight_dtype == "int8" and int8.policy.kv_dtype == "fp8"
    assert int8.prediction.throughput_tok_s > bf16.prediction.throughput_tok_s
    with pytest.raises(ValueError, match="method"):
        optimize(MIXTRAL, T4, workload, method="annealing")


def test_the_expert_kernel_is_searched_with_the_weights_fraction():
    """Both routed-expert kernels are modes of the search, each with r_w free (a grouped layer
    with some experts resident is staged whole), and the MILP agrees with brute force."""
    spec = replace(MIXTRAL, num_layers=4)
    hw = load_profile("h200-machine").with_memory(gpu_memory_bytes=9 * GiB,
                                                  cpu_memory_bytes=120 * GiB)
    workload = Workload(num_seqs=1024, prompt_len=128, gen_len=16)
    grid = SearchGrid(micro_batch_sizes=(16, 64), num_micro_batches=(1, 4, 16))
    both = optimize(spec, hw, workload, grid=grid)
    reference = brute_force(spec, hw, workload, grid=grid)
    loop = optimize(spec, hw, workload, grid=replace(grid, expert_kernels=("loop",)))
    assert loop.policy.expert_kernel == "loop"
    assert both.prediction.throughput_tok_s >= loop.prediction.throughput_tok_s
    assert both.policy.expert_kernel == reference.policy.expert_kernel
    assert both.prediction.throughput_tok_s >= 0.99 * reference.prediction.throughput_tok_s
    # on this launch-bound machine the grouped kernel's fewer launches win, with experts resident
    assert both.policy.expert_kernel == "grouped"
    assert both.policy.weights_gpu_fraction > 0.0
    assert both.prediction.throughput_tok_s == pytest.approx(both.objective_tok_s, rel=1e-4)
