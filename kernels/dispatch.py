"""The one place that chooses between the Triton kernels and their torch references.

A model receives a :class:`KernelOps` when it is built and calls only its fields, so the choice
is made once, explicitly, and never consulted from module state.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch

from kernels import cpu_decode, cpu_native, reference

Backend = Literal["auto", "torch", "triton", "native"]


@dataclass(frozen=True)
class KernelOps:
    """The implementation of each fused operation a decoder layer needs."""

    name: str  # "torch" or "triton": which implementation was chosen
    rms_norm: Callable  # (x, weight, eps, residual=None) -> (normed, residual)
    rotary_and_cache: Callable  # (q, k, v, cos, sin, positions, k_cache, v_cache, slots) -> (q, k)
    decode_attention: Callable  # (q, k_cache, v_cache, block_tables, context_lens, scale) -> out
    prefill_attention: Callable  # (q, k_cache, v_cache, block_tables, cu_q, ctx, scale, max_q) -> out
    swiglu: Callable  # (x, w_gate_up) -> SiLU(gate) * up
    # A decode step's shared work once per step, then each layer's attention (kernels/cpu_decode.py);
    # None: every layer calls rotary_and_cache and decode_attention.
    decode_tables: Callable | None = None  # (cos, sin, positions, context_lens, max_context, k_cache, v_cache)
    decode_attend: Callable | None = None  # (q, k, v, tables, slots, block_tables, scale) -> out
    silu_mul: Callable = reference.silu_mul  # (gate_up [T, 2I]) -> SiLU(gate) * up, after a packed product
    # The C kernels behind the native fields, whose fp16 product the CPU weight formats take
    # (model/packed_weights.py); None for the other backends.
    native: cpu_native.NativeKernels | None = None


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=reference.rms_norm,
    rotary_and_cache=reference.rotary_and_cache,
    decode_attention=reference.decode_attention,
    prefill_attention=reference.prefill_attention,
    swiglu=reference.swiglu,
    decode_tables=cpu_decode.decode_tables,
    decode_attend=cpu_decode.attend,
)


def native_ops(native: cpu_native.NativeKernels) -> KernelOps:
    """The torch references with a CPU decode step's norms, attention and SwiGLU activation in C."""
    return replace(TORCH_OPS, name="native", rms_norm=native.rms_norm, decode_attend=native.attend,
                   silu_mul=native.silu_mul, native=native)


def select_ops(device: torch.device | str, backend: Backend = "auto", native_dir: Path | None = None) -> KernelOps:
    """Pick the kernels for tensors on ``device``.

    ``auto`` takes Triton when the device is CUDA and Triton imports; on a CPU, the C kernels
    (kernels/cpu_native.py, built under ``native_dir``) when ``native_dir`` is given and they
    build, else the torch references. ``triton`` and ``native`` insist (the interpreter,
    TRITON_INTERPRET=1, runs Triton on CPU tensors for tests).
    """
    device = torch.device(device)
    if backend == "native":
        if device.type != "cpu":
            raise RuntimeError(f"the native kernels run on the CPU, not {device}")
        try:
            return native_ops(cpu_native.open_built(native_dir or _default_native_dir()))
        except cpu_native.NativeBuildError as exc:
            raise RuntimeError(f"native CPU kernels requested but unavailable: {exc}") from exc
    if backend == "auto" and device.type == "cpu" and native_dir is not None:
        native = cpu_native.load(native_dir)
        return native_ops(native) if native is not None else TORCH_OPS
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return TORCH_OPS
    try:
        from kernels.triton_ops import TRITON_OPS
    except ImportError as exc:
        if backend == "triton":
            raise RuntimeError(f"Triton kernels requested but unavailable: {exc}") from exc
        return TORCH_OPS
    return TRITON_OPS


def _default_native_dir() -> Path:
    """Where ``native`` builds when the caller names no cache (tests, scripts): a temporary folder."""
    return Path(tempfile.gettempdir()) / "balcony-native"
