"""Self-distillation loss (DESIGN §1): forward KL(p_full || q_exit) at temperature 1 on every token,
mean over tokens, equal weight over exits; the teacher is the same forward's full-depth output.

The LM head is most of a step's work (V = 49152 for the default model), so it is done by hand, in
chunks of positions. With x and y the teacher's and student's logits less their row maxima and
p = softmax(x):

    KL = <p, x - y> - log sum_v exp(x_v) + log sum_v exp(y_v)      dKL/dz = softmax(z) - p

so no student log-softmax is ever materialised, and the gradient of each chunk goes straight through
the frozen head (grad_z @ W) into the exit's normed hidden state. One chunk of teacher and student
logits is alive at a time (about 5 x chunk x V fp32 numbers at the peak); the balconies' own
backward runs once at the end from the accumulated [T, H] gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.training.dense_forward import (
    BackboneStates, balcony_normed, final_normed, lm_logits,
)


@dataclass(frozen=True)
class TeacherChunk:
    """The full model's side of one chunk of positions, shared by every exit's KL."""

    probs: torch.Tensor  # p = softmax(x): [c, V] fp32
    shifted_logits: torch.Tensor  # x - max_v x: [c, V] fp32
    log_total: torch.Tensor  # log sum_v exp(x - max): [c]; log p = shifted_logits - log_total


def teacher_chunk(model: BalconyModel, hidden: torch.Tensor, weight: torch.Tensor | None) -> TeacherChunk:
    shifted = lm_logits(model, hidden, weight)  # [c, V] fp32
    shifted.sub_(shifted.amax(dim=-1, keepdim=True))
    probs = shifted.exp()
    total = probs.sum(dim=-1, keepdim=True)  # [c, 1]
    probs.div_(total)
    return TeacherChunk(probs, shifted, total.view(-1).log())


def student_chunk(model: BalconyModel, hidden: torch.Tensor, teacher: TeacherChunk,
                  weight: torch.Tensor | None, grad_scale: float | None):
    """Sum over the chunk of KL(p || softmax(z)), and grad_scale x its gradient w.r.t. hidden [c, H].

    With x and y the teacher's and student's logits less their row maxima,
    KL = <p, x - y> - log sum exp x + log sum exp y. Taking x - y before the dot product keeps fp32
    exact where the KL is small beside the entropy (p.log p - p.z subtracts two numbers near the
    entropy: 10x the error on a tiny model's test)."""
    weight = model.lm_head if weight is None else weight
    shifted = lm_logits(model, hidden, weight)  # [c, V] fp32
    shifted.sub_(shifted.amax(dim=-1, keepdim=True))  # y
    p_dot_diff = row_dot(teacher.probs, teacher.shifted_logits - shifted)  # [c]
    total = shifted.exp_().sum(dim=-1, keepdim=True)  # shifted now holds exp(y): [c, V]
    kl = (p_dot_diff - teacher.log_total + total.view(-1).log()).sum()
    if grad_scale is None:
        return kl, None
    # softmax(z) - p, written straight in the head's dtype: one pass instead of three plus a cast
    grad_z = torch.empty(shifted.shape, dtype=weight.dtype, device=shifted.device)
    torch.sub(shifted.div_(total), teacher.probs, out=grad_z)
    grad_hidden = (grad_z @ weight).float() * grad_scale  # [c, H]
    return kl, grad_hidden


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] b[i, v] for each row i: [c, V] x [c, V] -> [c], without a [c, V] temporary
    (a batched matrix product, about twice as fast on CPU as (a * b).sum(-1))."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


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
            teacher_part = teacher_chunk(model, teacher[rows], head_weight)
            for k in exits:
                kl, grad = student_chunk(model, students[k][rows], teacher_part, head_weight, grad_scale)
                sums[k] += kl.cpu()
                if grad is not None:
                    grads[k][rows] = grad
    if grad_scale is not None:
        torch.autograd.backward([students[k] for k in exits], [grads[k].to(students[k].dtype) for k in exits])
    return sums
