"""CPU weight formats for decode: fewer bytes per weight, packed for the kernel that reads them.

A CPU decode step is bound by reading the weights (docs/benchmarks.md), so the format of the
matrices decides its pace more than anything else. Three formats, each run by a kernel torch ships,
and one split of two of them:

- ``fp16``: weights rounded to fp16 and packed for FBGEMM's fp16 GEMM (``quantized.linear_dynamic_fp16``,
  despite the name no activation is quantized: fp32 activations, fp16 weights converted in registers,
  fp32 accumulation). Half of fp32's bytes and the same rounding as a 16-bit checkpoint. Where the
  native C kernels run threaded and vectorized (kernels/cpu_native.py), products of a few rows take
  their blocked fp16 layout instead: the same values and arithmetic, read faster and called at a
  fraction of FBGEMM's fixed cost per call (docs/benchmarks.md, "fp16 products in C").
- ``bf16``: weights rounded to bf16 and reordered once into oneDNN's blocked layout, run by oneDNN's
  linear (``mkldnn._linear_pointwise``, the kernel inductor's CPU freezing uses). Each product rounds
  its input and output to bf16 (fp32 accumulation), so it is the numerics of a bf16 model's matrices.
  Where the CPU has AVX512-BF16 (or AMX) it runs native bf16 dot products: as fast as fp16 for one
  row and faster for a batch, where FBGEMM's fp16 kernel is bound by fp32 FMAs. Plain bf16 weights
  through ``F.linear`` get no such packing: oneDNN reorders them on every call.
- ``int8``: weight-only int8 with one scale per output channel (``w ~ q * scale``, ``q`` in
  [-127, 127], ``scale = max|w_row| / 127``), run by ``aten._weight_int8pack_mm`` (the kernel gpt-fast
  and torchao use). A quarter of fp32's bytes; the activations stay exact. On an AVX2 CPU the
  kernel is a scalar loop for fp32 activations and vectorized for bf16 ones, so with ``--dtype auto``
  the activation dtype is chosen by timing both (weight_format.py). Lossy: never picked by ``auto``.

- ``fp16+bf16``: both of the above, each product taking the faster one for its row count.

Tried and dropped: FBGEMM's int8 GEMM over dynamically quantized activations (one 7-bit scale per
input): the fastest here, but full-depth perplexity 3.4x fp32's (docs/benchmarks.md, "CPU decode").

Norms, lenses, embeddings and the KV cache keep the model's dtype. GPU steps never use these.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.cpu_native import NativeKernels, block_fp16, unblock_fp16


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
        return _on_rows(x, self.qweight.shape,
                        lambda rows: torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales))


@dataclass(frozen=True)
class Fp16Weight:
    """fp16 weights for fp32 activations, in FBGEMM's packing, the native kernels' blocked layout
    (kernels/cpu_native.py), or both: then products of up to NATIVE_ROWS rows take the blocked copy
    (faster there: a step of few rows is bound by reading the weights, and a call costs a fraction
    of FBGEMM's fixed cost) and larger ones FBGEMM's (a compute-bound GEMM there; the crossover is
    measured by bench/fp16_products.py)."""

    packed: torch.Tensor | None  # FBGEMM's opaque packed fp16 matrix
    shape: torch.Size  # [N, K] of the original weight
    blocked: torch.Tensor | None = None  # [ceil(N / 16), K, 16] fp16 (cpu_native.block_fp16)
    native: NativeKernels | None = None  # runs ``blocked``

    NATIVE_ROWS = 4  # with both copies: products of this many rows or fewer take the blocked one

    @classmethod
    def pack(cls, weight: torch.Tensor, native: NativeKernels | None = None, fbgemm: bool = True) -> "Fp16Weight":
        """weight [N, K] (float32 or bfloat16) -> fp16 (values past fp16's range saturate). ``native``
        (when its product is fast): a blocked copy for few rows; ``fbgemm=False``: that copy only
        (for SplitWeight, whose bf16 copy serves the many-row products)."""
        w = weight.detach().float().contiguous()
        if native is None or not native.fp16_linear_fast:
            return cls(torch.ops.quantized.linear_prepack_fp16(w, None), w.shape)
        fp16_max = torch.finfo(torch.float16).max
        blocked = block_fp16(w.clamp(-fp16_max, fp16_max))  # saturate as FBGEMM's packing does
        packed = torch.ops.quantized.linear_prepack_fp16(w, None) if fbgemm else None
        return cls(packed, w.shape, blocked, native)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: the weight as the kernel sees it."""
        if self.blocked is not None:
            return unblock_fp16(self.blocked, self.shape[0]).float()
        weight, _ = torch.ops.quantized.linear_unpack_fp16(self.packed)
        return weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> x @ W^T [..., N] float32."""
        if self.blocked is not None and (self.packed is None or x.numel() <= self.NATIVE_ROWS * self.shape[1]):
            n = self.shape[0]
            return _on_rows(x, self.shape, lambda rows: self.native.fp16_linear(rows, self.blocked, n))
        return _on_rows(x, self.shape, lambda rows: torch.ops.quantized.linear_dynamic_fp16(rows, self.packed))


@dataclass(frozen=True)
class Bf16Weight:
    packed: torch.Tensor  # oneDNN's blocked bf16 layout (layout torch._mkldnn)
    shape: torch.Size  # [N, K] of the original weight

    # The row count oneDNN tunes its blocked layout for; measured on AVX512-BF16: packing for 1 or
    # 16 rows runs 1-64 rows alike, for 64 rows is 10-20% slower at 1-16.
    ROWS_HINT = 16

    @staticmethod
    def supported() -> bool:
        """oneDNN has a bf16 path on this CPU (AVX512-BF16, AMX, or avx512_core's emulation)."""
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "Bf16Weight":
        """weight [N, K] (any float dtype) -> bf16 in oneDNN's layout."""
        if not cls.supported():
            raise RuntimeError("bf16 weights need oneDNN's bf16 support, which this CPU lacks")
        w = weight.detach().to(torch.bfloat16).contiguous()
        return cls(torch.ops.mkldnn._reorder_linear_weight(w, cls.ROWS_HINT), w.shape)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: the weight as the kernel sees it (read back through the kernel with an
        identity input, exact in bf16)."""
        identity = torch.eye(self.shape[1], dtype=torch.bfloat16)  # [K, K]
        return self.matmul(identity).T.float().contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ W^T [..., N] in x's dtype (computed from bf16 input, rounded to bf16)."""

        def product(rows: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
            out = torch.ops.mkldnn._linear_pointwise(rows.to(torch.bfloat16), self.packed, None, "none", [], "")
            return out.to(x.dtype)

        return _on_rows(x, self.shape, product)


@dataclass(frozen=True)
class SplitWeight:
    """The same matrix packed twice: fp16 (FBGEMM) for products of few rows, bf16 (oneDNN) from
    ``bf16_from_rows`` rows on. Where both exist they split the work: FBGEMM has the lower fixed
    cost per call, which a one-row product of a small model feels; oneDNN's native bf16 dot
    products win once a batch makes the product compute-bound (a busy decode step, a prefill
    chunk). The crossover is measured per machine (weight_format.py). Twice the weight memory."""

    few: Fp16Weight
    many: Bf16Weight
    bf16_from_rows: int

    @classmethod
    def pack(cls, weight: torch.Tensor, bf16_from_rows: int = 16,
             native: NativeKernels | None = None) -> "SplitWeight":
        """``native``: the fp16 copy in the native kernels' layout alone (Fp16Weight.pack)."""
        if bf16_from_rows < 1:
            raise ValueError(f"bf16_from_rows must be >= 1, got {bf16_from_rows}")
        return cls(Fp16Weight.pack(weight, native, fbgemm=False), Bf16Weight.pack(weight), bf16_from_rows)

    @property
    def shape(self) -> torch.Size:
        return self.few.shape

    def numel(self) -> int:
        return self.few.numel()

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32 as products of fewer than bf16_from_rows rows see it (the fp16 copy)."""
        return self.few.dequantize()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> x @ W^T [..., N] float32, by the copy suited to x's row count."""
        rows = x.numel() // x.shape[-1]
        return (self.many if rows >= self.bf16_from_rows else self.few).matmul(x)


def _on_rows(x: torch.Tensor, shape: torch.Size, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``product`` of a contiguous [T, K] matrix, applied to x [..., K]: a step's 2-D input goes
    straight in (each reshape costs host time per call), anything else is flattened and restored."""
    if x.dim() == 2 and x.is_contiguous():
        return product(x)
    n, k = shape
    return product(x.reshape(-1, k).contiguous()).view(*x.shape[:-1], n)


PackedWeight = Int8Weight | Fp16Weight | Bf16Weight | SplitWeight
FORMATS = {"int8": Int8Weight, "fp16": Fp16Weight, "bf16": Bf16Weight, "fp16+bf16": SplitWeight}
QUANTIZATIONS = ("auto", "none", *FORMATS)


def packer(fmt: str, bf16_from_rows: int | None = None, native: NativeKernels | None = None
           ) -> Callable[[torch.Tensor], PackedWeight]:
    """weight -> packed weight in format ``fmt`` (``bf16_from_rows``: the fp16+bf16 split's crossover;
    ``native``: the C kernels, whose fp16 product the fp16 formats take where it is fast)."""
    if fmt == "fp16+bf16":
        return partial(SplitWeight.pack, bf16_from_rows=bf16_from_rows or 16, native=native)
    if fmt == "fp16":
        return partial(Fp16Weight.pack, native=native)
    return FORMATS[fmt].pack


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """x @ weight^T for a float weight or a packed one."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    return weight.matmul(x)
