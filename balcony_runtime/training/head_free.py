"""A head-free objective (issue 12, item 2): each balcony's normed output is pulled onto the full
model's normed output under a fixed [H, H] metric M, so a training step never runs the LM head
(the [T, H] x [H, V] products are about two thirds of a KL step on CPU).

With d = student normed - teacher normed ([T, H]) the loss is sum over tokens of 0.5 d^T M d and its
gradient w.r.t. the student is M d. Two metrics:

- "fisher": the KL's own second-order term. The student's logits are the teacher's plus W d, and
  KL(p || softmax(z + W d)) = 0.5 d^T W^T (diag p - p p^T) W d + O(|d|^3). Averaging the [H, H]
  Fisher W^T (diag p_t - p_t p_t^T) W over a few thousand teacher tokens gives M, estimated once;
  the loss then reads in nats, as a quadratic stand-in for the KL.
- "logits": half the mean squared error of the centred logits over the vocabulary,
  M = W_c^T W_c / V with W_c the head less its mean row (a softmax ignores a common shift): the
  logit-MSE distillation of Kim et al. (2021), with no data needed.

Either way a step costs O(T H^2) for the loss, against O(T H V) for the KL.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.training.dense_forward import BackboneStates, backbone_pass, balcony_normed, final_normed
from balcony_runtime.training.loss import teacher_chunk

def logits_metric(model: BalconyModel) -> torch.Tensor:
    """M = W_c^T W_c / V: [H, H] fp64, W_c the head less its mean row."""
    weight = model.lm_head.detach().double()  # [V, H]
    centred = weight - weight.mean(dim=0, keepdim=True)
    return centred.T @ centred / weight.shape[0]


@torch.no_grad()
def fisher_metric(model: BalconyModel, batches: Iterable[torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, int]:
    """(M, tokens): the token average of W^T (diag p_t - p_t p_t^T) W over the teacher's
    distributions p_t on ``batches`` of input ids [B, S]. M: [H, H] fp64, symmetric, positive
    semi-definite.

    E_t[W^T diag(p_t) W] = W^T diag(mean_t p_t) W, so only the mean distribution and the sum of
    u_t u_t^T (u_t = W^T p_t: [H]) are accumulated."""
    weight = model.lm_head.detach()  # [V, H]
    p_sum = torch.zeros(weight.shape[0], dtype=torch.float64)  # [V]
    uu = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64)  # [H, H]
    tokens = 0
    for ids in batches:
        states = backbone_pass(model, ids, set())
        teacher = final_normed(model, *states.final)  # [T, H]
        for start in range(0, teacher.shape[0], chunk_size):
            probs = teacher_chunk(model, teacher[start:start + chunk_size], None).probs  # [c, V] fp32
            p_sum += probs.sum(dim=0).double()
            u = (probs @ weight.float()).double()  # [c, H]
            uu += u.T @ u
            tokens += probs.shape[0]
    if tokens == 0:
        raise ValueError("the Fisher metric needs at least one token")
    w64 = weight.double()
    metric = (w64 * (p_sum / tokens)[:, None]).T @ w64 - uu / tokens  # [H, H]
    return (metric + metric.T) / 2, tokens


def head_free_loss(
    model: BalconyModel,
    states: BackboneStates,
    exits: tuple[int, ...],
    metric: torch.Tensor,
    grad_scale: float | None,
) -> dict[int, torch.Tensor]:
    """Sum over this batch's tokens of 0.5 d^T M d per exit (detached fp32 scalars), d the balcony's
    normed output less the full model's. grad_scale: as in distillation_loss (back-propagates
    grad_scale x the sum over exits into the balconies)."""
    with torch.no_grad():
        teacher = final_normed(model, *states.final).float()  # [T, H]
    metric = metric.to(device=teacher.device, dtype=torch.float32)  # [H, H]
    students = {k: balcony_normed(model, k, states) for k in exits}  # [T, H], with graph if training
    sums, grads = {}, {}
    with torch.no_grad():
        for k in exits:
            d = students[k].float() - teacher  # [T, H]
            md = d @ metric  # M d per token (M symmetric): [T, H]
            sums[k] = (0.5 * (md * d).sum()).cpu()
            if grad_scale is not None:
                grads[k] = (md * grad_scale).to(students[k].dtype)
    if grad_scale is not None:
        torch.autograd.backward([students[k] for k in exits], [grads[k] for k in exits])
    return sums
