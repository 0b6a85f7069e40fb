"""Paged split-K decode attention (kernels/decode_attention.py) against reference.decode_attention."""

from __future__ import annotations

import pytest
import torch

import kernels.decode_attention as decode_module
from kernels import reference
from kernels.decode_attention import decode_attention

DTYPES = [torch.float32, torch.bfloat16]


def _paged(rng, context_lens, q_heads, kv_heads, head_dim, dtype, block_size=16, spare_blocks=3):
    """A cache pool with each request's blocks scattered through it, and q as a strided view."""
    batch = len(context_lens)
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1  # a spare column, as tables have
    num_blocks = batch * max_blocks + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=rng).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=rng).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=rng)[: batch * max_blocks].view(batch, max_blocks)
    fused = torch.randn(batch, q_heads + 2 * kv_heads, head_dim, generator=rng).to(dtype)
    q = fused[:, :q_heads]  # [B, Hq, D], batch stride (Hq + 2Hk) D like the model's qkv split
    return q, k_cache, v_cache, block_tables.int(), torch.tensor(context_lens, dtype=torch.int32)


CASES = {
    "one-row": ([37], 9, 3, 64),
    "ragged": ([1, 16, 17, 100, 63], 9, 3, 64),
    "mha-d80": ([5, 40], 4, 4, 80),
    "gqa-8": ([33, 70], 8, 1, 128),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_matches_reference(case, num_splits, dtype, rng, poison, assert_close):
    context_lens, q_heads, kv_heads, head_dim = CASES[case]
    q, k_cache, v_cache, block_tables, ctx = _paged(rng, context_lens, q_heads, kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    poison(decode_module)
    out = decode_attention(q, k_cache, v_cache, block_tables, ctx, scale, num_splits=num_splits, block_n=32)
    ref = reference.decode_attention(q, k_cache, v_cache, block_tables, ctx, scale)
    assert_close(out, ref)


def test_many_splits_long_context_and_default_tiles(rng, poison, assert_close):
    # More splits than a short row has tiles: its trailing splits are empty and must weigh nothing.
    q, k_cache, v_cache, block_tables, ctx = _paged(rng, [700, 3, 129], 9, 3, 64, torch.bfloat16)
    block_tables, ctx = block_tables.long(), ctx.long()  # int64 indices work as well as int32
    poison(decode_module)
    out = decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.125, num_splits=7)
    assert_close(out, reference.decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.125))


@pytest.mark.parametrize("block_n, num_warps, num_stages", [(16, 1, 1), (128, 8, 3)])
def test_tile_and_launch_knobs_leave_the_result_unchanged(block_n, num_warps, num_stages, rng, poison, assert_close):
    """The settings bench/gpu_kernels.py sweeps on a GPU: any of them gives the reference's answer."""
    q, k_cache, v_cache, block_tables, ctx = _paged(rng, [200, 9, 64], 9, 3, 64, torch.bfloat16)
    poison(decode_module)
    out = decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.125, num_splits=2, block_n=block_n,
                           num_warps=num_warps, num_stages=num_stages)
    assert_close(out, reference.decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.125))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_plain_attention_row_by_row(case, dtype, rng):
    """The reference itself (SDPA in fp32, grouped matrix products in bf16) against fp64 softmax
    attention written out for each row and head; error as the kernel tests measure it,
    ||out - expected|| / ||expected|| over the whole output."""
    context_lens, q_heads, kv_heads, head_dim = CASES[case]
    q, k_cache, v_cache, block_tables, ctx = _paged(rng, context_lens, q_heads, kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = reference.decode_attention(q, k_cache, v_cache, block_tables, ctx, scale)
    block_size, group = k_cache.shape[1], q_heads // kv_heads
    expected = torch.empty(out.shape, dtype=torch.float64)
    for b, length in enumerate(context_lens):
        slots = [int(block_tables[b, i // block_size]) * block_size + i % block_size for i in range(length)]
        keys = k_cache.flatten(0, 1)[slots].double()  # [S, Hk, D]
        values = v_cache.flatten(0, 1)[slots].double()
        for h in range(q_heads):
            weights = torch.softmax(keys[:, h // group] @ q[b, h].double() * scale, dim=0)  # [S]
            expected[b, h] = weights @ values[:, h // group]  # [D]
    error = (out.double() - expected).norm() / expected.norm()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), float(error)


def test_split_choice():
    choose = decode_module._choose_num_splits
    assert choose(programs=1 * 8, max_context=8192, sm_count=132) == 64  # batch 1: split the sequence
    assert choose(programs=1 * 8, max_context=100, sm_count=132) == 1  # too short to be worth a split
    assert choose(programs=256 * 8, max_context=8192, sm_count=132) == 1
    assert choose(programs=200, max_context=8192, sm_count=132) == 4  # 2.3 waves of 200 rounded up: 4
    # The fastest of 1-16 splits an H200 measured (docs/gpu_h200.md, run 4), context 2,048:
    # the default model (3 KV heads) at batch 1, 64, 256; LLaMA-3-8B (8 KV heads) at 1, 64, 256.
    measured = {(3, 16), (64 * 3, 4), (256 * 3, 1), (8, 16), (64 * 8, 1), (256 * 8, 1)}
    assert {(p, choose(programs=p, max_context=2048, sm_count=132)) for p, _ in measured} == measured


def _valid_args():
    return dict(
        q=torch.randn(2, 4, 16), k_cache=torch.zeros(3, 4, 2, 16), v_cache=torch.zeros(3, 4, 2, 16),
        block_tables=torch.zeros(2, 3, dtype=torch.int32), context_lens=torch.ones(2, dtype=torch.int32),
        scale=0.25,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.randn(2, 3, 16)), r"query heads \(3\) must be a multiple of KV heads \(2\)"),
        (dict(q=torch.randn(2, 4, 8)), r"k_cache must have shape \(3, 4, 2, 8\)"),
        (dict(v_cache=torch.zeros(3, 4, 2, 16, dtype=torch.bfloat16)), "share one dtype"),
        (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), r"block_tables must have shape \(2, 3\)"),
        (dict(block_tables=torch.zeros(2, 3)), "block_tables must be one of int32, int64"),
        (dict(context_lens=torch.ones(4, dtype=torch.int32)[::2]), "context_lens must be contiguous"),
        (dict(q=torch.randn(2, 16, 4).transpose(1, 2)), "q must be contiguous in its last dimension"),
        (dict(context_lens=torch.ones(2, dtype=torch.int32, device="meta")), "on one device"),
        (dict(num_splits=0), "num_splits must be >= 1"),
        (dict(block_n=48), "block_n must be a power of two"),
        (dict(num_warps=3), "num_warps must be a power of two"),
        (dict(num_stages=0), "num_stages >= 1"),
    ],
)
def test_launcher_rejects_bad_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        decode_attention(**(_valid_args() | change))
