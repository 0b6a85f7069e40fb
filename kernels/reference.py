"""Torch reference of every kernel in this package.

These are the semantics the Triton kernels must reproduce, and also the implementation used on
devices without Triton (the CPU). Layouts shared by all kernels:

- tokens are flattened across requests: ``T`` rows, request ``b`` owns rows
  ``cu_query_lens[b]:cu_query_lens[b + 1]``;
- the paged KV cache is one pool per K and V: ``[num_blocks, block_size, num_kv_heads, head_dim]``;
  a request's block table row lists the blocks of one layer, in token order;
- ``context_lens[b]`` counts the tokens of request ``b`` in the cache *including* this step's, so its
  query token ``i`` sits at position ``context_lens[b] - q_len_b + i`` (causal inside the chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optionally add ``residual`` to ``x``, then RMS-normalise. Returns (normalised, new residual).

    x, residual: [T, H]; weight: [H]. Statistics in fp32, as LLaMA does.
    """
    if residual is not None:
        x = x + residual  # [T, H], in the activation dtype like the unfused model
    if x.dtype == torch.float32:  # the same arithmetic in one fused op (fewer CPU dispatches)
        return F.rms_norm(x, x.shape[-1:], weight, eps), x
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    out = weight * (x32 * inv_rms).to(x.dtype)
    return out, x


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
    """Rotate q and k (LLaMA's rotate-half RoPE) and write rotated k and v into the paged cache.

    q: [T, Hq, D]; k, v: [T, Hk, D]; cos, sin: [max_positions, D // 2] fp32 tables;
    positions: [T] int; k_cache, v_cache: [num_blocks, block_size, Hk, D];
    slot_mapping: [T] int, the flat slot ``block * block_size + offset`` of each token.
    Returns (q_rotated, k_rotated), new tensors of q's and k's shapes and dtype.
    """
    # index_select and index_copy_ rather than advanced indexing: the same gathers and scatters,
    # several times cheaper per call on CPU, where this reference is the production path.
    c = cos.index_select(0, positions).unsqueeze(1)  # [T, 1, D/2]
    s = sin.index_select(0, positions).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)  # [T, H, D/2] each
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    q_rot, k_rot = rotate(q), rotate(k)
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k_rot)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)
    return q_rot, k_rot


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one request: [length, Hk, D]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks])  # [n, bs, Hk, D]
    return blocks.flatten(0, 1)[:length]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per request against its whole cached context.

    q: [B, Hq, D]; block_tables: [B, max_blocks] int; context_lens: [B] int (>= 1).
    Returns [B, Hq, D]. Hq must be a multiple of Hk (grouped-query attention).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    max_len = int(context_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].flatten()  # [B * n]
    # One index_select per pool: on CPU several times faster than advanced indexing of the same
    # blocks (the gather is most of this function's cost at 16 rows and more).
    keys = k_cache.index_select(0, table).view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    values = v_cache.index_select(0, table).view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    keys, values = keys[:, :max_len], values[:, :max_len]  # [B, S, Hk, D]
    # A single row attends to all of its max_len tokens: no mask (SDPA's unmasked path is leaner).
    valid = None if batch == 1 else torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]  # [B, S]
    if q.dtype != torch.float32 and batch * max_len >= 128:
        # Grouped matrix products, softmax in fp32. For one query token in bf16, torch's CPU SDPA
        # was 1.3-3.8x slower than this at 16-64 rows and 32-2048 cached tokens (one thread), but
        # faster on a single short row (1 x 32 tokens: 0.09 against 0.16 ms); in fp32 SDPA was the
        # faster of the two everywhere, so fp32 keeps it.
        group = num_heads // num_kv_heads
        query = q.view(batch, num_kv_heads, group, head_dim)  # [B, Hk, G, D]
        scores = torch.matmul(query, keys.permute(0, 2, 3, 1)).float() * scale  # [B, Hk, G, S]
        if valid is not None:
            scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # [B, Hk, G, D]
        return out.reshape(batch, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, Hq, 1, D]
        keys.transpose(1, 2),  # [B, Hk, S, D]
        values.transpose(1, 2),
        attn_mask=None if valid is None else valid[:, None, None, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    return out.squeeze(2)  # [B, Hq, D]


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
) -> torch.Tensor:
    """Each request's chunk of queries against its cache (earlier tokens and the chunk itself).

    q: [T, Hq, D]; block_tables: [B, max_blocks]; cu_query_lens: [B + 1] int offsets;
    context_lens: [B] int totals; max_query_len: the longest chunk (sizes a kernel's grid; unused
    here). Causal inside the chunk. Returns [T, Hq, D].
    """
    out = torch.empty_like(q)
    cu_query_lens, context_lens = cu_query_lens.tolist(), context_lens.tolist()
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    for b in range(len(context_lens)):
        start, end, length = cu_query_lens[b], cu_query_lens[b + 1], context_lens[b]
        q_len = end - start
        keys = _gather_context(k_cache, block_tables[b], length).transpose(0, 1)  # [Hk, S, D]
        values = _gather_context(v_cache, block_tables[b], length).transpose(0, 1)
        query_pos = torch.arange(length - q_len, length, device=q.device)  # [q_len]
        mask = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]  # [q_len, S]
        # 4-D inputs: on CPU only they reach the fused (flash) kernel; 3-D ones take the math path,
        # which materialises the scores and was 2.5x slower at 4k context (bf16 and fp32).
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],  # [1, Hq, q_len, D]
            keys[None],  # [1, Hk, S, D]
            values[None],
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )[0].transpose(0, 1)
    return out


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(x @ W_gate^T) * (x @ W_up^T) with the two weights stacked.

    x: [T, H]; w_gate_up: [2 * I, H], gate rows first. Returns [T, I].
    """
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation of a fused gate/up product: gate_up [T, 2I] = [gate | up] -> SiLU(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up
