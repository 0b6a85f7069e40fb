"""The Triton implementation of every fused operation, as one :class:`KernelOps`.

Importing this module imports triton, which works on a machine without a GPU; only a launch needs
CUDA (or the interpreter, TRITON_INTERPRET=1). ``kernels.dispatch.select_ops`` imports it lazily.
"""

from __future__ import annotations

from kernels.decode_attention import decode_attention
from kernels.dispatch import KernelOps
from kernels.prefill_attention import prefill_attention
from kernels.rms_norm import rms_norm
from kernels.rotary_cache import rotary_and_cache
from kernels.swiglu import swiglu

TRITON_OPS = KernelOps(
    name="triton",
    rms_norm=rms_norm,
    rotary_and_cache=rotary_and_cache,
    decode_attention=decode_attention,
    prefill_attention=prefill_attention,
    swiglu=swiglu,
)
