"""Chunked prefill attention over the paged cache (kernels/prefill_attention.py) against the reference."""

from __future__ import annotations

import pytest
import torch

import kernels.prefill_attention as prefill_module
from kernels import reference
from kernels.prefill_attention import prefill_attention

DTYPES = [torch.float32, torch.bfloat16]


def _paged(rng, query_lens, context_lens, q_heads, kv_heads, head_dim, dtype, block_size=16):
    """Chunks of ``query_lens`` queries whose contexts (these included) hold ``context_lens`` tokens."""
    batch = len(context_lens)
    max_blocks = max(-(-n // block_size) for n in context_lens)
    num_blocks = batch * max_blocks + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=rng).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=rng).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=rng)[: batch * max_blocks].view(batch, max_blocks).int()
    cu_query_lens = torch.tensor([0, *query_lens]).cumsum(0).int()  # [B + 1]
    q = torch.randn(int(cu_query_lens[-1]), q_heads, head_dim, generator=rng).to(dtype)  # [T, Hq, D]
    return q, k_cache, v_cache, block_tables, cu_query_lens, torch.tensor(context_lens, dtype=torch.int32)


CASES = {
    # name: (query lengths, context lengths, Hq, Hk, D)
    "one-prompt": ([37], [37], 9, 3, 64),
    "chunked-mixed": ([17, 1, 40, 5], [50, 1, 40, 100], 9, 3, 64),
    "mha-d80": ([20, 3], [20, 35], 2, 2, 80),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, rng, poison, assert_close):
    query_lens, context_lens, q_heads, kv_heads, head_dim = CASES[case]
    args = _paged(rng, query_lens, context_lens, q_heads, kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    poison(prefill_module)
    out = prefill_attention(*args, scale, max(query_lens))
    assert_close(out, reference.prefill_attention(*args, scale, max(query_lens)))


def test_small_tiles_cross_many_blocks(rng, poison, assert_close):
    # 16-row tiles: several query tiles per chunk, a causal diagonal inside each, an empty chunk.
    q, k_cache, v_cache, block_tables, cu, ctx = _paged(rng, [40, 0, 23], [70, 9, 23], 6, 2, 64, torch.bfloat16)
    args = (q, k_cache, v_cache, block_tables.long(), cu.long(), ctx.long())  # int64 indices too
    poison(prefill_module)
    out = prefill_attention(*args, 0.125, 40, block_m=16, block_n=16)
    assert_close(out, reference.prefill_attention(*args, 0.125, 40))


def _valid_args():
    return dict(
        q=torch.randn(5, 4, 16), k_cache=torch.zeros(3, 4, 2, 16), v_cache=torch.zeros(3, 4, 2, 16),
        block_tables=torch.zeros(2, 3, dtype=torch.int32), cu_query_lens=torch.tensor([0, 2, 5]),
        context_lens=torch.tensor([2, 3]), scale=0.25, max_query_len=3,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.randn(5, 3, 16)), r"query heads \(3\) must be a multiple of KV heads \(2\)"),
        (dict(k_cache=torch.zeros(3, 4, 2, 8)), r"k_cache must have shape \(3, 4, 2, 16\)"),
        (dict(cu_query_lens=torch.tensor([0, 5])), r"cu_query_lens must have shape \(3,\)"),
        (dict(context_lens=torch.tensor([2.0, 3.0])), "context_lens must be one of int32, int64"),
        (dict(q=torch.randn(5, 4, 16, dtype=torch.bfloat16)), "share one dtype"),
        (dict(max_query_len=6), r"max_query_len must be in \[0, 5\]"),
        (dict(block_m=8), "block_m must be a power of two >= 16"),
        (dict(k_cache=torch.zeros(3, 4, 2, 16, device="meta")), "on one device"),
    ],
)
def test_launcher_rejects_bad_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        prefill_attention(**(_valid_args() | change))
