"""A balcony: one extra decoder layer plus its own final norm, attached after backbone layer k.

Balcony (arXiv 2503.05005): the exit at k runs the first k frozen backbone layers, this layer, this
norm and the backbone's frozen LM head. Initialised, as in the authors' code, from a copy of the
backbone's last layer, with the final norm copied from ``layers[k].input_layernorm``.

Optionally (issue 12) a balcony has an affine "lens" map in front of its layer: the exit's residual
stream x (after k backbone layers) becomes x @ W^T + b before the layer runs. A closed-form fit
(balcony_runtime/training/lens.py) sets W, b so that x' approximates the input of the backbone's last
layer, which the balcony copies; the map then trains with the rest of the balcony.

A balcony's MLP may be wider than the backbone's (issue 12: more capacity at an exit). Its width is
read from the adapters' tensors; :meth:`Balcony.widen_mlp` adds hidden units without changing what
the balcony computes (the new units' down-projection columns start at zero), so training continues
from trained adapters with the extra capacity.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from balcony_runtime.config import ModelArch
from balcony_runtime.model.decoder_layer import DecoderLayer


class Balcony(nn.Module):
    def __init__(self, arch: ModelArch, exit_layer: int, dtype: torch.dtype, device, mlp_width: int | None = None):
        """``mlp_width``: the MLP's hidden units (None: the backbone's intermediate size)."""
        super().__init__()
        if not 0 < exit_layer < arch.num_layers:
            raise ValueError(f"a balcony exit must be in 1..{arch.num_layers - 1}, got {exit_layer}")
        if mlp_width is not None and mlp_width < 1:
            raise ValueError(f"a balcony's MLP width must be at least 1, got {mlp_width}")
        self.exit_layer = exit_layer
        self.layer = DecoderLayer(replace(arch, intermediate_size=mlp_width or arch.intermediate_size), dtype, device)
        self.norm = nn.Parameter(torch.ones(arch.hidden_size, dtype=dtype, device=device))
        self.lens: nn.Linear | None = None  # affine map on the exit state; None: identity (no matmul)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, attend, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """The balcony's decoder layer on the exit state (hidden + residual, [T, H] each); returns
        (out, residual) for the balcony's final norm. With a lens, the layer runs on
        ((hidden + residual) @ W^T + b, None)."""
        if self.lens is None:
            return self.layer(hidden, residual, attend, ops)
        x = hidden if residual is None else hidden + residual  # [T, H]: the residual stream after k layers
        x = F.linear(x, self.lens.weight, self.lens.bias)  # [T, H]
        return self.layer(x, None, attend, ops)

    def set_lens(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> None:
        """Give this balcony a lens map (weight [H, H], bias [H]; bias None: zero), or remove it (None)."""
        if weight is None:
            self.lens = None
            return
        size = self.norm.shape[0]
        if tuple(weight.shape) != (size, size) or (bias is not None and tuple(bias.shape) != (size,)):
            raise ValueError(f"a lens map is [{size}, {size}] plus [{size}], got {tuple(weight.shape)} "
                             f"and {None if bias is None else tuple(bias.shape)}")
        lens = nn.Linear(size, size, bias=True, dtype=self.norm.dtype, device=self.norm.device)
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias if bias is not None else torch.zeros(size))
        lens.weight.requires_grad_(self.norm.requires_grad)
        lens.bias.requires_grad_(self.norm.requires_grad)
        self.lens = lens

    @property
    def mlp_width(self) -> int:
        return self.layer.arch.intermediate_size

    @torch.no_grad()
    def widen_mlp(self, width: int, generator: torch.Generator | None = None) -> None:
        """Grow the MLP to ``width`` hidden units, computing exactly what it computed before: the new
        gate and up rows are drawn with the standard deviation of the existing ones (so the new units
        start as active as the old), the new down-projection columns are zero (so they add nothing
        until trained). Keeps requires_grad."""
        old = self.mlp_width
        if width < old:
            raise ValueError(f"a balcony's MLP can only grow: {old} hidden units, asked for {width}")
        if width == old:
            return
        layer = self.layer
        if layer.is_quantized:
            raise RuntimeError("widen the MLP before packing the weights")
        hidden = layer.arch.hidden_size
        gate, up = layer.gate_up_proj.detach().chunk(2)  # [I, H] each
        draw = lambda like: torch.randn(width - old, hidden, generator=generator).to(like) * like.float().std()  # noqa: E731
        grown = DecoderLayer(replace(layer.arch, intermediate_size=width), layer.qkv_proj.dtype, layer.qkv_proj.device)
        for name in ("input_norm", "qkv_proj", "o_proj", "post_attention_norm"):
            getattr(grown, name).copy_(getattr(layer, name))
        grown.gate_up_proj.copy_(torch.cat([gate, draw(gate), up, draw(up)]))  # [2W, H]: gate rows, then up rows
        grown.down_proj.zero_()
        grown.down_proj[:, :old].copy_(layer.down_proj)  # [H, W]: the new columns stay zero
        trainable = layer.qkv_proj.requires_grad
        for p in grown.parameters():
            p.requires_grad_(trainable)
        self.layer = grown

    @torch.no_grad()
    def init_from_backbone(self, layers: nn.ModuleList, random: bool = False, std: float = 0.02) -> None:
        """Copy the last backbone layer (the paper's default) or draw random weights (its ablation).
        Removes any lens map; the MLP must have the backbone's width."""
        if self.mlp_width != layers[-1].arch.intermediate_size:
            raise ValueError(f"a balcony with {self.mlp_width} MLP units cannot copy a layer of "
                             f"{layers[-1].arch.intermediate_size}")
        self.lens = None
        last = layers[-1]
        for mine, theirs in zip(self.layer.parameters(), last.parameters()):
            if random and mine.dim() == 2:
                mine.normal_(0.0, std)
            else:
                mine.copy_(theirs)
        self.norm.copy_(layers[self.exit_layer].input_norm)
