"""Decode attention on the CPU with the work every layer shares done once per step.

On a CPU a decode step of a small model is bound less by arithmetic than by dispatch: each torch
call costs microseconds of host time whatever its size, and reference.rotary_and_cache plus
reference.decode_attention make some forty of them per layer. Most of those compute the same
thing at every layer of one step: the rows' RoPE angles, the longest context, the key mask, the
flat views of the cache pools. :func:`decode_tables` computes them once per step; :func:`attend`
is then one layer's RoPE, cache write and attention in about a dozen calls. The arithmetic is the
reference's (the same rotate-half RoPE in fp32, the same SDPA), so tests hold it to the reference.

GPUs keep the Triton kernels (a step there is recorded in CUDA graphs, where the host cost of a
call is paid once at capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodeTables:
    """What every layer's decode attention of one step shares. B rows, one query token each."""

    cos: torch.Tensor  # [B, 1, D] fp32: cos of each row's angles, both halves
    sin: torch.Tensor  # [B, 1, D] fp32: sin, first half negated (rotate-half as roll and multiply)
    valid: torch.Tensor | None  # [B, 1, 1, S] bool: key s within row b's context; None for one row
    num_blocks: int  # blocks of the longest context (each row's gather reads this many)
    max_len: int  # S for one row (its whole context); num_blocks * block_size otherwise
    k_cache: torch.Tensor  # [num_blocks, block_size, Hk, D] the key pool
    v_cache: torch.Tensor
    k_flat: torch.Tensor  # [num_blocks * block_size, Hk, D] the same pool as slots
    v_flat: torch.Tensor
    context_lens: torch.Tensor | None = None  # [B] int32: keys of each row (the native kernels read it)

    def rows(self, start: int, stop: int) -> "DecodeTables":
        """The tables of rows start..stop-1 (a balcony's rows: the batch's last ones)."""
        if start == 0 and stop == self.cos.shape[0]:
            return self
        return DecodeTables(self.cos[start:stop], self.sin[start:stop],
                            None if self.valid is None else self.valid[start:stop],
                            self.num_blocks, self.max_len, self.k_cache, self.v_cache, self.k_flat, self.v_flat,
                            None if self.context_lens is None else self.context_lens[start:stop])


def decode_tables(
    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, context_lens: torch.Tensor,
    max_context: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
) -> DecodeTables:
    """cos, sin: [max_positions, D/2] fp32 tables; positions, context_lens: [B]; max_context: the
    longest of context_lens, known on the host (no read-back); k_cache, v_cache: [num_blocks,
    block_size, Hk, D]."""
    rows = positions.shape[0]
    block_size = k_cache.shape[1]
    c = cos.index_select(0, positions)  # [B, D/2]
    s = sin.index_select(0, positions)
    num_blocks = -(-max_context // block_size)
    if rows == 1:  # one row attends to its whole context: no mask (SDPA's unmasked path is leaner)
        valid, max_len = None, max_context
    else:  # rows gather num_blocks whole blocks each; the mask hides what lies past a row's context
        max_len = num_blocks * block_size
        keys = torch.arange(max_len, device=positions.device)
        valid = (keys[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
    return DecodeTables(
        cos=torch.cat((c, c), dim=-1).unsqueeze(1),
        sin=torch.cat((-s, s), dim=-1).unsqueeze(1),
        valid=valid, num_blocks=num_blocks, max_len=max_len, k_cache=k_cache, v_cache=v_cache,
        k_flat=k_cache.view(-1, *k_cache.shape[2:]), v_flat=v_cache.view(-1, *v_cache.shape[2:]),
        context_lens=context_lens,
    )


def _rotate(x: torch.Tensor, tables: DecodeTables) -> torch.Tensor:
    """LLaMA's rotate-half RoPE of x [B, H, D]: x * cos + rotate_half(x) * sin, where rotate_half
    (x1, x2) = (-x2, x1) is a roll by D/2 against the sign-folded sin table. In fp32, as the reference."""
    x32 = x.float()
    rotated = torch.addcmul(x32 * tables.cos, x32.roll(x.shape[-1] // 2, dims=-1), tables.sin)
    return rotated.to(x.dtype)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: DecodeTables, slots: torch.Tensor,
    block_tables: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One layer's decode attention: RoPE on q and k, k and v written at ``slots`` [B], then each
    row's query against its cached context. q: [B, Hq, D]; k, v: [B, Hk, D]; block_tables:
    [B, max_blocks] int (this layer's). Returns [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q, k = _rotate(q, tables), _rotate(k, tables)
    tables.k_flat.index_copy_(0, slots, k)
    tables.v_flat.index_copy_(0, slots, v)
    blocks = block_tables[:, : tables.num_blocks].flatten()  # [B * n], each row's blocks in token order
    # [B * n, block_size, Hk, D] -> [B, n * block_size, Hk, D]
    keys = tables.k_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim)
    values = tables.v_cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim)
    if tables.valid is None:  # one row, unmasked: exactly its context
        keys, values = keys[:, : tables.max_len], values[:, : tables.max_len]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, Hq, 1, D]
        keys.transpose(1, 2),  # [B, Hk, S, D]
        values.transpose(1, 2),
        attn_mask=tables.valid,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    return out.squeeze(2)  # [B, Hq, D]
