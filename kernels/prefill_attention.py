"""Prefill attention: each request's chunk of queries against its paged cache, causal in the chunk.

A flash-attention forward (Dao et al. 2022) that reads keys and values through the block table
instead of from a dense [S, D] tensor, so chunked prefill and prefix reuse need no gather copy: one
program owns BLOCK_M query rows of one request and one query head, walks the cached tokens up to
its last row's position in BLOCK_N tiles, and keeps an online softmax in fp32. Keys past a row's
own position are masked, which makes the chunk causal and lets earlier chunks' tokens be seen in
full. Why not ``scaled_dot_product_attention``: it needs the context gathered into a dense tensor
first (one more write and read of every cached K and V per step) and a per-request loop or padding
for the ragged chunk lengths; this kernel reads the cache in place for the whole ragged batch.

Grouped-query heads: programs of the query heads of one group read the same K/V tiles, which mostly
hit in L2; prefill is bound by the two matmuls, not by those reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch

_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the cheaper instruction


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_query_lens_ptr, context_lens_ptr, out_ptr,
    scale_log2, group_size, head_dim, block_size,
    stride_q_t, stride_q_h,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt_b, stride_bt_blk,
    stride_o_t, stride_o_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    m_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(cu_query_lens_ptr + b).to(tl.int64)
    q_len = tl.load(cu_query_lens_ptr + b + 1).to(tl.int64) - q_start
    if m_block * BLOCK_M >= q_len:  # the grid is sized for the longest chunk
        return
    ctx = tl.load(context_lens_ptr + b).to(tl.int64)
    kv_head = head // group_size

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] index inside the chunk
    r_mask = rows < q_len
    q_pos = ctx - q_len + rows  # [BM] each query's position in the context
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_q_t + head * stride_q_h + d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores (log2)
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of p @ V
    end = tl.minimum(ctx, ctx - q_len + (m_block + 1) * BLOCK_M)  # past the tile's last query
    for n0 in range(0, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)  # [BN] positions in the context
        t_mask = tok < end
        block = tl.load(block_tables_ptr + b * stride_bt_b + (tok // block_size) * stride_bt_blk,
                        mask=t_mask, other=0).to(tl.int64)
        slot = tok % block_size
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + (block * stride_kc_block + slot * stride_kc_slot + kv_head * stride_kc_head)[:, None]
                    + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        s = launch.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST_DOT) * scale_log2
        causal = (tok[None, :] <= q_pos[:, None]) & t_mask[None, :]  # [BM, BN]
        s = tl.where(causal, s, float("-inf"))
        # Token 0 is in the first tile and visible to every row, so m is finite from then on.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # [BM, BN]
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + (block * stride_vc_block + slot * stride_vc_slot + kv_head * stride_vc_head)[:, None]
                    + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        acc = launch.dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
        m = m_new

    out = acc / l[:, None]  # [BM, BD]; l >= 1 for every row (its max scores exp2(0) == 1)
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_o_t + head * stride_o_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Triton version of ``reference.prefill_attention``.

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D] (this step's keys already
    written); block_tables: [B, max_blocks] int; cu_query_lens: [B + 1] int offsets into q;
    context_lens: [B] int, each >= its chunk's length; max_query_len: the longest chunk (sizes the
    grid, so it must not be short). Returns [T, Hq, D]. Values are not checked against each other:
    that needs a device sync.
    """
    op = "prefill_attention"
    launch.check_device(op, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                        cu_query_lens=cu_query_lens, context_lens=context_lens)
    launch.check_dim(op, "q", q, 3)
    launch.check_dim(op, "k_cache", k_cache, 4)
    launch.check_dim(op, "block_tables", block_tables, 2)
    launch.check_dtype(op, "q", q, launch.FLOAT_DTYPES)
    launch.check_same_dtype(op, q=q, k_cache=k_cache, v_cache=v_cache)
    for name, t in (("block_tables", block_tables), ("cu_query_lens", cu_query_lens),
                    ("context_lens", context_lens)):
        launch.check_dtype(op, name, t, launch.INDEX_DTYPES)
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    batch = block_tables.shape[0]
    launch.check_shape(op, "k_cache", k_cache, (num_blocks, block_size, num_kv_heads, head_dim))
    launch.check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    launch.check_shape(op, "cu_query_lens", cu_query_lens, (batch + 1,))
    launch.check_shape(op, "context_lens", context_lens, (batch,))
    launch.check_contiguous(op, "cu_query_lens", cu_query_lens)
    launch.check_contiguous(op, "context_lens", context_lens)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        launch.check_last_dim_contiguous(op, name, t)
    if num_heads % num_kv_heads:
        raise ValueError(f"{op}: query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if not 0 <= max_query_len <= num_tokens:
        raise ValueError(f"{op}: max_query_len must be in [0, {num_tokens}] (q's rows), got {max_query_len}")
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{op}: {name} must be a power of two >= 16, got {value}")

    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    # A chunk shorter than a tile wastes the tile's padded rows; shrink it for short chunks.
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, out,
        scale * _LOG2E, num_heads // num_kv_heads, head_dim, block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        UPCAST_DOT=launch.interpreting(),
        num_warps=4 if block_m * head_dim <= 64 * 64 else 8,
        num_stages=2,
    )
    return out
