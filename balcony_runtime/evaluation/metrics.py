"""Per-exit quality on held-out sequences: perplexity, KL(full || exit) per token, top-1 agreement.

For each balcony exit k, beside it at the same depth:
  naive_k        hidden state after k backbone layers -> the backbone's final norm and head
  naive_k+1      the same after k + 1 layers (a balcony exit runs k + 1 layers)
  layer_drop     after k layers, skip layers k .. L-2 and run the last layer L-1, then norm and head
Every metric is over the positions that have a next token (S - 1 per sequence); relative decode cost
is the number of decoder layers run over L (the LM head is shared by all and left out).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.training.dense_forward import (
    BackboneStates, backbone_pass, balcony_normed, dense_ops, final_normed, lm_logits,
)

METHODS = ("balcony", "naive_k", "naive_k+1", "layer_drop")


def method_layers(method: str, k: int) -> int:
    return k if method == "naive_k" else k + 1


def method_normed(model: BalconyModel, method: str, k: int, states: BackboneStates) -> torch.Tensor:
    """Final-normed hidden states [T, H] of one method at exit k."""
    if method == "balcony":
        return balcony_normed(model, k, states)
    if method == "naive_k":
        return final_normed(model, *states.at_exit[k])
    if method == "naive_k+1":
        return final_normed(model, *states.at_exit[k + 1])
    if method == "layer_drop":
        out, res = model.layers[-1](*states.at_exit[k], states.attend, dense_ops(model))
        return final_normed(model, out, res)
    raise ValueError(f"unknown method {method!r}")


class _Totals:
    def __init__(self):
        self.nll = self.kl = 0.0
        self.agree = self.count = 0

    def add(self, logp: torch.Tensor, full_logp: torch.Tensor, targets: torch.Tensor, full_top1: torch.Tensor | None):
        self.nll -= logp.gather(1, targets[:, None]).sum().item()
        if full_top1 is not None:
            self.kl += F.kl_div(logp, full_logp, log_target=True, reduction="sum").item()
            self.agree += (logp.argmax(-1) == full_top1).sum().item()
        self.count += targets.numel()

    def row(self, layers: int, num_layers: int, full_ppl: float | None) -> dict:
        ppl = math.exp(self.nll / self.count)
        out = {"layers": layers, "relative_cost": layers / num_layers, "perplexity": ppl}
        if full_ppl is not None:
            out |= {"perplexity_ratio": ppl / full_ppl, "kl_per_token": self.kl / self.count,
                    "top1_agreement": self.agree / self.count}
        return out


@torch.no_grad()
def evaluate_exits(
    model: BalconyModel,
    sequences: torch.Tensor,
    batch_size: int = 4,
    chunk_size: int = 512,
    methods: tuple[str, ...] = METHODS,
    autocast: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Quality of every exit and baseline on sequences [N, S] (token ids)."""
    L, exits = model.full_depth, model.exits
    seq_len = sequences.shape[1]
    keep = set(exits) | {k + 1 for k in exits}
    full = _Totals()
    totals = {(k, m): _Totals() for k in exits for m in methods}
    amp = (lambda: torch.autocast(sequences.device.type if sequences.device.type != "cpu" else "cpu",
                                  dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    device = model.norm.device
    for start in range(0, sequences.shape[0], batch_size):
        ids = sequences[start : start + batch_size].to(device)  # [b, S]
        with amp():
            states = backbone_pass(model, ids, keep)
            normed = {(k, m): method_normed(model, m, k, states) for k in exits for m in methods}
            full_normed = final_normed(model, *states.final)
        flat = ids.flatten()
        has_next = (torch.arange(flat.numel(), device=device) % seq_len) < seq_len - 1
        positions = has_next.nonzero().squeeze(1)  # [P]
        for c in range(0, positions.numel(), chunk_size):
            rows = positions[c : c + chunk_size]
            targets = flat[rows + 1]
            with amp():
                full_logp = F.log_softmax(lm_logits(model, full_normed[rows]), dim=-1)  # [c, V]
            full_top1 = full_logp.argmax(-1)
            full.add(full_logp, full_logp, targets, None)
            for key, hidden in normed.items():
                with amp():
                    logp = F.log_softmax(lm_logits(model, hidden[rows]), dim=-1)
                totals[key].add(logp, full_logp, targets, full_top1)
        if progress:
            progress(min(start + batch_size, sequences.shape[0]), sequences.shape[0])
    full_row = full.row(L, L, None)
    return {
        "tokens": full.count,
        "sequences": int(sequences.shape[0]),
        "seq_len": int(seq_len),
        "full": full_row,
        "exits": {
            str(k): {m: totals[k, m].row(method_layers(m, k), L, full_row["perplexity"]) for m in methods}
            for k in exits
        },
    }
