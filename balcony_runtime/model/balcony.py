"""A balcony: one extra decoder layer plus its own final norm, attached after backbone layer k.

Balcony (arXiv 2503.05005): the exit at k runs the first k frozen backbone layers, this layer, this
norm and the backbone's frozen LM head. Initialised, as in the authors' code, from a copy of the
backbone's last layer, with the final norm copied from ``layers[k].input_layernorm``.

Optionally (issue 12) a balcony has an affine "lens" map in front of its layer: the exit's residual
stream x (after k backbone layers) becomes x @ W^T + b before the layer runs. A closed-form fit
(balcony_runtime/training/lens.py) sets W, b so that x' approximates the input of the backbone's last
layer, which the balcony copies; the map then trains with the rest of the balcony.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from balcony_runtime.config import ModelArch
from balcony_runtime.model.decoder_layer import DecoderLayer


class Balcony(nn.Module):
    def __init__(self, arch: ModelArch, exit_layer: int, dtype: torch.dtype, device):
        super().__init__()
        if not 0 < exit_layer < arch.num_layers:
            raise ValueError(f"a balcony exit must be in 1..{arch.num_layers - 1}, got {exit_layer}")
        self.exit_layer = exit_layer
        self.layer = DecoderLayer(arch, dtype, device)
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

    @torch.no_grad()
    def init_from_backbone(self, layers: nn.ModuleList, random: bool = False, std: float = 0.02) -> None:
        """Copy the last backbone layer (the paper's default) or draw random weights (its ablation).
        Removes any lens map."""
        self.lens = None
        last = layers[-1]
        for mine, theirs in zip(self.layer.parameters(), last.parameters()):
            if random and mine.dim() == 2:
                mine.normal_(0.0, std)
            else:
                mine.copy_(theirs)
        self.norm.copy_(layers[self.exit_layer].input_norm)
