"""Fused SwiGLU MLP input stage (Shazeer 2020): SiLU(x @ W_gate^T) * (x @ W_up^T) in one GEMM.

Each program computes one [BLOCK_M, BLOCK_N] tile of the [T, I] output with two fp32 accumulators,
one over the gate rows ``n`` and one over the up rows ``I + n`` of the stacked [2I, H] weight, and
applies SiLU(gate) * up in registers before the only store, so the [T, 2I] intermediate of the
unfused path never reaches memory (for prefill that is 2 * T * I activations written and read).

Two tile families: decode (a handful of rows) reads every weight once and is bound by weight
bandwidth, so it uses a 16-row tile and narrows BLOCK_N until there are enough programs to cover
the GPU; prefill is bound by the tensor cores and takes wide tiles, swizzled in groups of GROUP_M
row tiles so that neighbouring programs share weight tiles in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch


@triton.jit
def _swiglu_kernel(
    x_ptr, w_ptr, out_ptr,
    num_rows, inter, hidden,
    stride_x_t, stride_w_n, stride_o_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles advance together along N, so a weight tile loaded
    # for one of them is still in L2 for the others.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(inter, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] token rows
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate columns
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < num_rows
    n_mask = rn < inter
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x_t + rk[None, :]  # [BM, BK]
    gate_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_w_n + rk[:, None]  # [BK, BN], W_gate^T
    up_ptrs = gate_ptrs + inter * stride_w_n  # the up rows follow the I gate rows

    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = rk + k0 < hidden
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = launch.dot(x, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate, UPCAST_DOT)
        up = launch.dot(x, tl.load(up_ptrs, mask=w_mask, other=0.0), up, UPCAST_DOT)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K

    out = gate * tl.sigmoid(gate) * up  # SiLU(gate) * up, in fp32 before the one rounding
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_o_t + rn[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _tile_config(num_rows: int, inter: int, sm_count: int) -> dict:
    """Tile sizes and launch options for ``num_rows`` tokens (decode: few rows; prefill: many)."""
    if num_rows <= 16:
        # Weight-bandwidth bound: the widest N tile that still gives every SM a program.
        block_n = next((n for n in (64, 32) if triton.cdiv(inter, n) >= sm_count), 16)
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if num_rows <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4)
    # Two 128x64 accumulators are the register footprint of one 128x128 GEMM tile.
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """Triton version of ``reference.swiglu``: SiLU(x @ W_gate^T) * (x @ W_up^T).

    x: [T, H]; w_gate_up: [2I, H], gate rows first. Returns [T, I] in x's dtype. ``config``
    overrides the tile choice (keys as returned by ``_tile_config``; tests and tuning).
    """
    op = "swiglu"
    launch.check_device(op, x=x, w_gate_up=w_gate_up)
    launch.check_dim(op, "x", x, 2)
    launch.check_dim(op, "w_gate_up", w_gate_up, 2)
    launch.check_dtype(op, "x", x, launch.FLOAT_DTYPES)
    launch.check_same_dtype(op, x=x, w_gate_up=w_gate_up)
    launch.check_last_dim_contiguous(op, "x", x)
    launch.check_last_dim_contiguous(op, "w_gate_up", w_gate_up)
    num_rows, hidden = x.shape
    if w_gate_up.shape[1] != hidden or w_gate_up.shape[0] % 2:
        raise ValueError(f"{op}: w_gate_up must have shape [2I, {hidden}] (x is [T, {hidden}]), "
                         f"got {tuple(w_gate_up.shape)}")
    inter = w_gate_up.shape[0] // 2

    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    if num_rows == 0 or inter == 0:
        return out
    if hidden == 0:
        return out.zero_()  # SiLU(0) * 0
    cfg = dict(config) if config is not None else _tile_config(num_rows, inter, launch.sm_count(x.device))
    missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"} - cfg.keys()
    if missing:
        raise ValueError(f"{op}: config lacks {sorted(missing)}")
    grid = (triton.cdiv(num_rows, cfg["BLOCK_M"]) * triton.cdiv(inter, cfg["BLOCK_N"]),)
    _swiglu_kernel[grid](
        x, w_gate_up, out,
        num_rows, inter, hidden,
        x.stride(0), w_gate_up.stride(0), out.stride(0),
        UPCAST_DOT=launch.interpreting(),
        **cfg,
    )
    return out
