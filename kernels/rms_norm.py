"""Fused residual add + RMSNorm (Zhang & Sennrich 2019, as LLaMA uses it).

One program normalises one row: it reads x (and the residual) once, writes the new residual and
the normalised row once. The whole row sits in registers, so the sum of squares needs no second
read. Rounding follows ``reference.rms_norm`` step by step: the add is rounded to the activation
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
    hidden,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: T * H can pass 2**31 at long prefills
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)  # [BLOCK_H]
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # Rounded to the activation dtype, exactly as `x + residual` in the unfused model.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)  # padded lanes add 0
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.rms_norm``: returns (normalised, new residual).

    x, residual: [T, H]; weight: [H]. The output dtype is that of ``weight * x`` (type promotion),
    as in the reference; the new residual is a new tensor (the inputs are not modified).
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

    num_rows, hidden = x.shape
    out = torch.empty((num_rows, hidden), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_rows == 0:
        return out, new_residual
    block_h = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x,
        x if residual is None else residual,  # an unused pointer must still be a valid tensor
        weight,
        out,
        new_residual,
        hidden,
        float(eps),
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        new_residual.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block_h,
        num_warps=min(16, max(1, block_h // 256)),  # ~8 elements per thread per pass
    )
    return out, new_residual
