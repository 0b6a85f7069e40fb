"""Dense causal forward over packed sequences, for training and evaluation (no KV cache).

Rows of a batch are independent sequences of equal length S, flattened to [B * S] tokens so the
decoder layers see the [T, H] layout they use for serving. Each row is causal from its own
position 0 (packing without cross-document masking, as the paper's training did).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.model.decoder_layer import Attend
from kernels.dispatch import TORCH_OPS, KernelOps


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotate-half RoPE in fp32. x: [B, S, H, D]; cos, sin: [S, D/2]."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # [1, S, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, S, H, D/2] each
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def dense_attend(model: BalconyModel, batch_size: int, seq_len: int) -> Attend:
    """Causal attention for ``batch_size`` rows of ``seq_len`` tokens, flattened to [B * S]."""
    arch = model.arch
    cos, sin = model.rope_cos[:seq_len], model.rope_sin[:seq_len]  # [S, D/2]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = rotate_half(q.view(batch_size, seq_len, arch.num_heads, arch.head_dim), cos, sin)
        k = rotate_half(k.view(batch_size, seq_len, arch.num_kv_heads, arch.head_dim), cos, sin)
        v = v.view(batch_size, seq_len, arch.num_kv_heads, arch.head_dim)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, Hq|Hk, S, D]
            is_causal=True, scale=model.scale, enable_gqa=arch.num_heads != arch.num_kv_heads,
        )  # [B, Hq, S, D]
        return out.transpose(1, 2).reshape(batch_size * seq_len, arch.num_heads, arch.head_dim)

    return attend


@dataclass
class BackboneStates:
    """What one frozen backbone pass leaves for the exits (all detached)."""

    at_exit: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer count k -> (out, residual) [T, H]
    final: tuple[torch.Tensor, torch.Tensor]  # after all L layers: (out, residual) [T, H]
    attend: Attend  # the dense attention these rows use, reused by balconies and baselines


@torch.no_grad()
def backbone_pass(model: BalconyModel, input_ids: torch.Tensor, keep: set[int]) -> BackboneStates:
    """Run the frozen backbone over input_ids [B, S]; keep the hidden state after k layers for k in keep."""
    if input_ids.shape[1] > model.rope_cos.shape[0]:
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds the model's {model.rope_cos.shape[0]} positions"
        )
    batch_size, seq_len = input_ids.shape
    attend = dense_attend(model, batch_size, seq_len)
    hidden = F.embedding(input_ids.flatten(), model.embed_tokens)  # [T, H]
    residual = None
    at_exit = {}
    for l, layer in enumerate(model.layers):
        hidden, residual = layer(hidden, residual, attend, dense_ops(model))
        if l + 1 in keep:
            at_exit[l + 1] = (hidden, residual)
    return BackboneStates(at_exit, (hidden, residual), attend)


def differentiable_ops(model: BalconyModel) -> KernelOps:
    """The ops for computations gradients flow through: the Triton kernels are forward-only
    (they serve inference), so under autograd the exact torch references stand in for them."""
    return TORCH_OPS if torch.is_grad_enabled() else dense_ops(model)


def dense_ops(model: BalconyModel) -> KernelOps:
    """The ops for a dense pass without gradients (training's backbone pass, the closed-form fit,
    evaluation): the model's own, except under autocast, where matmuls return bf16 while the residual
    stream stays fp32 and the kernels insist on one dtype (the torch references promote, as
    autocast expects)."""
    return TORCH_OPS if torch.is_autocast_enabled(model.embed_tokens.device.type) else model.ops


def balcony_normed(model: BalconyModel, k: int, states: BackboneStates) -> torch.Tensor:
    """Balcony k on the detached exit state, then its final norm: [T, H], ready for the LM head."""
    balcony, ops = model.balconies[str(k)], differentiable_ops(model)
    out, res = balcony(*states.at_exit[k], states.attend, ops)
    normed, _ = ops.rms_norm(out, balcony.norm, model.arch.rms_norm_eps, res)
    return normed


def final_normed(model: BalconyModel, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The backbone's final norm: [T, H]."""
    normed, _ = dense_ops(model).rms_norm(hidden, model.norm, model.arch.rms_norm_eps, residual)
    return normed


def lm_logits(model: BalconyModel, normed: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen, shared LM head: [N, H] -> fp32 logits [N, V]. ``weight``: a copy of the head in
    another dtype (bf16 on CPUs with native bf16: the head is most of a training step's FLOPs)."""
    weight = model.lm_head if weight is None else weight
    if not isinstance(weight, torch.Tensor):  # a packed CPU head (inference-only models)
        return weight.matmul(normed).float()
    return F.linear(normed.to(weight.dtype), weight).float()
