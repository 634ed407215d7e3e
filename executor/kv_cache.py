"""KV cache in token blocks, sized exactly to each sequence.

Slots are ordered by decreasing capacity (prompt length + gen_len; the engine sorts sequences
by prompt length), so the slots that reach block j (positions j*T..(j+1)*T-1, T = block_tokens)
are a prefix 0..rows_j-1. Per layer and block, K and V are one tensor [rows_j, n_kv, T, D]:
memory is sum_b ceil(cap_b / T) blocks, with no padding to the longest sequence, and block j
of a run of consecutive slots (a micro-batch) is one contiguous tensor, which CPU attention
reads with one matmul (executor/kernels.py). Capacity is checked up front against the memory the
caller grants, so a policy that does not fit fails with a clear error, not an out-of-memory
crash halfway through.

bytes = 2 (K, V) * l * T * n_kv * D * dtype_bytes * sum_b ceil(cap_b / T)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from executor.kernels import cpu_decode_attention_paged
from executor.schedule import index_tensor
from hrm.errors import InfeasibleError
from hrm.model import ModelSpec
from hrm.roofline import KV_BLOCK_TOKENS
from hrm.units import fmt_bytes

BLOCK_TOKENS = KV_BLOCK_TOKENS


def blocks_per_slot(capacities: list[int], block_tokens: int) -> list[int]:
    return [-(-c // block_tokens) for c in capacities]


def kv_cache_bytes(spec: ModelSpec, capacities: list[int], dtype: torch.dtype,
                   block_tokens: int = BLOCK_TOKENS) -> int:
    """Bytes of a cache for sequences of the given capacities (tokens), all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    blocks = sum(blocks_per_slot(capacities, block_tokens))
    return 2 * spec.num_layers * blocks * block_tokens * spec.num_kv_heads * spec.head_dim * elem


@dataclass
class KVCache:
    k: list[list[torch.Tensor]]  # [layer][block j] -> [rows_j, n_kv, T, D]
    v: list[list[torch.Tensor]]
    block_tokens: int
    #: per run of slots, the index tensors of its last `append` (`_append_index`)
    _appends: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def allocate(cls, spec: ModelSpec, capacities: list[int], dtype: torch.dtype,
                 device: torch.device, budget_bytes: float, where: str,
                 block_tokens: int = BLOCK_TOKENS) -> KVCache:
        """Zero-filled cache (masked positions must read finite values) for slots with
        non-increasing `capacities` (tokens); raises InfeasibleError naming the shortfall if it
        exceeds `budget_bytes` of `where` memory."""
        if any(a < b for a, b in zip(capacities, capacities[1:], strict=False)):
            raise ValueError("slot capacities must be non-increasing")
        need = kv_cache_bytes(spec, capacities, dtype, block_tokens)
        if need > budget_bytes:
            raise InfeasibleError(
                f"KV cache for {len(capacities)} sequences needs {fmt_bytes(need)} of {where} "
                f"memory but only {fmt_bytes(budget_bytes)} is left; lower batch_size or "
                f"gen_len, or raise the {where} memory limit")
        per_slot = blocks_per_slot(capacities, block_tokens)
        rows = [sum(1 for b in per_slot if b > j) for j in range(max(per_slot, default=0))]

        def layer() -> list[torch.Tensor]:
            return [torch.zeros(n, spec.num_kv_heads, block_tokens, spec.head_dim, dtype=dtype,
                                device=device) for n in rows]

        return cls([layer() for _ in range(spec.num_layers)],
                   [layer() for _ in range(spec.num_layers)], block_tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for blocks in self.k + self.v for t in blocks)

    def write_prompt(self, layer: int, slots: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, L, n_kv, D] of n equal-length prompts stored in `slots` at positions 0..L-1."""
        length, t = k.shape[1], self.block_tokens
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            new = new.to(cache[0].device, cache[0].dtype)
            for j, start in enumerate(range(0, length, t)):
                end = min(start + t, length)
                cache[j][slots, :, :end - start] = new[:, start:end].transpose(1, 2)

    def append(self, layer: int, slots: slice, positions: list[int], k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Store one new token per sequence: k, v [n, n_kv, D] at `positions` of `slots`, one
        indexed write per block the positions fall in."""
        device = self.k[layer][0].device
        for j, sel, rows, offsets in self._append_index(slots, positions, k.device, device):
            for cache, new in ((self.k[layer][j], k), (self.v[layer][j], v)):
                cache[rows, :, offsets] = new[sel].to(device, cache.dtype)

    def _append_index(self, slots: slice, positions: list[int], k_device: torch.device,
                      device: torch.device
                      ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per block j the positions fall in: (j, the rows of k, the cache rows, the offsets in
        the block) as index tensors. A step appends at the same positions in every layer, so
        the last ones of each run of slots are kept: built once per step, not per layer (the
        thread that appends, CPU attention's worker for a CPU cache, holds the GIL meanwhile)."""
        key = (tuple(positions), k_device, device)
        last = self._appends.get((slots.start, slots.stop))
        if last is not None and last[0] == key:
            return last[1]
        t, index = self.block_tokens, []
        for j in sorted({p // t for p in positions}):
            idx = [i for i, p in enumerate(positions) if p // t == j]
            index.append((j, index_tensor(idx, k_device),
                          index_tensor([slots.start + i for i in idx], device),
                          index_tensor([positions[i] % t for i in idx], device)))
        self._appends[(slots.start, slots.stop)] = (key, index)
        return index

    def blocks(self, layer: int, slots: slice, length: int
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per block covering positions 0..length-1, the views of `slots` that reach it."""
        n_blocks = -(-length // self.block_tokens)
        return tuple([b[slots.start:min(slots.stop, b.shape[0])] for b in cache[layer][:n_blocks]]
                     for cache in (self.k, self.v))

    def attend(self, layer: int, slots: slice, q: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """Decode attention of `slots`' new queries q [n, Hq, D] over their first `lens` cached
        positions (non-increasing), read in place from the blocks."""
        k_blocks, v_blocks = self.blocks(layer, slots, lens[0])
        return cpu_decode_attention_paged(q, k_blocks, v_blocks, lens)

    def gather_host(self, layer: int, slots: slice, length: int, pinned: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense [n, n_kv, n_blocks * T, D] copies of `slots`' blocks covering positions
        0..length-1, in this cache's memory (pinned where `pinned`, to cross the link); positions
        a sequence does not reach are zeros (they must be masked). Every row is copied to the
        last block: n * ceil(length / T) * T positions per tensor."""
        t, n = self.block_tokens, slots.stop - slots.start
        out = []
        for blocks in self.blocks(layer, slots, length):
            dense = torch.empty(n, blocks[0].shape[1], len(blocks) * t, blocks[0].shape[-1],
                                dtype=blocks[0].dtype, device=blocks[0].device,
                                pin_memory=pinned)
            for j, block in enumerate(blocks):
                dense[:block.shape[0], :, j * t:(j + 1) * t] = block
                dense[block.shape[0]:, :, j * t:(j + 1) * t] = 0
            out.append(dense)
        return out[0], out[1]

    def gather(self, layer: int, slots: slice, length: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """`gather_host` on `device`: for a cache already there (a GPU cache, or the CPU
        stand-in's), no copy. A CPU cache bound for a GPU goes through
        `gather_host(pinned=True)` and an asynchronous DMA instead (executor/engine.py
        `_gather_with_new_token`), which the trace times apart."""
        k, v = self.gather_host(layer, slots, length, pinned=False)
        return k.to(device), v.to(device)
