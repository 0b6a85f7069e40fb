"""Self-distillation loss (DESIGN §1): forward KL(p_full || q_exit) at temperature 1 on every token,
mean over tokens, equal weight over exits; the teacher is the same forward's full-depth output.

The LM head is most of a step's work (V = 49152 for the default model), so it is done by hand, in
chunks of positions: for student logits z and teacher probabilities p of one position,

    KL = sum_v p_v log p_v - sum_v p_v z_v + logsumexp(z)      dKL/dz = softmax(z) - p

so no student log-softmax is ever materialised, and the gradient of each chunk goes straight through
the frozen head (grad_z @ W) into the exit's normed hidden state. No more than one chunk of
full-vocabulary logits is alive at a time; the balconies' own backward runs once at the end from the
accumulated [T, H] gradient.
"""

from __future__ import annotations

import torch

from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.training.dense_forward import (
    BackboneStates, balcony_normed, final_normed, lm_logits,
)


def teacher_chunk(model: BalconyModel, hidden: torch.Tensor, weight: torch.Tensor | None):
    """Teacher probabilities p [c, V] and sum_v p log p [c] of one chunk of positions."""
    logits = lm_logits(model, hidden, weight)  # [c, V] fp32
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    p = logp.exp()
    return p, (p * logp).sum(-1)


def student_chunk(model: BalconyModel, hidden: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor,
                  weight: torch.Tensor | None, grad_scale: float | None):
    """Sum over the chunk of KL(p || softmax(z)), and grad_scale x its gradient w.r.t. hidden [c, H]."""
    weight = model.lm_head if weight is None else weight
    z = lm_logits(model, hidden, weight)  # [c, V] fp32
    lse = torch.logsumexp(z, dim=-1)  # [c]
    kl = (neg_entropy - (p * z).sum(-1) + lse).sum()
    if grad_scale is None:
        return kl, None
    grad_z = z.sub_(lse[:, None]).exp_().sub_(p)  # softmax(z) - p, in place of z: [c, V]
    grad_hidden = (grad_z.to(weight.dtype) @ weight).float() * grad_scale  # [c, H]
    return kl, grad_hidden


def distillation_loss(
    model: BalconyModel,
    states: BackboneStates,
    exits: tuple[int, ...],
    chunk_size: int,
    grad_scale: float | None,
    head_weight: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Sum over this batch's tokens of KL(p_full || q_exit), per exit (detached fp32 scalars).

    grad_scale: when given, back-propagates grad_scale x (sum over exits of the KL sums) into the
    balconies. The caller picks grad_scale = 1 / (tokens x exits x steps averaged).
    head_weight: the LM head in the dtype to run it in (default: the model's own).
    """
    with torch.no_grad():
        teacher = final_normed(model, *states.final)  # [T, H]
    students = {k: balcony_normed(model, k, states) for k in exits}  # [T, H] each, with graph if training
    grads = {k: torch.empty(s.shape, dtype=torch.float32, device=s.device) for k, s in students.items()}
    sums = {k: torch.zeros((), dtype=torch.float32) for k in exits}
    with torch.no_grad():
        for start in range(0, teacher.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            p, neg_entropy = teacher_chunk(model, teacher[rows], head_weight)
            for k in exits:
                kl, grad = student_chunk(model, students[k][rows], p, neg_entropy, head_weight, grad_scale)
                sums[k] += kl.cpu()
                if grad is not None:
                    grads[k][rows] = grad
    if grad_scale is not None:
        torch.autograd.backward([students[k] for k in exits], [grads[k].to(students[k].dtype) for k in exits])
    return sums
