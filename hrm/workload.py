"""Workload: how many sequences, how long their prompts are, how many tokens each generates."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        for field in ("num_seqs", "prompt_len", "gen_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise WorkloadError(f"workload {field} must be a positive integer, got {value!r}")
        if self.prompt_lens is not None:
            if len(self.prompt_lens) != self.num_seqs or any(p <= 0 for p in self.prompt_lens):
                raise WorkloadError("prompt_lens must hold one positive length per sequence")

    @classmethod
    def from_prompt_lens(cls, prompt_lens: list[int], gen_len: int, name: str = "") -> Workload:
        """A workload whose prompts have the given lengths (tokens)."""
        if not prompt_lens:
            raise WorkloadError("a workload needs at least one prompt")
        return cls(num_seqs=len(prompt_lens), prompt_len=round(statistics.fmean(prompt_lens)),
                   gen_len=gen_len, prompt_lens=tuple(int(p) for p in prompt_lens), name=name)

    @property
    def max_prompt_len(self) -> int:
        return max(self.prompt_lens) if self.prompt_lens else self.prompt_len

    @property
    def max_seq_len(self) -> int:
        """Longest context any sequence reaches (tokens): the KV cache is sized for it."""
        return self.max_prompt_len + self.gen_len

    @property
    def mean_decode_context(self) -> float:
        """Average context length over the decode steps, s + n/2 (FlexGen's cost model)."""
        return self.prompt_len + self.gen_len / 2

    def generated_tokens(self) -> int:
        return self.num_seqs * self.gen_len
