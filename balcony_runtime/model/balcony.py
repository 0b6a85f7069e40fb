"""A balcony: one extra decoder layer plus its own final norm, attached after backbone layer k.

Balcony (arXiv 2503.05005): the exit at k runs the first k frozen backbone layers, this layer, this
norm and the backbone's frozen LM head. Initialised, as in the authors' code, from a copy of the
backbone's last layer, with the final norm copied from ``layers[k].input_layernorm``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

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

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor, attend, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """The balcony's decoder layer on the exit state (hidden + residual, [T, H] each); returns
        (out, residual) for the balcony's final norm."""
        return self.layer(hidden, residual, attend, ops)

    @torch.no_grad()
    def init_from_backbone(self, layers: nn.ModuleList, random: bool = False, std: float = 0.02) -> None:
        """Copy the last backbone layer (the paper's default) or draw random weights (its ablation)."""
        last = layers[-1]
        for mine, theirs in zip(self.layer.parameters(), last.parameters()):
            if random and mine.dim() == 2:
                mine.normal_(0.0, std)
            else:
                mine.copy_(theirs)
        self.norm.copy_(layers[self.exit_layer].input_norm)
