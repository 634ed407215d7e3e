"""Placement and memory plan of the executor (no weights are allocated)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from executor.engine import WEIGHT_STAGING, build_engine, plan_memory  # noqa: E402
from executor.kv_cache import KVCache, kv_cache_bytes  # noqa: E402
from executor.weights import resident_experts_per_layer  # noqa: E402
from hrm.errors import InfeasibleError, PolicyError  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.model import load_model_spec  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.workload import Workload  # noqa: E402

MIXTRAL = load_model_spec("mixtral-8x7b")


@settings(max_examples=50, deadline=None)
@given(r_w=st.floats(0, 1))
def test_resident_experts_realize_r_w_in_whole_experts(r_w: float) -> None:
    resident = resident_experts_per_layer(MIXTRAL, r_w)
    total = MIXTRAL.num_layers * MIXTRAL.num_experts
    assert abs(sum(resident) / total - r_w) <= 0.5 / total + 1e-12
    assert max(resident) - min(resident) <= 1  # spread evenly over the layers
    # the policy the cost model predicts executor runs with is the one realized here
    realized = Policy(batch_size=8, micro_batch_size=8, weights_gpu_fraction=r_w
                      ).in_whole_experts(MIXTRAL.num_layers, MIXTRAL.num_experts)
    assert realized.weights_gpu_fraction == sum(resident) / total


@settings(max_examples=30, deadline=None)
@given(prompt_lens=st.lists(st.integers(1, 300), min_size=1, max_size=40),
       gen_len=st.integers(1, 64), block=st.sampled_from([16, 64]))
def test_kv_cache_is_sized_exactly_in_blocks(prompt_lens, gen_len, block) -> None:
    caps = Workload.from_lens(prompt_lens, gen_len).slot_capacities(len(prompt_lens))
    blocks = sum(-(-c // block) for c in caps)
    per_token = MIXTRAL.kv_bytes_per_token("bf16")  # all layers, K and V
    assert kv_cache_bytes(MIXTRAL, caps, torch.bfloat16, block) == blocks * block * per_token


def test_kv_cache_allocation_matches_its_byte_count() -> None:
    spec = load_model_spec("qwen1.5-moe-a2.7b")
    caps = [130, 64, 64, 3]
    cache = KVCache.allocate(spec, caps, torch.float32, torch.device("cpu"), float("inf"), "CPU",
                             block_tokens=32)
    assert cache.nbytes == kv_cache_bytes(spec, caps, torch.float32, 32)
    with pytest.raises(InfeasibleError, match="KV cache for 4 sequences needs"):
        KVCache.allocate(spec, caps, torch.float32, torch.device("cpu"), 1e3, "CPU")


def test_plan_counts_offloaded_experts_and_staging() -> None:
    policy = Policy(batch_size=64, micro_batch_size=16, weights_gpu_fraction=0.25)
    resident = resident_experts_per_layer(MIXTRAL, 0.25)
    plan = plan_memory(MIXTRAL, policy, resident, [100] * 64, 32)
    expert = MIXTRAL.expert_bytes("bf16")
    assert plan.gpu["resident experts"] == 64 * expert          # 2 of 8 experts x 32 layers
    assert plan.cpu["streamed experts"] == 192 * expert
    assert plan.gpu[WEIGHT_STAGING] == 2 * 6 * expert
    assert plan.gpu["KV cache"] == 0 and plan.cpu["KV cache"] > 0
    with pytest.raises(InfeasibleError, match="does not fit GPU memory"):
        plan.check(gpu_limit_bytes=16 * 2**30, cpu_limit_bytes=1e12)


@pytest.mark.parametrize(("mu", "n_ub", "prompt", "attn"), [
    (48, 4, 100, "cpu"), (64, 16, 128, "cpu"), (32, 64, 256, "cpu"), (48, 2, 77, "gpu"),
    (16, 1, 512, "cpu")])
def test_plan_and_cost_model_count_the_same_pinned_slots(mu, n_ub, prompt, attn) -> None:
    """The executor's pinned slots (prefill parking, CPU attention's q/k/v and output) at the
    sizes torch's pinned allocator gives them are the cost model's activation buffers."""
    from hrm.cost import memory_footprint
    from hrm.hardware import load_profile

    policy = Policy(batch_size=mu * n_ub, micro_batch_size=mu, attn_decode_device=attn)
    plan = plan_memory(MIXTRAL, policy, resident_experts_per_layer(MIXTRAL, 0.0),
                       [prompt] * policy.batch_size, 16)
    pinned = sum(v for k, v in plan.cpu.items() if k.endswith("(pinned)"))
    footprint = memory_footprint(MIXTRAL, load_profile("t4"),
                                 Workload(policy.batch_size, prompt, 16), policy)
    assert pinned == footprint.cpu_breakdown["activation buffers"]
    # a 48 x 100-token parking slot asks for 37.5 MiB and takes 64
    if (mu, prompt) == (48, 100):
        assert plan.cpu["prefill parking (pinned)"] == n_ub * 64 * 2**20


@settings(max_examples=40, deadline=None)
@given(prompt_lens=st.lists(st.integers(1, 600), min_size=1, max_size=300),
       gen_len=st.integers(1, 256), mu=st.integers(1, 64), n_ub=st.integers(1, 8),
       attn=st.sampled_from(["cpu", "gpu"]))
def test_cost_model_sizes_ragged_kv_and_prefill_as_the_executor(prompt_lens, gen_len, mu, n_ub,
                                                                 attn) -> None:
    """With ragged prompts the cost model's CPU KV cache, prefill workspace and pinned slots are
    the executor plan's bytes: both size slot r for the r-th longest prompt + gen_len and the
    prefill micro-batch for the mu longest prompts (not N or mu times the longest)."""
    from hrm.cost import cost_terms, memory_footprint
    from hrm.hardware import load_profile

    hw = load_profile("h100-machine")
    batch_size = mu * n_ub
    policy = Policy(batch_size=batch_size, micro_batch_size=mu, attn_decode_device=attn)
    workload = Workload.from_lens(prompt_lens, gen_len)
    plan = plan_memory(MIXTRAL, policy, resident_experts_per_layer(MIXTRAL, 0.0), prompt_lens,
                       gen_len)
    model = memory_footprint(MIXTRAL, hw, workload, policy)
    assert model.cpu_breakdown["KV cache"] == pytest.approx(plan.cpu["KV cache"], rel=1e-12)
    pinned = sum(v for k, v in plan.cpu.items() if k.endswith("(pinned)"))
    assert model.cpu_breakdown["activation buffers"] == pytest.approx(pinned, rel=1e-12)
    prefill_ws = cost_terms(MIXTRAL, hw, workload, policy).gpu_memory["prefill"][
        "activations"](0.0, 0.0, 0.0)
    assert prefill_ws == pytest.approx(plan.gpu["activation workspace"], rel=1e-12)
    # the sorted order never sizes a slot or a micro-batch below what it holds
    assert plan.capacities[0] == max(prompt_lens) + gen_len
    assert sum(plan.capacities) <= min(batch_size, len(prompt_lens)) * plan.capacities[0]


@pytest.mark.parametrize(("model", "hardware", "gpu_gib", "prompt", "gen"), [
    ("mixtral-8x7b", "t4", None, 100, 64),
    ("mixtral-8x7b", "h100-machine", 16.0, 100, 128),
    ("qwen1.5-moe-a2.7b", "l4", 8.0, 200, 32),
    ("tiny-mixtral", "h100-machine", 0.03, 32, 16),
])
def test_the_optimizers_policy_passes_the_executors_memory_plan(model, hardware, gpu_gib, prompt,
                                                                gen) -> None:
    """The cost model and the executor size activations with one formula
    (hrm.cost.prefill_workspace_bytes), so what `hrm optimize` picks is what `hrm run` accepts
    under the same GPU cap (the executor realizes r_w in whole experts, spread evenly)."""
    from hrm.hardware import load_profile
    from hrm.optimize import optimize
    from hrm.units import GiB

    spec = load_model_spec(model)
    hw = load_profile(hardware).with_memory(
        gpu_memory_bytes=None if gpu_gib is None else gpu_gib * GiB)
    policy = optimize(spec, hw, Workload(num_seqs=4096, prompt_len=prompt, gen_len=gen)).policy
    resident = resident_experts_per_layer(spec, policy.weights_gpu_fraction)
    plan = plan_memory(spec, policy, resident, [prompt] * policy.batch_size, gen)
    plan.check(gpu_limit_bytes=hw.gpu.memory_bytes, cpu_limit_bytes=hw.cpu.memory_bytes)


def test_warm_up_leaves_no_trace_in_the_measured_run() -> None:
    """Engine.warm_up (run before the timed generate on CUDA) must not change the outputs,
    the seeded sampling or the byte counters of the run that follows."""
    from executor.engine import build_engine
    from executor.sampling import Sampling

    prompts = [[5 + i + j for j in range(3 + 2 * i)] for i in range(6)]
    policy = Policy(batch_size=4, micro_batch_size=2, weight_dtype="fp32", kv_dtype="fp32",
                    weights_gpu_fraction=0.25)

    def engine():
        return build_engine("tiny-mixtral", policy, device=torch.device("cpu"),
                            prompt_lens=[len(p) for p in prompts], gen_len=5,
                            gpu_mem_bytes=2**32, cpu_mem_bytes=2**32,
                            sampling=Sampling(temperature=1.0, top_p=0.9, seed=3))

    cold = engine().generate(prompts, 5)
    warm_engine = engine()
    assert warm_engine.warm_up(prompts) > 0
    warm = warm_engine.generate(prompts, 5)
    assert warm.outputs == cold.outputs
    assert warm.bytes_moved == cold.bytes_moved


def test_pin_plan_pins_everything_under_an_unlimited_budget() -> None:
    """An infinite budget (no pinned limit: the profile's calibration, validate's shared model)
    pins every layer whole (2026-12-03: inf // element bytes was NaN and the plan failed)."""
    from executor.weights import pin_plan

    assert pin_plan([40, 0, 17], 2, float("inf"), 8) == [40, 0, 17]
    assert pin_plan([40, 17], 2, 2 * 57.0, 8) == [40, 17]


@settings(max_examples=50, deadline=None)
@given(layers=st.lists(st.integers(0, 40), min_size=1, max_size=6), budget=st.integers(0, 200),
       page=st.integers(1, 8))
def test_pin_plan_leaves_every_layer_the_same_overflow(layers, budget, page) -> None:
    """What stays pageable is the streamed bytes beyond the budget, up to one page of rounding
    (the cost model's o = max(0, streamed - pinnable)), spread evenly over the layers (o / l_moe
    each, to within a page unless the budget's rest is too short for one), in whole pages."""
    from executor.weights import pin_plan

    plan = pin_plan(layers, 2, float(budget), page)
    assert all(0 <= p <= n for p, n in zip(plan, layers, strict=True))
    assert all(p == n or p % page == 0 for p, n in zip(plan, layers, strict=True))
    assert 2 * sum(plan) <= budget
    if sum(plan) < sum(layers):
        assert budget - 2 * sum(plan) < 2 * page              # less than a page was left over
    overflow = [n - p for p, n in zip(plan, layers, strict=True)]
    pinned_overflow = [o for o, p in zip(overflow, plan, strict=True) if p]
    left = budget // 2 - sum(plan)
    for o in overflow:   # more overflow than a pinned layer by over a page: its page did not fit
        if pinned_overflow and o - min(pinned_overflow) > page:
            assert left < min(page, o)


class _PendingEvent:
    """A CUDA event stand-in that completes only when waited for (a link that never drains
    by itself)."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_weight_link_queues_pinned_pages_while_the_copy_threads_stage(monkeypatch) -> None:
    """The link thread queues pinned pages while the copy threads memcpy a pageable chunk into
    the ring: a memcpy held until two pinned copies are on the link does not hold the link up
    (until 2026-12-03 the link thread did each memcpy itself, so the pinned pages waited)."""
    from executor import schedule
    from executor.trace import Tracer
    from executor.weights import ExpertStore

    spec, cpu = load_model_spec("tiny-mixtral"), torch.device("cpu")
    unit = 3 * spec.hidden_size * spec.expert_intermediate_size
    src = [torch.randn(spec.num_experts * unit)]
    page = unit // 4
    pages = -(-src[0].numel() // page)
    store = ExpertStore(spec, torch.float32, cpu, [0], [torch.empty(0)], src,
                        [(pages - 3) * page], [torch.zeros_like(src[0])], page)
    copy_bytes = schedule.PINNED_PAGES_PER_COPY * page * 4
    monkeypatch.setattr(schedule, "WEIGHT_BYTES_IN_FLIGHT", 2 * copy_bytes)
    queued, gate, released = [], threading.Event(), []

    def record(stream):
        queued.append(1)
        if len(queued) == 2:
            gate.set()
        return _PendingEvent()

    def held_memmove(dst, src_ptr, nbytes):
        released.append(gate.wait(timeout=10))
        return memmove(dst, src_ptr, nbytes)

    memmove = schedule._memmove
    monkeypatch.setattr(schedule, "record", record)
    monkeypatch.setattr(schedule, "_memmove", held_memmove)
    tracer = Tracer(cpu)
    link = schedule.WeightLink(store, schedule.Streams(cpu), tracer)
    try:
        link.fetch(0, 0, None).result()
    finally:
        link.close()
    assert torch.equal(store.staging[0], src[0])
    assert released and all(released)   # the two pinned copies were queued during the memcpy
    spans = tracer.spans()
    staging = [s for s in spans if s.track == "copy_thread"]
    pinned = [s for s in spans if s.track == "h2d"][:2]
    assert len(staging) == 1
    assert all(staging[0].start_s <= s.start_s <= staging[0].end_s for s in pinned)


def test_weight_link_streams_pinned_pages_and_ring_pages_of_one_layer() -> None:
    """A layer pinned in part: its pinned pages go straight, the rest through the ring, and the
    staging buffer ends up with the whole layer (on the CPU stand-in, where both are memcpys)."""
    from executor.schedule import Streams, WeightLink
    from executor.trace import Tracer
    from executor.weights import ExpertStore

    spec, cpu = load_model_spec("tiny-mixtral"), torch.device("cpu")
    unit = 3 * spec.hidden_size * spec.expert_intermediate_size
    src = [torch.randn(spec.num_experts * unit) for _ in range(2)]
    page = unit // 4
    store = ExpertStore(spec, torch.float32, cpu, [0, 0], [torch.empty(0)] * 2, src,
                        [5 * page, 0], [torch.zeros_like(src[0])], page)
    link = WeightLink(store, Streams(cpu), Tracer(cpu))
    try:
        link.fetch(0, 0, None).result()
        assert torch.equal(store.staging[0], src[0])
        assert link.bytes_pinned_path == 5 * page * 4
        assert link.bytes_staged_path == (src[0].numel() - 5 * page) * 4
    finally:
        link.close()


def test_prefill_holds_one_micro_batchs_hidden_states_at_a_time() -> None:
    """Between its layers a prefill micro-batch's hidden states wait in host memory (the cost
    model's prefill_swap): when a micro-batch runs a layer, no other one holds device hidden
    states, and every parked copy crossed (hidden_d2h = hidden_h2d)."""
    from executor.engine import build_engine

    prompts = [[5 + i + j for j in range(4)] for i in range(6)]
    policy = Policy(batch_size=6, micro_batch_size=2, weight_dtype="fp32", kv_dtype="fp32")
    engine = build_engine("tiny-mixtral", policy, device=torch.device("cpu"),
                          prompt_lens=[len(p) for p in prompts], gen_len=2,
                          gpu_mem_bytes=2**32, cpu_mem_bytes=2**32)
    holding, mbs = [], []
    original_prefill, original_item = engine._prefill, engine._prefill_item

    def prefill_spy(micro_batches, *args):
        mbs.extend(micro_batches)
        return original_prefill(micro_batches, *args)

    def spy(layer, mb, *args):
        holding.append((layer, sum(o.hidden is not None for o in mbs if o is not mb)))
        original_item(layer, mb, *args)

    parked_into, original_park = [], engine._park

    def park_spy(m, hidden):
        host, event = original_park(m, hidden)
        parked_into.append((m, host.data_ptr()))
        return host, event

    engine._prefill, engine._prefill_item, engine._park = prefill_spy, spy, park_spy
    gen = engine.generate(prompts, 2)
    last = engine.spec.num_layers - 1
    # layers 0..l-2: the others are parked or not embedded yet (at the last layer the finished
    # ones hold their next token's embedding, the decode input)
    assert [n for layer, n in holding if layer < last] == [0] * 3 * last
    assert gen.bytes_moved["hidden_d2h"] == gen.bytes_moved["hidden_h2d"] > 0
    # every park lands in its micro-batch's slot of the pool allocated with the engine (sized
    # by the plan: 2 prompts of 4 tokens per micro-batch), none in a new allocation
    assert len(engine.park_host) == 3
    assert all(t.numel() == 8 * engine.spec.hidden_size for t in engine.park_host)
    assert parked_into and all(ptr == engine.park_host[m].data_ptr() for m, ptr in parked_into)


def test_experts_run_in_bounded_chunks_with_the_same_output(monkeypatch) -> None:
    """routed_experts runs an expert's tokens in chunks of at most EXPERT_CHUNK_ROWS rows, which
    bounds the intermediate activations the memory model counts (hrm.cost.
    prefill_workspace_bytes) however unbalanced the routing; the output is that of one GEMM pair
    per expert."""
    from executor import layers as L

    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, n_experts = 37, 16, 24, 4
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    experts = torch.stack([torch.randperm(n_experts, generator=g)[:2] for _ in range(tokens)])
    experts[:30, 0] = 1   # unbalanced: expert 1 gets at least 30 tokens
    gates = torch.rand(tokens, 2, generator=g, dtype=torch.float64)
    w = [(torch.randn(2 * inter, hidden, generator=g, dtype=torch.float64),
          torch.randn(hidden, inter, generator=g, dtype=torch.float64)) for _ in range(n_experts)]
    whole = L.routed_experts(h, experts, gates, n_experts, lambda e: w[e])
    rows_seen = []
    swiglu = L.swiglu
    monkeypatch.setattr(L, "swiglu", lambda x, *ws, **kw: rows_seen.append(len(x))
                        or swiglu(x, *ws, **kw))
    monkeypatch.setattr(L, "EXPERT_CHUNK_ROWS", 5)
    chunked = L.routed_experts(h, experts, gates, n_experts, lambda e: w[e])
    assert max(rows_seen) == 5 and sum(rows_seen) == 2 * tokens
    torch.testing.assert_close(chunked, whole)
    naive = torch.stack([sum(gates[t, j] * swiglu(h[t:t + 1], *w[int(experts[t, j])])[0]
                             for j in range(2)) for t in range(tokens)])
    torch.testing.assert_close(whole, naive)


def test_gpu_busy_time_leaves_out_the_stalls_on_weights() -> None:
    """The compute stream's wait for a layer's weights is traced inside the GPU span; a
    link-bound GPU is waiting, not working, so decode_busy_s takes the wait out."""
    from executor.trace import WAIT_TRACK, Span, decode_busy_s

    spans = [Span("gpu", "post_attn", 0.0, 10.0), Span(WAIT_TRACK, "weights_wait", 2.0, 6.0),
             Span("gpu", "post_attn", 12.0, 13.0), Span("h2d", "weights_h2d", 1.0, 12.0)]
    busy = decode_busy_s(spans, [(0.0, 20.0)])
    assert busy["gpu"] == pytest.approx(7.0) and busy[WAIT_TRACK] == pytest.approx(4.0)
    assert busy["h2d"] == pytest.approx(11.0)


def _tiny_generation():
    """tiny-mixtral on the CPU stand-in, every expert streamed: 4 prompts of 4 tokens in 2
    micro-batches, 3 tokens generated (prefill + 2 decode steps); the engine and its output."""
    from executor.engine import build_engine

    prompts = [[5 + i + j for j in range(4)] for i in range(4)]
    policy = Policy(batch_size=4, micro_batch_size=2, weight_dtype="fp32", kv_dtype="fp32")
    engine = build_engine("tiny-mixtral", policy, device=torch.device("cpu"),
                          prompt_lens=[len(p) for p in prompts], gen_len=3,
                          gpu_mem_bytes=2**32, cpu_mem_bytes=2**32)
    return engine, engine.generate(prompts, 3)


def test_the_engine_traces_its_waits_for_streamed_weights() -> None:
    """With every expert streamed, each layer visit that reaches a streamed expert records one
    weights_wait span on the CPU stand-in too (the wait for the link thread's copy)."""
    from executor.trace import WAIT_TRACK

    engine, gen = _tiny_generation()
    waits = [s for s in gen.spans if s.track == WAIT_TRACK]
    visits = engine.spec.num_layers * 3   # prefill + 2 decode steps
    assert len(waits) == visits and all(s.end_s >= s.start_s for s in waits)


def test_the_launching_thread_is_traced_without_its_waits_for_attention() -> None:
    """The main thread's decode work is a `launcher` track: per micro-batch and layer,
    launch_pre, handoff_send, attn_wait, handoff_receive and launch_post with CPU attention;
    its busy time leaves out attn_wait (waiting for the worker is not host work)."""
    from executor.trace import LAUNCH_TRACK, Span, decode_busy_s

    spans = [Span(LAUNCH_TRACK, "launch_pre", 0.0, 1.0), Span(LAUNCH_TRACK, "attn_wait", 1.0, 5.0),
             Span(LAUNCH_TRACK, "launch_post", 5.0, 6.0)]
    assert decode_busy_s(spans, [(0.0, 10.0)])[LAUNCH_TRACK] == pytest.approx(2.0)
    engine, gen = _tiny_generation()
    items = engine.spec.num_layers * 2 * 2   # layers x decode steps x micro-batches
    names = [s.name for s in gen.spans if s.track == LAUNCH_TRACK]
    for name in ("launch_pre", "handoff_send", "attn_wait", "handoff_receive", "launch_post"):
        assert names.count(name) == items, name


def test_device_alias_needs_a_pinned_cuda_buffer() -> None:
    """The attention output's device alias (executor.schedule.device_alias) exists only for a
    pinned buffer on CUDA; elsewhere the engine copies (the CPU stand-in passes the host tensor
    itself). On CUDA the alias is the same memory, read exactly."""
    from executor.schedule import device_alias

    host = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    assert device_alias(host, torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert device_alias(host, torch.device("cuda")) is None   # not pinned
        return
    pinned = host.pin_memory()
    alias = device_alias(pinned, torch.device("cuda"))
    assert alias is not None and alias.data_ptr() == pinned.data_ptr()
    out = torch.mul(alias, 1)
    assert torch.equal(out.cpu(), host)
    pinned.add_(1)
    torch.cuda.synchronize()
    assert torch.equal(torch.mul(alias, 1).cpu(), host + 1)


@pytest.mark.parametrize("r_w", [0.0, 1.0, 0.4])
def test_grouped_experts_run_in_every_decode_layer(monkeypatch, r_w) -> None:
    """expert_kernel='grouped': decode micro-batches (3 steps x 2 micro-batches x 4 layers) run
    the grouped GEMMs whether a layer's experts are all streamed (r_w = 0), all resident (1) or
    split between the two (0.4: the layer is staged whole, its resident experts copied in, and
    the staging buffers hold all n_e experts, as plan_memory counts); prefill loops."""
    import executor.layers as L
    from executor.engine import build_engine

    calls = {"grouped": 0, "loop": 0}
    grouped, loop = L.routed_experts_grouped, L.routed_experts

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(L, "routed_experts_grouped", count("grouped", grouped))
    monkeypatch.setattr(L, "routed_experts", count("loop", loop))
    prompts = [[5, 9, 3, 7], [8, 2, 2, 40], [3, 1, 4, 1], [60, 61, 62, 63]]
    policy = Policy(batch_size=4, micro_batch_size=2, weights_gpu_fraction=r_w,
                    weight_dtype="fp32", kv_dtype="fp32", expert_kernel="grouped")
    engine = build_engine("tiny-mixtral", policy, device=torch.device("cpu"),
                          prompt_lens=[4] * 4, gen_len=4, gpu_mem_bytes=2**32,
                          cpu_mem_bytes=2**32)
    engine.generate(prompts, 4)
    assert calls == {"grouped": 24, "loop": 8}
    store, spec = engine.w.experts, engine.spec
    assert store.whole_layers == (r_w == 0.4)
    assert store.staging_bytes() == engine.plan.gpu[WEIGHT_STAGING]
    if r_w == 0.4:
        assert store.staging_bytes() == 2 * spec.num_experts * spec.expert_params() * 4


def test_host_wait_mode_is_checked_at_import() -> None:
    """MOE_LIGHTNING_HOST_WAIT picks how threads wait for CUDA events; a typo is an error, not
    the default silently."""
    import os
    import subprocess
    import sys

    code = "import executor.schedule as s; print(s.HOST_WAIT)"
    env = {**os.environ, "MOE_LIGHTNING_HOST_WAIT": "sleep"}
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "sleep"
    env["MOE_LIGHTNING_HOST_WAIT"] = "nap"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "expected spin or sleep" in bad.stderr


def test_three_staging_buffers_give_the_same_tokens_and_are_planned() -> None:
    """policy staging_buffers=3: visit g streams into buffer g mod 3 once visit g - 3's compute
    is queued; the tokens are those of double buffering, the store holds three buffers, and the
    plan and the cost model count them. Fewer than two is a policy error."""
    from hrm.cost import STAGING_TERM, cost_terms, expert_staging_bytes

    prompts = [[5, 9, 3, 7], [8, 2, 2, 40], [3, 1, 4, 1], [60, 61, 62, 63]]
    outputs = {}
    for buffers in (2, 3):
        policy = Policy(batch_size=4, micro_batch_size=2, weights_gpu_fraction=0.25,
                        weight_dtype="fp32", kv_dtype="fp32", staging_buffers=buffers)
        engine = build_engine("tiny-mixtral", policy, device=torch.device("cpu"),
                              prompt_lens=[4] * 4, gen_len=5, gpu_mem_bytes=2**32,
                              cpu_mem_bytes=2**32)
        outputs[buffers] = engine.generate(prompts, 5).outputs
        store, spec = engine.w.experts, engine.spec
        assert len(store.staging) == buffers
        assert store.staging_bytes() == engine.plan.gpu[WEIGHT_STAGING]
        model_bytes = expert_staging_bytes(spec, policy, policy.weights_gpu_fraction)
        assert model_bytes == store.staging_bytes()
        bound = cost_terms(spec, load_profile("t4"), Workload(4, 4, 5),
                           policy).gpu_memory["decode"][STAGING_TERM]
        assert bound(policy.weights_gpu_fraction, 0.0, 0.0) >= model_bytes
    assert outputs[2] == outputs[3]
    with pytest.raises(PolicyError, match="staging_buffers"):
        Policy(batch_size=4, micro_batch_size=2, staging_buffers=1)
    assert Policy.from_dict({"batch_size": 4, "micro_batch_size": 2}).staging_buffers == 2
