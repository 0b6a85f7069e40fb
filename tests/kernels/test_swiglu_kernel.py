"""Fused gate/up GEMM with the SiLU * up epilogue (kernels/swiglu.py) against reference.swiglu."""

from __future__ import annotations

import pytest
import torch

import kernels.swiglu as swiglu_module
from kernels import reference
from kernels.swiglu import swiglu

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(rng, rows, hidden, inter, dtype):
    x = torch.randn(rows, hidden, generator=rng).to(dtype)  # [T, H]
    w_gate_up = (torch.randn(2 * inter, hidden, generator=rng) / hidden**0.5).to(dtype)  # [2I, H]
    return x, w_gate_up


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "rows, hidden, inter",
    [
        (1, 576, 1536),  # the default model's decode shape
        (5, 96, 200),  # decode tiles, ragged N and K
        (33, 64, 48),  # the middle tile family
        (300, 40, 72),  # prefill tiles: several row tiles, a partial GROUP_M swizzle group
    ],
)
def test_matches_reference(rows, hidden, inter, dtype, rng, poison, assert_close):
    x, w_gate_up = _inputs(rng, rows, hidden, inter, dtype)
    poison(swiglu_module)
    assert_close(swiglu(x, w_gate_up), reference.swiglu(x, w_gate_up))


def test_strided_rows_and_explicit_config(rng, poison, assert_close):
    wide = torch.randn(20, 130, generator=rng).to(torch.bfloat16)
    x = wide[:, :96]  # [T, H] with row stride 130
    _, w_gate_up = _inputs(rng, 20, 96, 100, torch.bfloat16)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
    poison(swiglu_module)
    assert_close(swiglu(x, w_gate_up, config=config), reference.swiglu(x, w_gate_up))


def test_tile_choice_covers_the_gpu_at_decode():
    cfg = swiglu_module._tile_config(1, 14336, sm_count=132)  # LLaMA-3-8B: 224 programs of 64
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 64)
    assert swiglu_module._tile_config(1, 1536, sm_count=132)["BLOCK_N"] == 16  # default model: 96 programs
    assert swiglu_module._tile_config(4096, 14336, sm_count=132)["BLOCK_M"] == 128


@pytest.mark.parametrize(
    "x, w, message",
    [
        (torch.randn(4), torch.randn(6, 4), "x must have 2 dimensions"),
        (torch.randn(2, 4), torch.randn(6, 5), r"w_gate_up must have shape \[2I, 4\]"),
        (torch.randn(2, 4), torch.randn(5, 4), r"w_gate_up must have shape \[2I, 4\]"),
        (torch.randn(2, 4), torch.randn(6, 4).bfloat16(), "share one dtype"),
        (torch.randn(2, 4), torch.randn(4, 6).t(), "w_gate_up must be contiguous in its last dimension"),
        (torch.randn(2, 4), torch.randn(6, 4, device="meta"), "on one device"),
    ],
)
def test_launcher_rejects_bad_arguments(x, w, message):
    with pytest.raises(ValueError, match=message):
        swiglu(x, w)


def test_config_must_be_complete():
    with pytest.raises(ValueError, match="config lacks"):
        swiglu(torch.randn(2, 4), torch.randn(6, 4), config=dict(BLOCK_M=16))
