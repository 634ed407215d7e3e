"""Workload: how many sequences, how long their prompts are, how many tokens each generates.

Besides fixed-length workloads, three seeded synthetic generators mimic the data sets of the
MoE-Lightning and MoE-Lens evaluations (lengths only; token ids are irrelevant to throughput):

| generator | prompt tokens (mean / max)   | generated tokens            | after            |
|-----------|------------------------------|-----------------------------|------------------|
| mtbench   | lognormal, mean 98, <= 450   | fixed (32/64/128/256)       | MTBench          |
| rag       | lognormal, mean 926, <= 1843 | fixed (128)                 | MoE-Lens RAG set |
| reasoning | lognormal, mean 128, <= 410  | lognormal, mean 500, <= 1024| MoE-Lens AIME set|
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hrm.errors import WorkloadError


@dataclass(frozen=True)
class Workload:
    """An offline batch job. `prompt_lens`, when given, is the per-sequence distribution and
    `prompt_len` its mean; otherwise every prompt has `prompt_len` tokens."""

    num_seqs: int
    prompt_len: int
    gen_len: int
    prompt_lens: tuple[int, ...] | None = None
    name: str = ""
    #: per-sequence generation budgets (continuous scheduling); `gen_len` is then their maximum
    gen_lens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("num_seqs", "prompt_len", "gen_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise WorkloadError(f"workload {field} must be a positive integer, got {value!r}")
        for field in ("prompt_lens", "gen_lens"):
            lens = getattr(self, field)
            if lens is not None and (len(lens) != self.num_seqs or any(x <= 0 for x in lens)):
                raise WorkloadError(f"{field} must hold one positive length per sequence")
        if self.gen_lens is not None and max(self.gen_lens) != self.gen_len:
            raise WorkloadError("gen_len must equal max(gen_lens)")

    @classmethod
    def from_lens(cls, prompt_lens: list[int], gen_len: int | list[int],
                  name: str = "") -> Workload:
        """A workload whose prompts have the given lengths (tokens); `gen_len` is one budget for
        all sequences or one per sequence."""
        if not prompt_lens:
            raise WorkloadError("a workload needs at least one prompt")
        gen_lens = None if isinstance(gen_len, int) else tuple(int(g) for g in gen_len)
        return cls(num_seqs=len(prompt_lens), prompt_len=round(statistics.fmean(prompt_lens)),
                   gen_len=max(gen_lens) if gen_lens else gen_len,
                   prompt_lens=tuple(int(p) for p in prompt_lens), name=name, gen_lens=gen_lens)

    @property
    def mean_gen_len(self) -> float:
        return statistics.fmean(self.gen_lens) if self.gen_lens else float(self.gen_len)

    @property
    def max_prompt_len(self) -> int:
        return max(self.prompt_lens) if self.prompt_lens else self.prompt_len

    @property
    def max_seq_len(self) -> int:
        """Longest context any sequence reaches (tokens): the KV cache is sized for it."""
        return self.max_prompt_len + self.gen_len

    @cached_property
    def prompt_lens_longest_first(self) -> tuple[int, ...]:
        """Every sequence's prompt length (tokens), longest first: the order a static batch runs
        them in (executor.engine.Engine.generate)."""
        return tuple(sorted(self.prompt_lens, reverse=True)) if self.prompt_lens \
            else (self.prompt_len,) * self.num_seqs

    def slot_capacities(self, batch_size: int) -> list[int]:
        """Tokens each KV slot of a static batch must hold: sequences run longest prompt first,
        in rounds of `batch_size`, so slot r holds at most the r-th longest prompt + gen_len. The
        one sizing rule of the cost model's KV term and the executor's memory plan."""
        return [p + self.gen_len for p in self.prompt_lens_longest_first[:batch_size]]

    def prefill_tokens_per_micro_batch(self, micro_batch_size: int) -> int:
        """Most prompt tokens any prefill micro-batch holds: with prompts longest first, the
        first `micro_batch_size` of them."""
        return sum(self.prompt_lens_longest_first[:micro_batch_size])

    @property
    def mean_decode_context(self) -> float:
        """Average context length over the decode steps, s + n/2 (FlexGen's cost model)."""
        return self.prompt_len + self.gen_len / 2

    def padded_decode_context(self, micro_batch_size: int) -> float:
        """Average context over the decode steps of the dense KV copy that GPU attention reads
        (tokens): a micro-batch's rows are padded to its longest sequence (KVCache.gather_host),
        the first of each `micro_batch_size` prompts longest first, so P_m + n/2 averaged over
        the sequences (each padded to its micro-batch's P_m). (H200 machine, 2026-12-03: with
        it the model's gathered KV bytes of two layerwise runs came within 2% of the executor's
        counts, against 48% and 29% short with s + n/2: benchmarks/results/h200_2026-12-03b/
        README.md.)"""
        lens = self.prompt_lens_longest_first
        firsts = lens[::micro_batch_size]   # one per micro-batch; the last may hold fewer rows
        last_rows = len(lens) - micro_batch_size * (len(firsts) - 1)
        padded = micro_batch_size * sum(firsts) - (micro_batch_size - last_rows) * firsts[-1]
        return padded / len(lens) + self.gen_len / 2

    def generated_tokens(self) -> int:
        return sum(self.gen_lens) if self.gen_lens else self.num_seqs * self.gen_len


def _lognormal_lens(rng: np.random.Generator, n: int, mean: float, sigma: float, lo: int,
                    hi: int) -> list[int]:
    """n lengths from a lognormal with the given mean (before clipping to [lo, hi]) and shape."""
    mu = math.log(mean) - sigma**2 / 2
    return [int(x) for x in np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi)]


#: distribution parameters of the synthetic generators: (mean, sigma, min, max) in tokens
MTBENCH_PROMPT = (98.0, 0.75, 8, 450)
RAG_PROMPT = (926.0, 0.35, 128, 1843)
REASONING_PROMPT = (128.0, 0.5, 16, 410)
REASONING_GEN = (500.0, 0.4, 64, 1024)


def synthetic_workload(kind: str, num_seqs: int, gen_len: int | None = None,
                       seed: int = 0) -> Workload:
    """A seeded synthetic workload: 'mtbench' (gen_len default 128), 'rag' (default 128) or
    'reasoning' (per-sequence generation lengths; `gen_len` caps them if given)."""
    if num_seqs <= 0:
        raise WorkloadError(f"num_seqs must be positive, got {num_seqs}")
    rng = np.random.default_rng(seed)
    if kind == "mtbench":
        return Workload.from_lens(_lognormal_lens(rng, num_seqs, *MTBENCH_PROMPT),
                                  gen_len or 128, name="mtbench")
    if kind == "rag":
        return Workload.from_lens(_lognormal_lens(rng, num_seqs, *RAG_PROMPT), gen_len or 128,
                                  name="rag")
    if kind == "reasoning":
        prompts = _lognormal_lens(rng, num_seqs, *REASONING_PROMPT)
        gens = _lognormal_lens(rng, num_seqs, *REASONING_GEN)
        if gen_len:
            gens = [min(g, gen_len) for g in gens]
        return Workload.from_lens(prompts, gens, name="reasoning")
    raise WorkloadError(f"unknown synthetic workload {kind!r}; expected mtbench, rag or reasoning")
