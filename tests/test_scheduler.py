"""The continuous scheduler (executor/scheduler.py): blocks, admission, preemption, finishing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.scheduler import ContinuousScheduler, blocks_for, simulate
from hrm.errors import InfeasibleError, WorkloadError


@st.composite
def jobs(draw):
    n = draw(st.integers(1, 25))
    prompts = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    gens = draw(st.lists(st.integers(1, 25), min_size=n, max_size=n))
    block_tokens = draw(st.integers(1, 16))
    longest = max(blocks_for(p + g, block_tokens) for p, g in zip(prompts, gens, strict=True))
    num_blocks = longest + draw(st.integers(0, 3 * longest))
    return dict(prompt_lens=prompts, gen_lens=gens, num_blocks=num_blocks,
                block_tokens=block_tokens, token_budget=draw(st.integers(1, 120)),
                lookahead=draw(st.sampled_from([None, 0, 1, 4])), pace=draw(st.booleans()))


@settings(max_examples=150, deadline=None)
@given(job=jobs(), eos_seed=st.integers(0, 2**16), eos_rate=st.sampled_from([0.0, 0.1]))
def test_invariants(job, eos_seed, eos_rate):
    """Blocks are never over-allocated, every sequence finishes (none dropped) with its tokens,
    passes respect the token budget, first admissions follow sequence order, and projecting the
    whole remaining life never preempts."""
    rng = random.Random(eos_seed)
    s = ContinuousScheduler(**job)
    b, n = job["block_tokens"], len(job["prompt_lens"])
    first_admission: list[int] = []
    eos_done: set[int] = set()
    for _ in range(10_000):
        if s.done:
            break
        p = s.next_pass()
        assert s.free_blocks >= 0
        assert s.free_blocks + sum(q.blocks for q in s.seqs) == job["num_blocks"]
        assert all(q.blocks == blocks_for(q.cached, b) for q in s.seqs)
        tokens = len(p.decode) + sum(p.prefill_tokens)
        assert len(p.decode) <= job["token_budget"]
        assert tokens <= job["token_budget"] or len(p.prefill) == 1
        for seq_id, fed in zip(p.prefill, p.prefill_tokens, strict=True):
            seq = s.seqs[seq_id]
            assert fed == seq.prompt_len + seq.generated    # re-prefill recomputes everything
            if seq.preemptions == 0:
                first_admission.append(seq_id)
        assert set(p.decode).isdisjoint(p.prefill)
        eos = frozenset(i for i in (*p.decode, *p.prefill) if rng.random() < eos_rate)
        eos_done |= eos
        s.complete(p, eos)
    assert s.done and s.finished == set(range(n))
    assert first_admission == sorted(first_admission) == list(range(n))
    for q in s.seqs:
        assert q.generated == q.gen_len or (q.seq_id in eos_done and q.generated < q.gen_len)
    assert s.free_blocks == job["num_blocks"]
    if job["lookahead"] is None and eos_rate == 0:
        assert s.stats.preemptions == 0


def test_short_lookahead_preempts_newest_and_reprefills_it():
    """Two sequences that each need 11 blocks at their end, 12 blocks in all, greedy admission:
    the newer one is preempted, re-prefilled with prompt + generated tokens, and finishes."""
    s = ContinuousScheduler([1, 1], [10, 10], num_blocks=12, block_tokens=1, token_budget=8,
                            lookahead=0, pace=False)
    passes = []
    while not s.done:
        p = s.next_pass()
        s.complete(p)
        passes.append(p)
    preempted = [i for p in passes for i in p.preempted]
    assert preempted and set(preempted) == {1}
    refills = [(p.prefill, p.prefill_tokens) for p in passes[1:] if p.prefill]
    assert refills and all(ids == (1,) and fed[0] > 1 for ids, fed in refills)
    assert [q.generated for q in s.seqs] == [10, 10]
    assert s.stats.recomputed_tokens > 0


def test_deterministic_and_counts_every_token():
    prompts = [5, 17, 3, 40, 9, 22, 31, 2] * 4
    gens = [7, 3, 12, 5, 20, 1, 9, 4] * 4
    kwargs = dict(num_blocks=30, block_tokens=4, token_budget=48)
    a, stats_a = simulate(prompts, gens, **kwargs)
    b, _ = simulate(prompts, gens, **kwargs)
    assert a == b
    assert sum(len(p.decode) + len(p.prefill) for p in a) == sum(gens)
    assert stats_a.peak_blocks <= 30


def test_paced_admission_reaches_the_little_law_running_set():
    """Fixed lengths p=20, g=40, b=8: a running sequence holds m = sum_{x=20}^{59} ceil(x/8)/40
    blocks on average, so 600 blocks sustain 600/m running sequences; the middle of a long job
    runs within 5% of that."""
    p, g, b, blocks = 20, 40, 8, 600
    m = sum(-(-x // b) for x in range(p, p + g)) / g
    passes, stats = simulate([p] * 3000, [g] * 3000, num_blocks=blocks, block_tokens=b,
                             token_budget=10_000)
    mid = passes[len(passes) // 4:3 * len(passes) // 4]
    running = sum(len(x.decode) + len(x.prefill) for x in mid) / len(mid)
    assert running == pytest.approx(blocks / m, rel=0.05)
    assert stats.preemptions == 0


def test_bad_inputs():
    with pytest.raises(InfeasibleError, match="longest sequence"):
        ContinuousScheduler([100], [50], num_blocks=3, block_tokens=16, token_budget=64)
    with pytest.raises(WorkloadError):
        ContinuousScheduler([1, 2], [3], num_blocks=10, block_tokens=4, token_budget=8)
    with pytest.raises(WorkloadError):
        ContinuousScheduler([0], [3], num_blocks=10, block_tokens=4, token_budget=8)
    with pytest.raises(WorkloadError):
        ContinuousScheduler([1], [3], num_blocks=10, block_tokens=4, token_budget=8,
                            lookahead=-1)
