"""RoPE fused with the paged KV cache write (kernels/rotary_cache.py) against the reference."""

from __future__ import annotations

import pytest
import torch

import kernels.rotary_cache as rotary_module
from kernels import reference
from kernels.rotary_cache import rotary_and_cache

DTYPES = [torch.float32, torch.bfloat16]


def _tables(max_positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)  # [D/2]
    angles = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]  # [P, D/2]
    return angles.cos(), angles.sin()


def _inputs(rng, tokens, q_heads, kv_heads, head_dim, dtype, num_blocks=6, block_size=16):
    """q, k, v as views of one fused projection output, as the model passes them."""
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=rng).to(dtype)  # [T, (Hq+2Hk)D]
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    cos, sin = _tables(300, head_dim)
    positions = torch.randint(0, 300, (tokens,), generator=rng)  # [T]
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)  # NaN: unwritten slots stay NaN
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    return (
        q.view(tokens, q_heads, head_dim),  # [T, Hq, D], row stride (Hq + 2Hk) D
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
        cos, sin, positions, k_cache, v_cache,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim", [(1, 9, 3, 64), (11, 9, 3, 64), (5, 4, 4, 80)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=["slots64", "slots32"])
def test_matches_reference(tokens, q_heads, kv_heads, head_dim, dtype, slot_dtype, rng, poison, assert_close):
    q, k, v, cos, sin, positions, k_cache, v_cache = _inputs(rng, tokens, q_heads, kv_heads, head_dim, dtype)
    slots = torch.randperm(k_cache.shape[0] * k_cache.shape[1], generator=rng)[:tokens].to(slot_dtype)  # [T]
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    poison(rotary_module)
    q_rot, k_rot = rotary_and_cache(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    ref_q, ref_k = reference.rotary_and_cache(q, k, v, cos, sin, positions, ref_k_cache, ref_v_cache, slots.long())
    assert_close(q_rot, ref_q, "q")
    assert_close(k_rot, ref_k, "k")
    assert torch.equal(k_cache.isnan(), ref_k_cache.isnan()), "k written to the wrong slots"
    assert torch.equal(v_cache.isnan(), ref_v_cache.isnan()), "v written to the wrong slots"
    flat = lambda cache: cache.flatten(0, 1)[slots.long()]  # noqa: E731  [T, Hk, D]
    assert_close(flat(k_cache), flat(ref_k_cache), "k cache")
    assert torch.equal(flat(v_cache), flat(ref_v_cache)), "v must be cached bit for bit"


def test_negative_slots_are_not_cached(rng, assert_close):
    tokens = 6
    q, k, v, cos, sin, positions, k_cache, v_cache = _inputs(rng, tokens, 9, 3, 64, torch.float32)
    slots = torch.tensor([3, -1, 40, -1, 17, 0])  # -1: padding tokens
    q_rot, k_rot = rotary_and_cache(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    # The reference has no padding: give it the real tokens' slots only.
    keep = slots >= 0
    ref_k_cache, ref_v_cache = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    reference.rotary_and_cache(q[keep], k[keep], v[keep], cos, sin, positions[keep], ref_k_cache, ref_v_cache,
                               slots[keep])
    assert torch.equal(k_cache.isnan(), ref_k_cache.isnan()) and torch.equal(v_cache.isnan(), ref_v_cache.isnan())
    assert_close(k_cache.nan_to_num(), ref_k_cache.nan_to_num(), "k cache")
    # Padding tokens' q and k are still rotated.
    scratch = torch.empty_like(k_cache)
    ref_q, ref_k = reference.rotary_and_cache(q, k, v, cos, sin, positions, scratch, scratch.clone(),
                                              torch.arange(tokens))
    assert_close(q_rot, ref_q, "q")
    assert_close(k_rot, ref_k, "k")


def _valid_args():
    tokens, heads, kv_heads, head_dim = 3, 4, 2, 8
    cos, sin = _tables(16, head_dim)
    return dict(
        q=torch.randn(tokens, heads, head_dim), k=torch.randn(tokens, kv_heads, head_dim),
        v=torch.randn(tokens, kv_heads, head_dim), cos=cos, sin=sin, positions=torch.arange(tokens),
        k_cache=torch.zeros(2, 4, kv_heads, head_dim), v_cache=torch.zeros(2, 4, kv_heads, head_dim),
        slot_mapping=torch.arange(tokens),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.randn(3, 4, 7)), "head_dim must be even"),
        (dict(k=torch.randn(3, 3, 8)), r"v must have shape \(3, 3, 8\)"),
        (dict(v=torch.randn(3, 2, 8).half()), "share one dtype"),
        (dict(cos=torch.randn(16, 4).double()), "cos must be one of float32"),
        (dict(sin=torch.randn(16, 3)), r"sin must have shape \(16, 4\)"),
        (dict(positions=torch.arange(3.0)), "positions must be one of int32, int64"),
        (dict(slot_mapping=torch.arange(4)), r"slot_mapping must have shape \(3,\)"),
        (dict(k_cache=torch.zeros(2, 4, 8, 2).transpose(2, 3)), "contiguous in its last dimension"),
        (dict(v_cache=torch.zeros(2, 4, 2, 8, device="meta")), "on one device"),
    ],
)
def test_launcher_rejects_bad_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        rotary_and_cache(**(_valid_args() | change))
