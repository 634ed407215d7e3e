"""Next-token sampling: greedy (temperature 0) or temperature + nucleus (top-p) with a seeded
generator, on whichever device holds the logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hrm.errors import HRMError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise HRMError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got "
                           f"temperature={self.temperature}, top_p={self.top_p}")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
           ) -> torch.Tensor:
    """logits [n, V] -> token ids [n]. Top-p keeps the smallest set of most likely tokens whose
    probability reaches top_p (the most likely token is always kept)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
