"""CPU weight formats for decode: fewer bytes per weight, activations untouched.

A CPU decode step is bound by reading the weights (docs/benchmarks.md), so the format of the
matrices decides its pace more than anything else. Two formats, each run by a kernel torch ships:

- ``fp16``: weights rounded to fp16 and packed for FBGEMM's fp16 GEMM (``quantized.linear_dynamic_fp16``,
  despite the name no activation is quantized: fp32 activations, fp16 weights converted in registers,
  fp32 accumulation). Half of fp32's bytes and the same rounding as a 16-bit checkpoint.
- ``int8``: weight-only int8 with one scale per output channel (``w ~ q * scale``, ``q`` in
  [-127, 127], ``scale = max|w_row| / 127``), run by ``aten._weight_int8pack_mm`` (the kernel gpt-fast
  and torchao use). A quarter of fp32's bytes; the activations stay exact. Its CPU kernel is
  vectorized for AVX-512 only, so it is offered, never picked, where the measurement says it is slow.
- ``w8a8``: the same int8 weights run by FBGEMM's dynamic-quantization GEMM
  (``quantized.linear_dynamic``): each step's fp32 input is quantized to 8 bits with one scale for
  the whole input, multiplied in integers and scaled back. Vectorized on AVX2 too; the activation
  rounding costs quality and makes a row depend slightly on its batch-mates.

Norms, lenses, embeddings and the KV cache keep the model's dtype. GPU steps never use these.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Int8Weight:
    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N], the activations' dtype

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "Int8Weight":
        """weight [N, K] (any float dtype) -> per-row symmetric int8."""
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # [N]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales.to(weight.dtype))

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def numel(self) -> int:
        return self.qweight.numel()

    def dequantize(self) -> torch.Tensor:
        """[N, K] in the scales' dtype (for references and tests)."""
        return (self.qweight.float() * self.scales.float()[:, None]).to(self.scales.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ W^T [..., N], in x's dtype."""
        n, k = self.qweight.shape
        flat = x.reshape(-1, k).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)  # [rows, N]
        return out.view(*x.shape[:-1], n)


@dataclass(frozen=True)
class Fp16Weight:
    packed: torch.Tensor  # FBGEMM's opaque packed fp16 matrix
    shape: torch.Size  # [N, K] of the original weight

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "Fp16Weight":
        """weight [N, K] (float32 or bfloat16) -> FBGEMM-packed fp16 (values past fp16's range saturate)."""
        w = weight.detach().float().contiguous()
        return cls(torch.ops.quantized.linear_prepack_fp16(w, None), w.shape)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: the weight as the kernel sees it."""
        weight, _ = torch.ops.quantized.linear_unpack_fp16(self.packed)
        return weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> x @ W^T [..., N] float32."""
        n, k = self.shape
        flat = x.reshape(-1, k).contiguous()
        return torch.ops.quantized.linear_dynamic_fp16(flat, self.packed).view(*x.shape[:-1], n)


@dataclass(frozen=True)
class W8A8Weight:
    packed: torch.Tensor  # FBGEMM's opaque packed int8 matrix (per-output-channel scales)
    shape: torch.Size  # [N, K]

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "W8A8Weight":
        """weight [N, K] -> per-row symmetric int8 (the same rounding as :class:`Int8Weight`), packed."""
        w = weight.detach().float().contiguous()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny).double()
        with warnings.catch_warnings():
            # torch marks its quantized tensor type deprecated (pytorch#184982); FBGEMM's packed int8
            # GEMM still takes one to pack. Revisit when torch removes it.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            q = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return cls(torch.ops.quantized.linear_prepack(q, None), w.shape)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return weight.dequantize()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> float32 [..., N]; x is quantized to uint8 on the fly, one scale for
        the whole [rows, K] input (FBGEMM's dynamic quantization), so a row's result depends slightly
        on the other rows of the step."""
        n, k = self.shape
        flat = x.reshape(-1, k).contiguous()
        return torch.ops.quantized.linear_dynamic(flat, self.packed, True).view(*x.shape[:-1], n)


PackedWeight = Int8Weight | Fp16Weight | W8A8Weight
FORMATS = {"int8": Int8Weight, "fp16": Fp16Weight, "w8a8": W8A8Weight}
QUANTIZATIONS = ("auto", "none", *FORMATS)


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """x @ weight^T for a float weight or a packed one."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    return weight.matmul(x)
