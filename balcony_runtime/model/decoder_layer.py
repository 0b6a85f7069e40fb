"""One LLaMA decoder layer: RMSNorm, grouped-query self-attention, RMSNorm, SwiGLU MLP.

The same module holds a backbone layer (frozen) or a balcony (trainable). How attention reads and
writes its keys and values is passed in by the caller (`attend`), so the layer serves the paged
cache at inference and dense causal attention in training without knowing either.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from balcony_runtime.config import ModelArch
from balcony_runtime.model.packed_weights import FORMATS, linear
from kernels import KernelOps

# (q [T, Hq, D], k [T, Hk, D], v [T, Hk, D]) -> attention output [T, Hq, D]; applies RoPE itself.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def concat_into(target: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """target[:] = cat(parts) along rows, without a concatenated temporary: each part is copied
    (and cast) into its own row slice, one pass over the bytes instead of two."""
    row = 0
    for part in parts:
        target[row : row + part.shape[0]].copy_(part)
        row += part.shape[0]
    if row != target.shape[0]:
        raise RuntimeError(f"{row} rows for a weight of {target.shape[0]}")


class DecoderLayer(nn.Module):
    """Weights are stored fused (qkv, gate_up) so a step reads each matrix once."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.arch = arch
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        factory = dict(dtype=dtype, device=device)
        self.input_norm = nn.Parameter(torch.ones(arch.hidden_size, **factory))
        self.qkv_proj = nn.Parameter(torch.empty(q_size + 2 * kv_size, arch.hidden_size, **factory))
        self.o_proj = nn.Parameter(torch.empty(arch.hidden_size, q_size, **factory))
        self.post_attention_norm = nn.Parameter(torch.ones(arch.hidden_size, **factory))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * arch.intermediate_size, arch.hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(arch.hidden_size, arch.intermediate_size, **factory))

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, attend: Attend, ops: KernelOps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: [T, H] (residual None before the first layer). Returns (out, residual):
        the layer's full output is their sum, left unsummed so the next norm can fuse the add."""
        arch = self.arch
        normed, residual = ops.rms_norm(hidden, self.input_norm, arch.rms_norm_eps, residual)
        qkv = linear(normed, self.qkv_proj)  # [T, (Hq + 2 Hk) D]
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        attn = attend(
            q.view(-1, arch.num_heads, arch.head_dim),  # [T, Hq, D]
            k.view(-1, arch.num_kv_heads, arch.head_dim),  # [T, Hk, D]
            v.view(-1, arch.num_kv_heads, arch.head_dim),
        )
        hidden = linear(attn.flatten(1), self.o_proj)  # [T, H]
        normed, residual = ops.rms_norm(hidden, self.post_attention_norm, arch.rms_norm_eps, residual)
        if isinstance(self.gate_up_proj, torch.Tensor):
            activated = ops.swiglu(normed, self.gate_up_proj)  # [T, I]
        else:  # a packed CPU weight: the product, then the activation
            activated = ops.silu_mul(self.gate_up_proj.matmul(normed))  # [T, 2I] -> [T, I]
        hidden = linear(activated, self.down_proj)  # [T, H]
        return hidden, residual

    MATRICES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def pack_weights(self, fmt: str, packed: list | None = None) -> None:
        """Replace the four matrices by a packed CPU format (model/packed_weights.py; inference only:
        they stop being parameters). ``packed``: the four already packed, in MATRICES order."""
        weights = [getattr(self, name) for name in self.MATRICES]
        if not all(isinstance(w, torch.Tensor) for w in weights):
            raise RuntimeError("the layer's matrices are already packed")
        packed = packed if packed is not None else [FORMATS[fmt].pack(w) for w in weights]
        for name, weight in zip(self.MATRICES, packed):
            delattr(self, name)  # unregister the Parameter so a plain attribute can take its name
            object.__setattr__(self, name, weight)

    def weight_elements(self) -> int:
        """Weights this layer holds, packed matrices included (a step reads all of them)."""
        norms = self.input_norm.numel() + self.post_attention_norm.numel()
        return norms + sum(getattr(self, name).numel() for name in self.MATRICES)

    @property
    def is_quantized(self) -> bool:
        return not isinstance(self.qkv_proj, torch.Tensor)

    def load_hf(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Copy a transformers LlamaDecoderLayer's weights (names under ``prefix``) into this layer."""
        if self.is_quantized:
            raise RuntimeError("load weights before quantizing the layer")
        get = lambda name: tensors[prefix + name]  # noqa: E731
        with torch.no_grad():
            self.input_norm.copy_(get("input_layernorm.weight"))
            concat_into(self.qkv_proj, [get(f"self_attn.{p}_proj.weight") for p in "qkv"])
            self.o_proj.copy_(get("self_attn.o_proj.weight"))
            self.post_attention_norm.copy_(get("post_attention_layernorm.weight"))
            concat_into(self.gate_up_proj, [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
            self.down_proj.copy_(get("mlp.down_proj.weight"))

    def hf_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """This layer's weights under transformers' LlamaDecoderLayer names (for references, export)."""
        if self.is_quantized:
            raise RuntimeError("a packed layer has no float weights to export")
        arch = self.arch
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        q, k, v = self.qkv_proj.detach().split([q_size, kv_size, kv_size])
        gate, up = self.gate_up_proj.detach().chunk(2)
        names = {
            "input_layernorm.weight": self.input_norm,
            "self_attn.q_proj.weight": q,
            "self_attn.k_proj.weight": k,
            "self_attn.v_proj.weight": v,
            "self_attn.o_proj.weight": self.o_proj,
            "post_attention_layernorm.weight": self.post_attention_norm,
            "mlp.gate_proj.weight": gate,
            "mlp.up_proj.weight": up,
            "mlp.down_proj.weight": self.down_proj,
        }
        return {prefix + name: t.detach() for name, t in names.items()}
