"""CPU decode attention: grouped-query attention of one new token per sequence over a CPU KV cache.

GQA is computed on grouped *views*: the n_q query heads are viewed as [n_kv, s, D] (s = n_q / n_kv,
MoE-Lens Eq. 1) so each KV head is read once for its s query heads; K and V are never expanded
with repeat_interleave (40x slower on the GPU machine, /work/shared/hardware/h100-machine.md).
torch's matmul runs on all intra-op threads. Scores and softmax are fp32; bf16 KV is read as bf16.

    scores = q K^T * scale,  p = softmax(scores),  out = p V          (per sequence, per head)

The paged kernel has two implementations of one contract: `paged_attention_torch` (torch ops,
one pair of batched matmuls per KV block) and a C++ kernel (csrc/paged_attention.cpp: one pass
over each (sequence, KV head)'s blocks with a per-block softmax rescale, explicitly vectorized,
each thread streaming a contiguous range of the blocks), built on first use by
torch.utils.cpp_extension. On the H200 host (16 threads, benchmarks/results/h200_2026-11-30b/)
the C++ kernel reads 71-100 GB/s of fp32 KV and 30-60 GB/s of bf16 KV (DRAM read: 96 and 80
GB/s); the torch ops 28-47 and 10-31 GB/s. `cpu_decode_attention_paged` uses the C++ kernel when
it builds (a C++ compiler and ninja) and the torch ops otherwise, for head dims over 256, or when
MOE_LIGHTNING_CPU_KERNEL=torch. `cpu_decode_attention_table` is the same over a block pool with
block tables (the continuous scheduler's cache).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: environment variable choosing the paged kernel: "auto" (C++ if it builds), "cpp", "torch"
KERNEL_ENV = "MOE_LIGHTNING_CPU_KERNEL"
#: the largest head dimension the C++ kernel takes (16 vectors of 16 fp32 lanes); larger ones use
#: the torch ops
CPP_MAX_HEAD_DIM = 256
#: compiler flags: vectorize the fp32 reductions (reassociation) without assuming finite math
#: (the running max starts at -inf)
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math",
             "-fno-signed-zeros", "-fno-trapping-math"]


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Decode attention for a dense batch of equal-length contexts.

    q: [B, Hq, D]; k, v: [B, Hkv, S, D] (fp32 or bf16, any strides with a unit last stride);
    returns [B, Hq, D] in q's dtype. `scale` defaults to 1/sqrt(D)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q_grouped = q.view(batch, num_kv_heads, group, head_dim).to(k.dtype)
    scores = torch.matmul(q_grouped, k.transpose(-1, -2)).float() * scale   # [B, Hkv, s, S]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)                                             # [B, Hkv, s, D]
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


@functools.cache
def paged_attention_extension() -> object | None:
    """The compiled paged kernel (built once per machine into torch's extension cache), or None
    when MOE_LIGHTNING_CPU_KERNEL=torch or it cannot be built (logged once). With
    MOE_LIGHTNING_CPU_KERNEL=cpp a failed build raises."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "cpp", "torch"):
        raise ValueError(f"{KERNEL_ENV} must be auto, cpp or torch, got {choice!r}")
    if choice == "torch":
        return None
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    source = Path(__file__).with_name("csrc") / "paged_attention.cpp"
    try:
        return load(name="moe_lightning_paged_attention", sources=[str(source)],
                    extra_cflags=CXX_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back to torch ops
        if choice == "cpp":
            raise
        log.warning("C++ CPU attention kernel not built (%s); using torch ops",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def _put_ninja_on_path() -> None:
    """torch builds with the `ninja` on PATH; the pip package (a dependency of the exec extra)
    installs one next to the interpreter, which is not on PATH unless the venv is activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def paged_kernel_name() -> str:
    """Which paged kernel `cpu_decode_attention_paged` runs here: 'cpp' or 'torch'."""
    return "torch" if paged_attention_extension() is None else "cpp"


def cpu_decode_attention_paged(q: torch.Tensor, k_blocks: Sequence[torch.Tensor],
                               v_blocks: Sequence[torch.Tensor], context_lens: list[int],
                               scale: float | None = None) -> torch.Tensor:
    """Decode attention over ragged contexts stored in token blocks (contract below), by the
    C++ kernel where it is built, else by `paged_attention_torch`."""
    extension = paged_attention_extension()
    if extension is None or q.shape[-1] > CPP_MAX_HEAD_DIM:
        return paged_attention_torch(q, k_blocks, v_blocks, context_lens, scale)
    return paged_attention_cpp(extension, q, k_blocks, v_blocks, context_lens, scale)


def paged_attention_cpp(extension: object, q: torch.Tensor, k_blocks: Sequence[torch.Tensor],
                        v_blocks: Sequence[torch.Tensor], context_lens: list[int],
                        scale: float | None = None) -> torch.Tensor:
    """`paged_attention_torch`'s contract, by the compiled kernel (fp32 q and output inside)."""
    return _run_cpp(extension.paged_decode_attention,  # type: ignore[attr-defined]
                    q, [b.contiguous() for b in k_blocks], [b.contiguous() for b in v_blocks],
                    context_lens=context_lens, scale=scale)


def _run_cpp(entry: Any, q: torch.Tensor, *blocks: Any, context_lens: list[int],
             scale: float | None) -> torch.Tensor:
    """A compiled entry point on fp32 q (output in q's dtype); lengths checked, scale 1/sqrt(D)
    by default."""
    _check_non_increasing(context_lens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = entry(q.float().contiguous(), *blocks, torch.tensor(context_lens, dtype=torch.int64),
                scale)
    return out.to(q.dtype)


def cpu_decode_attention_table(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               tables: Sequence[Sequence[int]], context_lens: list[int],
                               scale: float | None = None) -> torch.Tensor:
    """Decode attention over ragged contexts in a block pool (the continuous scheduler's cache):
    k_pool, v_pool [N, Hkv, T, D]; block j of sequence b is pool block tables[b][j];
    `context_lens` non-increasing. The C++ kernel reads the blocks where they lie; the torch ops
    (`paged_attention_torch`) need them gathered into per-block tensors first, a copy of the
    whole context."""
    _check_non_increasing(context_lens)
    extension = paged_attention_extension()
    if extension is None or q.shape[-1] > CPP_MAX_HEAD_DIM:
        k_blocks, v_blocks = gather_blocks(k_pool, v_pool, tables, context_lens)
        return paged_attention_torch(q, k_blocks, v_blocks, context_lens, scale)
    needed = [-(-n // k_pool.shape[2]) for n in context_lens]
    table = torch.tensor([list(t[:k]) + [0] * (needed[0] - k)
                          for t, k in zip(tables, needed, strict=True)], dtype=torch.int64)
    return _run_cpp(extension.paged_decode_attention_table,  # type: ignore[attr-defined]
                    q, k_pool.contiguous(), v_pool.contiguous(), table,
                    context_lens=context_lens, scale=scale)


def gather_blocks(k_pool: torch.Tensor, v_pool: torch.Tensor, tables: Sequence[Sequence[int]],
                  context_lens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Block j of the sequences that reach it, copied out of the pool (`index_select`) into
    `paged_attention_torch`'s layout (context_lens non-increasing)."""
    block_tokens = k_pool.shape[2]
    index = [torch.tensor([t[j] for t, n in zip(tables, context_lens, strict=True)
                           if n > j * block_tokens])
             for j in range(-(-context_lens[0] // block_tokens))]
    k_blocks, v_blocks = ([pool.index_select(0, i) for i in index] for pool in (k_pool, v_pool))
    return k_blocks, v_blocks


def _check_non_increasing(context_lens: list[int]) -> None:
    if any(a < b for a, b in zip(context_lens, context_lens[1:], strict=False)):
        raise ValueError("context_lens must be non-increasing")


def paged_attention_torch(q: torch.Tensor, k_blocks: Sequence[torch.Tensor],
                          v_blocks: Sequence[torch.Tensor], context_lens: list[int],
                          scale: float | None = None) -> torch.Tensor:
    """Decode attention over ragged contexts stored in token blocks, without padding the reads.

    q: [B, Hq, D]; k_blocks[j], v_blocks[j]: [rows_j, Hkv, T, D], positions j*T..(j+1)*T-1 of
    the first rows_j sequences (contiguous, so each block is one matmul on torch's fast path).
    Sequence b's first `context_lens[b]` tokens are valid and `context_lens` is non-increasing
    (the engine orders sequences by length), so block j is needed exactly by the prefix of
    sequences longer than j*T, and only that prefix is read: at most T - 1 positions per sequence
    beyond its length, which are masked. Softmax runs jointly over (block, position). Returns
    [B, Hq, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_tokens = k_blocks[0].shape[1], k_blocks[0].shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    _check_non_increasing(context_lens)
    num_blocks = -(-context_lens[0] // block_tokens)
    lens = torch.tensor(context_lens)
    active = [sum(1 for n in context_lens if n > j * block_tokens) for j in range(num_blocks)]
    if any(k_blocks[j].shape[0] < rows for j, rows in enumerate(active)):
        raise ValueError("a KV block holds fewer sequences than need it")
    q_grouped = q.view(batch, num_kv_heads, group, head_dim).to(k_blocks[0].dtype)
    scores = torch.full((num_blocks, batch, num_kv_heads, group, block_tokens), float("-inf"))
    for j, rows in enumerate(active):
        scores[j, :rows] = torch.matmul(q_grouped[:rows], k_blocks[j][:rows].transpose(-1, -2))
    positions = torch.arange(num_blocks * block_tokens).view(num_blocks, 1, block_tokens)
    past_end = (positions >= lens.view(1, batch, 1))[:, :, None, None, :]
    scores = scores.masked_fill_(past_end, float("-inf")).mul_(scale)
    scores = scores.sub_(scores.amax(dim=(0, 4), keepdim=True)).exp_()
    probs = scores.div_(scores.sum(dim=(0, 4), keepdim=True)).to(v_blocks[0].dtype)
    out = torch.zeros(batch, num_kv_heads, group, head_dim)
    for j, rows in enumerate(active):
        out[:rows] += torch.matmul(probs[j, :rows], v_blocks[j][:rows]).float()
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
