"""Continuous (KV-capacity-aware) scheduling of weight passes, MoE-Lens style. Pure Python.

Every weight pass (all layers once) carries one token for each scheduled sequence:

  1. decode first: every running sequence decodes one token. A sequence whose next KV entry
     starts a new block gets one; when no block is free, the newest running sequence is
     preempted (all its blocks freed, re-queued for re-prefill, never dropped) until it fits;
  2. then prefill: waiting sequences, lowest id first, are admitted while the pass stays within
     the token budget and the KV blocks the running set is projected to hold, admitted ones
     included, stay within the cache for the next `lookahead` passes; with `pace`, also while
     the admission credit lasts: each pass adds N_blocks block-passes (capped at N_blocks), each
     admission spends the block-passes of its projected life, so admissions arrive at the rate
     the cache sustains (Little's law) instead of in one synchronized cohort that finishes, and
     is replaced, all at once. A (re-)prefill feeds prompt + tokens generated so far and samples
     the next token. A lone sequence is always admitted (progress), and the first prefill of a
     pass may exceed the budget while fewer than n_tok sequences decode;
  3. after the pass, sequences that reached their generation budget (or EOS) finish and free
     their blocks at once.

KV is counted in blocks of `block_tokens` tokens: a sequence with x tokens in the cache holds
ceil(x / b) blocks, so one that was fed f tokens holds ceil((f + j) / b) blocks j passes later.
Projecting over a sequence's whole remaining life (lookahead=None, the default) never needs a
preemption when sequences stop at their budgets (EOS only frees blocks earlier), and loses no
capacity in steady state, where the projected occupancy of the running set only falls; a short
lookahead admits more at the start (lookahead=0 is vLLM's greedy admission) and preempts when
blocks run out. Everything is deterministic: the same lengths give the same passes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from hrm.continuous import PassShape
from hrm.errors import InfeasibleError, WorkloadError


def blocks_for(tokens: int, block_tokens: int) -> int:
    """ceil(tokens / b)."""
    return -(-tokens // block_tokens)


@dataclass
class SeqState:
    """One sequence: `generated` tokens sampled so far, `cached` tokens whose KV is stored."""

    seq_id: int
    prompt_len: int
    gen_len: int
    generated: int = 0
    cached: int = 0
    blocks: int = 0
    preemptions: int = 0
    #: its projected blocks: fed `projected_feed` tokens at pass `projected_from`, for
    #: `projected_passes` passes
    projected_from: int = 0
    projected_feed: int = 0
    projected_passes: int = 0

    @property
    def context(self) -> int:
        """Tokens the sequence has: prompt + generated."""
        return self.prompt_len + self.generated


@dataclass(frozen=True)
class ScheduledPass:
    """One weight pass: the sequences decoding one token (with their context before it) and
    those (re-)prefilled (with the tokens fed), and the sequences preempted to make room."""

    decode: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    prefill: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    preempted: tuple[int, ...] = ()

    def shape(self) -> PassShape:
        """What the cost model needs of this pass (hrm.continuous.pass_time_s)."""
        return PassShape(decode_seqs=len(self.decode),
                         decode_context_tokens=float(sum(self.decode_contexts)),
                         prefill_seqs=len(self.prefill),
                         prefill_tokens=float(sum(self.prefill_tokens)))


@dataclass
class SchedulerStats:
    passes: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0      # generated tokens fed again by re-prefills
    peak_blocks: int = 0
    peak_running: int = 0


@dataclass
class ContinuousScheduler:
    """Admission, block allocation, preemption and finishing over a fixed set of sequences.

    Use: `p = s.next_pass()`, run it, `s.complete(p, eos=...)`; repeat until `s.done`."""

    prompt_lens: list[int]
    gen_lens: list[int]
    num_blocks: int
    block_tokens: int
    token_budget: int
    #: passes of projected KV growth that admission must fit (None: the whole remaining life)
    lookahead: int | None = None
    #: pace admissions at the rate the cache sustains (Little's law, below)
    pace: bool = True
    seqs: list[SeqState] = field(init=False)
    running: list[int] = field(init=False)       # admission order: newest last
    waiting: list[int] = field(init=False)       # heap of ids
    finished: set[int] = field(init=False)
    free_blocks: int = field(init=False)
    stats: SchedulerStats = field(init=False)
    now: int = field(init=False)                 # index of the next pass
    projected: np.ndarray = field(init=False)    # blocks held at each pass, as projected
    credit: float = field(init=False)            # block-passes admissions may still use

    def __post_init__(self) -> None:
        if len(self.prompt_lens) != len(self.gen_lens) or not self.prompt_lens:
            raise WorkloadError("the scheduler needs one prompt and one generation length per "
                                "sequence, and at least one sequence")
        if min(self.prompt_lens) <= 0 or min(self.gen_lens) <= 0:
            raise WorkloadError("prompt and generation lengths must be positive")
        if self.block_tokens <= 0 or self.token_budget <= 0:
            raise WorkloadError("block_tokens and token_budget must be positive")
        if self.lookahead is not None and self.lookahead < 0:
            raise WorkloadError(f"lookahead must be >= 0 passes, got {self.lookahead}")
        longest = max(p + g for p, g in zip(self.prompt_lens, self.gen_lens, strict=True))
        if blocks_for(longest, self.block_tokens) > self.num_blocks:
            raise InfeasibleError(
                f"the KV cache holds {self.num_blocks} blocks of {self.block_tokens} tokens, "
                f"but the longest sequence ({longest} tokens) alone needs "
                f"{blocks_for(longest, self.block_tokens)}; raise --cpu-mem or shorten it")
        self.seqs = [SeqState(i, p, g) for i, (p, g)
                     in enumerate(zip(self.prompt_lens, self.gen_lens, strict=True))]
        self.running, self.waiting = [], list(range(len(self.seqs)))
        self.finished = set()
        self.free_blocks = self.num_blocks
        self.stats = SchedulerStats()
        self.now = 0
        self.credit = 0.0
        self.projected = np.zeros(max(self.gen_lens) + 1, dtype=np.int64)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.seqs)

    # ---- block accounting ------------------------------------------------------------------
    def _grow(self, seq: SeqState, tokens: int) -> None:
        need = blocks_for(tokens, self.block_tokens) - seq.blocks
        self.free_blocks -= need
        seq.blocks += need
        seq.cached = tokens

    def _free(self, seq: SeqState) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = seq.cached = 0

    def _needs_block(self, seq: SeqState) -> bool:
        """Whether the sequence's next KV entry (position `cached`) starts a new block."""
        return seq.cached % self.block_tokens == 0

    # ---- projected occupancy ---------------------------------------------------------------
    def _profile(self, feed: int, first: int, last: int) -> np.ndarray:
        """Blocks held j = first..last-1 passes after being fed `feed` tokens."""
        return (feed + np.arange(first, last) + self.block_tokens - 1) // self.block_tokens

    def _window(self, passes: int) -> np.ndarray:
        """The projection of the next `passes` passes (a view; the array grows as needed)."""
        end = self.now + passes
        if end > len(self.projected):
            grown = np.zeros(max(end, 2 * len(self.projected)), dtype=np.int64)
            grown[:len(self.projected)] = self.projected
            self.projected = grown
        return self.projected[self.now:end]

    def _project(self, seq: SeqState, feed: int) -> None:
        passes = seq.gen_len - seq.generated
        self._window(passes)[:] += self._profile(feed, 0, passes)
        seq.projected_from, seq.projected_feed, seq.projected_passes = self.now, feed, passes

    def _unproject(self, seq: SeqState, from_pass: int) -> None:
        """Drop the sequence's projection from pass `from_pass` on (preempted or EOS)."""
        start, end = seq.projected_from, seq.projected_from + seq.projected_passes
        if from_pass < end:
            self.projected[from_pass:end] -= self._profile(
                seq.projected_feed, from_pass - start, end - start)
        seq.projected_passes = max(0, min(seq.projected_passes, from_pass - start))

    def _fits_projection(self, seq: SeqState, feed: int) -> bool:
        passes = seq.gen_len - seq.generated
        horizon = passes if self.lookahead is None else min(passes, self.lookahead + 1)
        window = self._window(horizon) + self._profile(feed, 0, horizon)
        return bool(np.all(window <= self.num_blocks))

    def _preempt_newest(self) -> int:
        victim = self.seqs[self.running.pop()]
        self._unproject(victim, self.now)
        self._free(victim)
        victim.preemptions += 1
        self.stats.preemptions += 1
        heapq.heappush(self.waiting, victim.seq_id)
        return victim.seq_id

    # ---- one pass --------------------------------------------------------------------------
    def next_pass(self) -> ScheduledPass:
        """Schedule the next weight pass (module docstring)."""
        if self.done:
            raise RuntimeError("every sequence has finished")
        preempted: list[int] = []
        decode: list[int] = []
        i = 0
        while i < len(self.running):    # victims are taken from the end, never behind i
            seq = self.seqs[self.running[i]]
            while self._needs_block(seq) and self.free_blocks == 0:
                preempted.append(self._preempt_newest())
            if preempted and preempted[-1] == seq.seq_id:   # it was the newest itself
                break
            self._grow(seq, seq.cached + 1)
            decode.append(seq.seq_id)
            i += 1
        contexts = [self.seqs[s].cached for s in decode]   # tokens attended, the new one too

        prefill: list[int] = []
        tokens: list[int] = []
        budget = self.token_budget - len(decode)
        self.credit = min(self.credit + self.num_blocks, float(self.num_blocks))
        while self.waiting:
            seq = self.seqs[self.waiting[0]]
            feed = seq.context            # prompt + generated so far (re-prefill recomputes)
            alone = not decode and not prefill   # nothing else runs: admit (progress)
            # the first prefill of a pass may exceed the budget, so a prompt longer than the
            # budget is not starved while sequences run (decode tokens stay within it)
            first = not prefill and len(decode) < self.token_budget
            if (self.pace and self.credit <= 0 and not alone) or \
                    (feed > budget and not first) or \
                    blocks_for(feed, self.block_tokens) > self.free_blocks or \
                    not self._fits_projection(seq, feed):
                break
            heapq.heappop(self.waiting)
            self._grow(seq, feed)
            self._project(seq, feed)
            self.stats.recomputed_tokens += seq.generated
            prefill.append(seq.seq_id)
            tokens.append(feed)
            budget -= feed
            self.credit -= self._profile(feed, 0, seq.gen_len - seq.generated).sum()
        self.running.extend(prefill)
        if not decode and not prefill:
            raise RuntimeError("scheduler made no progress (cannot happen when the longest "
                               "sequence fits the cache)")
        self.stats.passes += 1
        self.now += 1
        self.stats.peak_blocks = max(self.stats.peak_blocks, self.num_blocks - self.free_blocks)
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        return ScheduledPass(tuple(decode), tuple(contexts), tuple(prefill), tuple(tokens),
                             tuple(preempted))

    def complete(self, scheduled: ScheduledPass, eos: frozenset[int] = frozenset()) -> list[int]:
        """Every scheduled sequence got one token; those that reached their budget or are in
        `eos` finish and free their blocks. Returns the finished ids."""
        done = []
        for seq_id in (*scheduled.decode, *scheduled.prefill):
            seq = self.seqs[seq_id]
            seq.generated += 1
            if seq.generated >= seq.gen_len or seq_id in eos:
                done.append(seq_id)
        for seq_id in done:
            self._unproject(self.seqs[seq_id], self.now)   # EOS before the budget
            self._free(self.seqs[seq_id])
            self.finished.add(seq_id)
        if done:
            self.running = [s for s in self.running if s not in self.finished]
        return done


def simulate(prompt_lens: list[int], gen_lens: list[int], *, num_blocks: int,
             block_tokens: int, token_budget: int, lookahead: int | None = None,
             pace: bool = True) -> tuple[list[ScheduledPass], SchedulerStats]:
    """Dry run without a model (no EOS): every pass the scheduler would make."""
    sched = ContinuousScheduler(list(prompt_lens), list(gen_lens), num_blocks, block_tokens,
                                token_budget, lookahead, pace)
    passes = []
    while not sched.done:
        scheduled = sched.next_pass()
        sched.complete(scheduled)
        passes.append(scheduled)
    return passes, sched.stats
