"""What every Triton launcher shares: argument checks and a few facts about the device.

A Triton kernel trusts every pointer and stride it is given: a wrong shape reads or writes someone
else's memory instead of failing. Each launcher therefore checks its arguments with these helpers
first and raises a ``ValueError`` naming the argument, so a caller's mistake fails at the call.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels compute on
INDEX_DTYPES = (torch.int32, torch.int64)  # positions, slots, block tables, lengths


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """``tl.dot(a, b, acc)``, exact for fp32 inputs (no TF32), with the interpreter's bf16 bug avoided.

    Triton 3.9's interpreter multiplies bf16 blocks as their raw uint16 bits (``create_dot`` in
    triton/runtime/interpreter.py), so under it (UPCAST) both operands go to fp32 first: bf16
    products are exact in fp32, so the result is what the GPU's bf16 tensor cores give.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:  # decided at compile time
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter.

    ``triton.jit`` reads TRITON_INTERPRET when a kernel is defined, i.e. when this package is
    imported, so ask what it built rather than read the variable again.
    """
    return type(dot).__name__ == "InterpretedFunction"


def check_device(op: str, **tensors: torch.Tensor) -> None:
    """All tensors on one device, and one Triton can launch on (CUDA, or any under the interpreter)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")
    device = next(iter(devices.values()))
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: Triton kernels need CUDA tensors (got {device}); use the torch reference on this "
            "device, or set TRITON_INTERPRET=1 before importing kernels to run the interpreter"
        )


def check_dim(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{op}: {name} must be one of {names}, got {str(t.dtype).removeprefix('torch.')}")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        listed = ", ".join(f"{name} {str(d).removeprefix('torch.')}" for name, d in dtypes.items())
        raise ValueError(f"{op}: these tensors must share one dtype, got {listed}")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    """The kernels vectorise along the last dimension, so it must be dense; other strides are free."""
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_power_of_two(op: str, name: str, value: int, minimum: int = 1) -> None:
    """Tile sizes and launch settings: Triton's block shapes and warp counts are powers of two."""
    if value < minimum or value & (value - 1):
        at_least = "" if minimum == 1 else f" >= {minimum}"
        raise ValueError(f"{op}: {name} must be a power of two{at_least}, got {value}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; an H100/H200's 132 under the interpreter, so the
    launch heuristics take the same decisions in CPU tests as on the GPU they are tuned for."""
    if device.type != "cuda":
        return 132
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
