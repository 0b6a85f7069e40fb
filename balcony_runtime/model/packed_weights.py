"""CPU weight formats for decode: fewer bytes per weight, activations untouched.

A CPU decode step is bound by reading the weights (docs/benchmarks.md), so the format of the
matrices decides its pace more than anything else. Two formats, each run by a kernel torch ships:

- ``fp16``: weights rounded to fp16 and packed for FBGEMM's fp16 GEMM (``quantized.linear_dynamic_fp16``,
  despite the name no activation is quantized: fp32 activations, fp16 weights converted in registers,
  fp32 accumulation). Half of fp32's bytes and the same rounding as a 16-bit checkpoint.
- ``int8``: weight-only int8 with one scale per output channel (``w ~ q * scale``, ``q`` in
  [-127, 127], ``scale = max|w_row| / 127``), run by ``aten._weight_int8pack_mm`` (the kernel gpt-fast
  and torchao use). A quarter of fp32's bytes; the activations stay exact. On an AVX2 CPU the
  kernel is a scalar loop for fp32 activations and vectorized for bf16 ones, so with ``--dtype auto``
  the activation dtype is chosen by timing both (weight_format.py). Lossy: never picked by ``auto``.

Tried and dropped: FBGEMM's int8 GEMM over dynamically quantized activations (one 7-bit scale per
input): the fastest here, but full-depth perplexity 3.4x fp32's (docs/benchmarks.md, "CPU decode").

Norms, lenses, embeddings and the KV cache keep the model's dtype. GPU steps never use these.
"""

from __future__ import annotations

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


PackedWeight = Int8Weight | Fp16Weight
FORMATS = {"int8": Int8Weight, "fp16": Fp16Weight}
QUANTIZATIONS = ("auto", "none", *FORMATS)


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """x @ weight^T for a float weight or a packed one."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    return weight.matmul(x)
