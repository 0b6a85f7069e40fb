"""Rotary position embedding (Su et al. 2021, LLaMA's rotate-half form) fused with the KV cache write.

One program handles one token: it reads the token's q, k and v once, rotates q and k in fp32
registers, writes the rotated q and k out, and writes the rotated k and the untouched v straight
into the paged cache at the token's slot, so the rotated k is never read back to be cached. A
negative slot means a padding token: its q and k are still rotated but nothing enters the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch


@triton.jit
def _rotate_half(x_ptr, out_ptr, stride_x_head, stride_out_head, heads, half, cos, sin,
                 BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the [heads, 2 * half] row at x_ptr into out_ptr; returns the two rotated halves."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]  # [BH, 1]
    d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BD/2]
    mask = (h < heads) & (d < half)
    x1 = tl.load(x_ptr + h * stride_x_head + d, mask=mask, other=0.0).to(tl.float32)  # [BH, BD/2]
    x2 = tl.load(x_ptr + h * stride_x_head + half + d, mask=mask, other=0.0).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty)
    r2 = (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + h * stride_out_head + d, r1, mask=mask)
    tl.store(out_ptr + h * stride_out_head + half + d, r2, mask=mask)
    return r1, r2


@triton.jit
def _rotary_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr,
    k_cache_ptr, v_cache_ptr, q_out_ptr, k_out_ptr,
    num_q_heads, num_kv_heads, half, block_size,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cos, stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_vcache_block, stride_vcache_slot, stride_vcache_head,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d < half, other=0.0)[None, :]  # [1, BD/2] fp32
    sin = tl.load(sin_ptr + pos * stride_cos + d, mask=d < half, other=0.0)[None, :]

    _rotate_half(q_ptr + tok * stride_q_tok, q_out_ptr + tok * stride_qo_tok, stride_q_head,
                 stride_qo_head, num_q_heads, half, cos, sin, BLOCK_Q_HEADS, BLOCK_HALF)
    k1, k2 = _rotate_half(k_ptr + tok * stride_k_tok, k_out_ptr + tok * stride_ko_tok, stride_k_head,
                          stride_ko_head, num_kv_heads, half, cos, sin, BLOCK_KV_HEADS, BLOCK_HALF)

    slot = tl.load(slots_ptr + tok).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, BLOCK_KV_HEADS)[:, None]  # [BH, 1]
    dd = d[None, :]  # [1, BD/2]
    # slot < 0: padding, not cached. Broadcast by hand: the interpreter rejects a scalar in a mask.
    mask = (h < num_kv_heads) & (dd < half) & ((h * 0 + slot) >= 0)  # [BH, BD/2]
    k_dst = k_cache_ptr + block * stride_cache_block + offset * stride_cache_slot + h * stride_cache_head + dd
    tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(k_dst + half, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
    # v is not rotated; it moves in the same two halves to share the masks and offsets.
    v_src = v_ptr + tok * stride_v_tok + h * stride_v_head + dd
    v_dst = v_cache_ptr + block * stride_vcache_block + offset * stride_vcache_slot + h * stride_vcache_head + dd
    tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)
    tl.store(v_dst + half, tl.load(v_src + half, mask=mask), mask=mask)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.rotary_and_cache``; returns new (q_rotated, k_rotated).

    q: [T, Hq, D]; k, v: [T, Hk, D]; cos, sin: [max_positions, D/2] fp32; positions, slot_mapping:
    [T] int; k_cache, v_cache: [num_blocks, block_size, Hk, D] in the dtype of k. Slots below zero
    are skipped (padding tokens). Positions and slots are not range-checked: that needs a device
    sync per call; the caller's block manager owns them.
    """
    op = "rotary_and_cache"
    launch.check_device(op, q=q, k=k, v=v, cos=cos, sin=sin, positions=positions, k_cache=k_cache,
                        v_cache=v_cache, slot_mapping=slot_mapping)
    for name, t, ndim in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        launch.check_dim(op, name, t, ndim)
        launch.check_last_dim_contiguous(op, name, t)
    launch.check_dtype(op, "q", q, launch.FLOAT_DTYPES)
    launch.check_same_dtype(op, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even for rotate-half RoPE, got {head_dim}")
    launch.check_shape(op, "k", k, (num_tokens, num_kv_heads, head_dim))
    launch.check_shape(op, "v", v, (num_tokens, num_kv_heads, head_dim))
    launch.check_dim(op, "cos", cos, 2)
    launch.check_shape(op, "cos", cos, (cos.shape[0], head_dim // 2))
    launch.check_shape(op, "sin", sin, tuple(cos.shape))
    for name, t in (("cos", cos), ("sin", sin)):
        launch.check_dtype(op, name, t, (torch.float32,))
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError(f"{op}: cos and sin must share strides, dense in the last dimension; got "
                         f"{cos.stride()} and {sin.stride()}")
    num_blocks, block_size = k_cache.shape[:2]
    launch.check_shape(op, "k_cache", k_cache, (num_blocks, block_size, num_kv_heads, head_dim))
    launch.check_shape(op, "v_cache", v_cache, tuple(k_cache.shape))
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        launch.check_shape(op, name, t, (num_tokens,))
        launch.check_dtype(op, name, t, launch.INDEX_DTYPES)

    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_cache_kernel[(num_tokens,)](
        q, k, v, cos, sin, positions, slot_mapping, k_cache, v_cache, q_out, k_out,
        num_q_heads, num_kv_heads, half, block_size,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads),
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q_out, k_out
