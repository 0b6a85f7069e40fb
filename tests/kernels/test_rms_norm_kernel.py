"""Fused residual add + RMSNorm (kernels/rms_norm.py) against reference.rms_norm."""

from __future__ import annotations

import pytest
import torch

import kernels.rms_norm as rms_norm_module
from kernels import reference
from kernels.rms_norm import rms_norm

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, hidden", [(1, 576), (7, 1536), (3, 100)])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_matches_reference(rows, hidden, dtype, with_residual, rng, poison, assert_close):
    x = torch.randn(rows, hidden, generator=rng).to(dtype)  # [T, H]
    weight = (1 + 0.1 * torch.randn(hidden, generator=rng)).to(dtype)  # [H]
    residual = torch.randn(rows, hidden, generator=rng).to(dtype) if with_residual else None
    x_before = x.clone()
    poison(rms_norm_module)
    out, new_residual = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-6, residual)
    assert_close(out, ref_out, "normed")
    assert_close(new_residual, ref_residual, "residual")
    assert torch.equal(x, x_before), "the input must not be modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows_per_program, num_warps", [(2, None), (4, 1), (16, 8)])
def test_several_rows_per_program_match_one(rows_per_program, num_warps, dtype, rng, poison, assert_close):
    """Rows normalised as one tile per program, the last program's tile only partly filled (7 rows),
    at any warps, give what one row per program gives, bit for bit, and the reference."""
    x = torch.randn(7, 576, generator=rng).to(dtype)  # [T, H]
    weight = (1 + 0.1 * torch.randn(576, generator=rng)).to(dtype)
    residual = torch.randn(7, 576, generator=rng).to(dtype)
    poison(rms_norm_module)
    out, new_residual = rms_norm(x, weight, 1e-6, residual, rows_per_program=rows_per_program, num_warps=num_warps)
    one_out, one_residual = rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(out, one_out) and torch.equal(new_residual, one_residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-6, residual)
    assert_close(out, ref_out, "normed")
    assert_close(new_residual, ref_residual, "residual")


def test_rows_per_program_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="rows_per_program must be a power of two"):
        rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6, rows_per_program=3)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6, num_warps=3)


def test_strided_rows_and_fp32_weight(rng, poison, assert_close):
    # x a column slice of a wider buffer (row stride != H), weight fp32 under bf16 activations:
    # the output is promoted to fp32 like `weight * normed` in the reference.
    wide = torch.randn(5, 700, generator=rng).to(torch.bfloat16)
    x, residual = wide[:, :576], torch.randn(5, 576, generator=rng).to(torch.bfloat16)
    weight = torch.randn(576, generator=rng)
    poison(rms_norm_module)
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, residual)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)  # a bf16 rounding inside
    assert_close(new_residual, ref_residual, "residual")


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda: (torch.randn(4), torch.ones(4)), "x must have 2 dimensions"),
        (lambda: (torch.randn(2, 4), torch.ones(5)), r"weight must have shape \(4,\)"),
        (lambda: (torch.randn(2, 4).int(), torch.ones(4)), "x must be one of"),
        (lambda: (torch.randn(4, 2).t(), torch.ones(4)), "contiguous in its last dimension"),
        (lambda: (torch.randn(2, 4), torch.ones(4), torch.randn(2, 4).half()), "share one dtype"),
        (lambda: (torch.randn(2, 4), torch.ones(4), torch.randn(3, 4)), r"residual must have shape \(2, 4\)"),
        (lambda: (torch.randn(2, 4), torch.ones(4, device="meta")), "on one device"),
    ],
)
def test_launcher_rejects_bad_arguments(make_args, message):
    x, weight, *residual = make_args()
    with pytest.raises(ValueError, match=message):
        rms_norm(x, weight, 1e-6, *residual)
