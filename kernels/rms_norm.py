"""Fused residual add + RMSNorm (Zhang & Sennrich 2019, as LLaMA uses it).

One program normalises one row (or a few, as one tile: ``rows_per_program``): it reads x (and the
residual) once, writes the new residual and the normalised row once. The whole row sits in
registers, so the sum of squares needs no second read. Rounding follows ``reference.rms_norm`` step by step: the add is rounded to the activation
dtype (the unfused model's residual stream), statistics are fp32, the normalised row is rounded to
the activation dtype before the weight multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    num_rows,
    hidden,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
):
    # int64: T * H can pass 2**31 at long prefills
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [R] this program's rows
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    mask = (rows < num_rows)[:, None] & col_mask[None, :]  # [R, BLOCK_H]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)  # [R, BLOCK_H]
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * stride_residual + cols[None, :], mask=mask, other=0.0)
        # Rounded to the activation dtype, exactly as `x + residual` in the unfused model.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + rows[:, None] * stride_residual_out + cols[None, :], x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=1) / hidden + eps)  # [R]; padded lanes add 0
    normed = (x32 * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BLOCK_H]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], (normed * w[None, :]).to(out_ptr.dtype.element_ty),
             mask=mask)


def default_num_warps(rows_per_program: int, block_h: int) -> int:
    """About 8 elements a thread (one 16-byte load of bf16) per pass over the tile."""
    return min(16, max(1, rows_per_program * block_h // 256))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
    rows_per_program: int = 1,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.rms_norm``: returns (normalised, new residual).

    x, residual: [T, H]; weight: [H]. The output dtype is that of ``weight * x`` (type promotion),
    as in the reference; the new residual is a new tensor (the inputs are not modified).
    ``rows_per_program`` (a power of two): rows each program normalises, as one [rows, H] tile. One
    by default; more may suit short rows (the default model's H=576), which
    bench/gpu_kernels.py times on a GPU before any default changes. ``num_warps`` (a power of two)
    overrides the launch's warps (default: about 8 elements a thread), a tuning knob swept likewise.
    """
    op = "rms_norm"
    tensors = {"x": x, "weight": weight} | ({} if residual is None else {"residual": residual})
    launch.check_device(op, **tensors)
    launch.check_dim(op, "x", x, 2)
    launch.check_dtype(op, "x", x, launch.FLOAT_DTYPES)
    launch.check_dtype(op, "weight", weight, launch.FLOAT_DTYPES)
    launch.check_shape(op, "weight", weight, (x.shape[1],))
    launch.check_contiguous(op, "weight", weight)
    launch.check_last_dim_contiguous(op, "x", x)
    if residual is not None:
        launch.check_shape(op, "residual", residual, tuple(x.shape))
        launch.check_same_dtype(op, x=x, residual=residual)
        launch.check_last_dim_contiguous(op, "residual", residual)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")
    launch.check_power_of_two(op, "rows_per_program", rows_per_program)
    if num_warps is not None:
        launch.check_power_of_two(op, "num_warps", num_warps)

    num_rows, hidden = x.shape
    out = torch.empty((num_rows, hidden), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_rows == 0:
        return out, new_residual
    block_h = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        x,
        x if residual is None else residual,  # an unused pointer must still be a valid tensor
        weight,
        out,
        new_residual,
        num_rows,
        hidden,
        float(eps),
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        new_residual.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block_h,
        ROWS=rows_per_program,
        num_warps=num_warps or default_num_warps(rows_per_program, block_h),
    )
    return out, new_residual
