"""Shared fixtures of the kernel tests: fresh random inputs, poisoned outputs, one error metric.

The kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
triton is imported), which is slow: shapes stay small but odd (non-power-of-two widths, contexts
ending mid-block) so masking bugs show.
"""

from __future__ import annotations

import secrets
import types

import pytest
import torch

# ||out - ref|| / ||ref|| allowed per dtype. Under the interpreter a bf16 rounding truncates
# (triton/runtime/interpreter.py casts fp32 -> bf16 without rounding), worth ~0.4% per rounding.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed each run, printed so a failure can be replayed."""
    seed = secrets.randbits(31)
    print(f"kernel test seed: {seed}")
    return torch.Generator().manual_seed(seed)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def assert_close():
    """Assert ``out`` matches ``ref`` in shape, dtype, and relative error, and has no NaN (poison)."""

    def check(out: torch.Tensor, ref: torch.Tensor, what: str = "output") -> None:
        assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
        unwritten = torch.isnan(out) & ~torch.isnan(ref)
        assert not unwritten.any(), f"{what}: {int(unwritten.sum())} elements left unwritten (NaN poison)"
        err = relative_error(out, ref)
        assert err < TOLERANCE[ref.dtype], f"{what}: relative error {err:.3g} >= {TOLERANCE[ref.dtype]}"

    return check


class _PoisonedTorch(types.SimpleNamespace):
    """Stands in for ``torch`` inside a kernel module: floating tensors it allocates start as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return _poison(torch.empty_like(*args, **kwargs))


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))


@pytest.fixture
def poison(monkeypatch):
    """``poison(module)``: every output and scratch buffer that module's launcher allocates is NaN,
    so an element the kernel fails to write shows up instead of passing on leftover memory."""

    def apply(module: types.ModuleType) -> None:
        monkeypatch.setattr(module, "torch", _PoisonedTorch())

    return apply
