"""CPU decode attention kernels against a naive reference (K/V expanded per query head, fp64)."""

from __future__ import annotations

import os
import shutil
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from executor.kernels import (  # noqa: E402
    cpu_decode_attention,
    cpu_decode_attention_paged,
    cpu_decode_attention_table,
    paged_attention_cpp,
    paged_attention_extension,
    paged_attention_torch,
)


def cpp_kernel(*args, **kwargs):
    """The compiled kernel; skipped only where this machine has no C++ compiler (a failed build
    with a compiler fails the test)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the C++ CPU attention kernel cannot be built here")
    extension = paged_attention_extension()
    if extension is None:
        pytest.fail("the C++ CPU attention kernel did not build (see the log)")
    return paged_attention_cpp(extension, *args, **kwargs)


PAGED = {"torch": paged_attention_torch, "cpp": cpp_kernel}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    out = []
    for b, n in enumerate(lens):
        kb = k[b, :, :n].double().repeat_interleave(group, dim=0)
        vb = v[b, :, :n].double().repeat_interleave(group, dim=0)
        p = torch.softmax(q[b].double()[:, None, :] @ kb.transpose(-1, -2) / q.shape[-1] ** 0.5,
                          dim=-1)
        out.append((p @ vb)[:, 0])
    return torch.stack(out)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: 8 mantissa bits, |out| <= max|v| ~ 3


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 5), kv_heads=st.integers(1, 3), group=st.integers(1, 4),
       seq=st.integers(1, 40), head_dim=st.sampled_from([8, 16]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_dense_matches_reference(batch, kv_heads, group, seq, head_dim, dtype, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, generator=g).to(dtype) for _ in "kv")
    out = cpu_decode_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, [seq] * batch),
                               atol=TOL[dtype], rtol=TOL[dtype])


def to_blocks(x: torch.Tensor, block: int, lens: list[int] | None = None) -> list[torch.Tensor]:
    """[B, Hkv, S, D] -> per block j the [rows_j, Hkv, T, D] tensor of the sequences reaching it
    (all of them without `lens`), as the KV cache stores them."""
    b, h, s, d = x.shape
    lens = lens or [s] * b
    return [x[:sum(1 for n in lens if n > j * block), :, j * block:(j + 1) * block].contiguous()
            for j in range(-(-max(lens) // block))]


@pytest.mark.parametrize("kernel", PAGED)
@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(1, 80), min_size=1, max_size=6), block=st.sampled_from([4, 16]),
       group=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 48, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_paged_matches_reference(kernel, lens, block, group, head_dim, dtype, seed) -> None:
    lens = sorted(lens, reverse=True)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), 2 * group, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(len(lens), 2, 80, head_dim, generator=g).to(dtype) for _ in "kv")
    out = PAGED[kernel](q, to_blocks(k, block, lens), to_blocks(v, block, lens), lens)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, lens), atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("kernel", PAGED)
def test_paged_ignores_positions_past_each_length(kernel) -> None:
    q, k, v = torch.randn(2, 2, 4), torch.randn(2, 1, 12, 4), torch.randn(2, 1, 12, 4)
    before = PAGED[kernel](q, to_blocks(k, 4), to_blocks(v, 4), [7, 3])
    k[1, :, 3:], v[1, :, 3:], k[0, :, 7:] = 1e4, 1e4, -1e4
    torch.testing.assert_close(PAGED[kernel](q, to_blocks(k, 4), to_blocks(v, 4), [7, 3]),
                               before)


@pytest.mark.parametrize("kernel", PAGED)
def test_paged_needs_non_increasing_lengths(kernel) -> None:
    q, k = torch.randn(2, 2, 4), [torch.randn(2, 1, 4, 4)] * 2
    with pytest.raises(ValueError, match="non-increasing"):
        PAGED[kernel](q, k, k, [3, 7])


def test_cpp_kernel_rejects_a_block_that_does_not_hold_a_sequence() -> None:
    q = torch.randn(2, 2, 4)
    blocks = [torch.randn(2, 1, 4, 4), torch.randn(1, 1, 4, 4)]  # block 1 holds sequence 0 only
    with pytest.raises(RuntimeError, match="does not hold it"):
        cpp_kernel(q, blocks, blocks, [8, 8])


def test_dispatch_follows_the_environment(monkeypatch) -> None:
    """MOE_LIGHTNING_CPU_KERNEL=torch forces the torch ops; a bad value is an error."""
    q, k = torch.randn(1, 2, 4), [torch.randn(1, 1, 4, 4)]
    try:
        monkeypatch.setenv("MOE_LIGHTNING_CPU_KERNEL", "torch")
        paged_attention_extension.cache_clear()
        assert paged_attention_extension() is None
        torch.testing.assert_close(cpu_decode_attention_paged(q, k, k, [3]),
                                   paged_attention_torch(q, k, k, [3]))
        monkeypatch.setenv("MOE_LIGHTNING_CPU_KERNEL", "fast")
        paged_attention_extension.cache_clear()
        with pytest.raises(ValueError, match="auto, cpp or torch"):
            paged_attention_extension()
    finally:
        paged_attention_extension.cache_clear()


def test_head_dims_over_the_cpp_limit_use_the_torch_ops() -> None:
    q, k = torch.randn(2, 2, 264), torch.randn(2, 1, 4, 264)
    torch.testing.assert_close(cpu_decode_attention_paged(q, [k], [k], [4, 3]).double(),
                               reference(q, k, k, [4, 3]), atol=1e-5, rtol=1e-5)


def to_pool(k: torch.Tensor, v: torch.Tensor, block: int, lens: list[int], seed: int
            ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """[B, Hkv, S, D] -> a shuffled pool [N, Hkv, T, D] of every sequence's blocks (plus spare
    blocks of noise) and each sequence's block table, as the continuous scheduler keeps them."""
    b, h, _, d = k.shape
    needed = [-(-n // block) for n in lens]
    spare = 3
    order = torch.randperm(sum(needed) + spare, generator=torch.Generator().manual_seed(seed))
    k_pool, v_pool = (torch.randn(len(order), h, block, d).to(k.dtype) for _ in "kv")
    tables, next_block = [], 0
    for i, n in enumerate(needed):
        tables.append([int(order[next_block + j]) for j in range(n)])
        for j, slot in enumerate(tables[-1]):
            k_pool[slot] = k[i, :, j * block:(j + 1) * block]
            v_pool[slot] = v[i, :, j * block:(j + 1) * block]
        next_block += n
    return k_pool, v_pool, tables


@pytest.mark.parametrize("kernel", ["torch", "cpp"])
@settings(max_examples=20, deadline=None)
@given(lens=st.lists(st.integers(1, 80), min_size=1, max_size=6), block=st.sampled_from([4, 16]),
       group=st.sampled_from([1, 4]), head_dim=st.sampled_from([8, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_block_table_attention_matches_reference(kernel, lens, block, group, head_dim, dtype,
                                                 seed) -> None:
    """The pool kernel (continuous scheduler) reads each sequence's blocks through its table."""
    lens = sorted(lens, reverse=True)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), 2 * group, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(len(lens), 2, 80, head_dim, generator=g).to(dtype) for _ in "kv")
    k_pool, v_pool, tables = to_pool(k, v, block, lens, seed)
    if kernel == "cpp":
        cpp_kernel(q[:1], [k_pool[:1]], [v_pool[:1]], [1])  # skip where no C++ compiler
    paged_attention_extension.cache_clear()
    try:
        with mock.patch.dict(os.environ, {"MOE_LIGHTNING_CPU_KERNEL": kernel}):
            out = cpu_decode_attention_table(q, k_pool, v_pool, tables, lens)
    finally:
        paged_attention_extension.cache_clear()
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, lens), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_block_table_attention_rejects_a_block_outside_the_pool() -> None:
    pool = torch.randn(2, 1, 4, 8)
    cpp_kernel(torch.randn(1, 2, 8), [pool[:1]], [pool[:1]], [1])  # skip where no C++ compiler
    with pytest.raises(RuntimeError, match="not in the pool"):
        cpu_decode_attention_table(torch.randn(1, 2, 8), pool, pool, [[0, 5]], [7])
