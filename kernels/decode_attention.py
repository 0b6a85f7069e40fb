"""Paged decode attention with grouped-query heads, split along the sequence (flash-decoding).

Decode reads the whole KV cache once per step for a single query token per request, so it is bound
by memory bandwidth, and a batch alone gives too few programs to fill the GPU at long contexts.
Following flash-decoding (Dao et al. 2023), pass 1 runs one program per (request, KV head, split):
each walks its share of the request's cached tokens tile by tile through the block table and keeps
an online softmax (Milakov & Gimelshein 2018) for all the query heads of that KV head's group, so
every K and V element is read once however many query heads share it. Pass 2 merges the splits'
partial outputs by their log-sum-exp. With a single split, pass 1 writes the output itself.

The group's query heads are the rows of one ``tl.dot``, padded to 16 (the smallest tensor-core
tile); the 9/3 heads of the default model give groups of 3.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import launch

_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the cheaper instruction
_MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost (q load, merge) outweighs its reads
# Programs per SM the split aims for: a split is a separate program reading its own stretch of the
# cache, so a batch too small to fill the GPU several times over leaves bandwidth unused, while
# every split adds a merge. Set from the H200's sweep of 1-16 splits (docs/gpu_h200.md, "the
# launcher's sequence splits against the fastest"), where the fastest split sat at this many waves.
_TARGET_WAVES = 3.5
_MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, group_size, head_dim, block_size,
    stride_q_b, stride_q_h,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt_b, stride_bt_blk,
    stride_o_b, stride_o_h,
    stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    # Each row divides its own context evenly (in whole tiles), so short rows do not idle splits
    # of long ones; a split past a short row's end stores an empty partial.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * group_size + g  # [BG] the query heads this KV head serves
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group_size
    d_mask = d < head_dim
    q = tl.load(q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BG, BD]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scaled scores (log2)
    l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of p @ V
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)  # [BN] positions in the request's context
        t_mask = tok < end
        block = tl.load(block_tables_ptr + b * stride_bt_b + (tok // block_size) * stride_bt_blk,
                        mask=t_mask, other=0).to(tl.int64)
        slot = tok % block_size
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + (block * stride_kc_block + slot * stride_kc_slot + kv_head * stride_kc_head)[:, None]
                    + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        s = launch.dot(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), UPCAST_DOT) * scale_log2  # [BG, BN]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds a valid token
        p = tl.exp2(s - m_new[:, None])  # [BG, BN]
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + (block * stride_vc_block + slot * stride_vc_slot + kv_head * stride_vc_head)[:, None]
                    + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        acc = launch.dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
        m = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    # An empty split (l == 0, acc == 0) stores zeros and a log-sum-exp of -inf: no weight in pass 2.
    l_safe = tl.maximum(l, 1e-30)
    out = acc / l_safe[:, None]  # [BG, BD]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_o_b + heads[:, None] * stride_o_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_out_ptr + b * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s + d[None, :],
                 out, mask=out_mask)
        lse = m + tl.log2(l_safe)  # [BG], log2 domain; -inf when empty since m stays -inf
        tl.store(part_lse_ptr + b * stride_pl_b + heads * stride_pl_h + split, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, head_dim,
    stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h, stride_o_b, stride_o_h,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + b * stride_pl_b + h * stride_pl_h + s, mask=s_mask, other=float("-inf"))
    # Split 0 always holds the row's first token, so the max is finite and weights are well defined.
    w = tl.exp2(lse - tl.max(lse, axis=0))  # [BS] each split's share of the softmax mass
    parts = tl.load(part_out_ptr + b * stride_po_b + h * stride_po_h + s[:, None] * stride_po_s + d[None, :],
                    mask=s_mask[:, None] & (d < head_dim)[None, :], other=0.0)  # [BS, BD]
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)  # [BD]
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def _choose_num_splits(programs: int, max_context: int, sm_count: int) -> int:
    """Enough splits (a power of two) for about _TARGET_WAVES waves of programs, none shorter than
    _MIN_TOKENS_PER_SPLIT."""
    wanted = 1 << max(0, math.ceil(math.log2(_TARGET_WAVES * sm_count / max(programs, 1))))
    return max(1, min(wanted, math.ceil(max_context / _MIN_TOKENS_PER_SPLIT), _MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton version of ``reference.decode_attention``: one query token per request.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; block_tables: [B, max_blocks]
    int; context_lens: [B] int, each >= 1 and <= max_blocks * block_size (not checked: that needs a
    device sync). Returns [B, Hq, D]. ``num_splits`` overrides the sequence split (tests, tuning);
    by default it follows the GPU's size and the block table's width, again without a sync.
    ``block_n`` (tokens a tile), ``num_warps`` and ``num_stages`` (pass 1's launch) are tuning knobs
    that leave the result unchanged: bench/gpu_kernels.py sweeps them on a GPU.
    """
    op = "decode_attention"
    launch.check_device(op, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                        context_lens=context_lens)
    launch.check_dim(op, "q", q, 3)
    launch.check_dim(op, "k_cache", k_cache, 4)
    launch.check_dim(op, "block_tables", block_tables, 2)
    launch.check_dtype(op, "q", q, launch.FLOAT_DTYPES)
    launch.check_same_dtype(op, q=q, k_cache=k_cache, v_cache=v_cache)
    launch.check_dtype(op, "block_tables", block_tables, launch.INDEX_DTYPES)
    launch.check_dtype(op, "context_lens", context_lens, launch.INDEX_DTYPES)
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    launch.check_shape(op, "k_cache", k_cache, (num_blocks, block_size, num_kv_heads, head_dim))
    launch.check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    launch.check_shape(op, "block_tables", block_tables, (batch, block_tables.shape[1]))
    launch.check_shape(op, "context_lens", context_lens, (batch,))
    launch.check_contiguous(op, "context_lens", context_lens)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        launch.check_last_dim_contiguous(op, name, t)
    if num_heads % num_kv_heads:
        raise ValueError(f"{op}: query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    launch.check_power_of_two(op, "block_n", block_n, minimum=16)
    launch.check_power_of_two(op, "num_warps", num_warps)
    if num_stages < 1:
        raise ValueError(f"{op}: num_stages >= 1 required, got {num_stages}")

    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size  # an upper bound known without a sync
        num_splits = _choose_num_splits(batch * num_kv_heads, max_context, launch.sm_count(q.device))
    if num_splits < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    if num_splits == 1:
        part_out = part_lse = out  # not touched: pass 1 writes the output itself
        part_strides = (0, 0, 0, 0, 0)
    else:
        # fp32 partials: each split's normalised output and its log-sum-exp (log2 domain).
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
                        part_lse.stride(1))
    group_size = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * _LOG2E, group_size, head_dim, block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1),
        *part_strides,
        NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group_size)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        UPCAST_DOT=launch.interpreting(),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_heads)](
            part_out, part_lse, out, head_dim,
            *part_strides,
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out
