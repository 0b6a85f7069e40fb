"""Self-distillation loss (DESIGN §1): forward KL(p_full || q_exit) at temperature 1 on every token,
mean over tokens, equal weight over exits; the teacher is the same forward's full-depth output.

The LM head is most of a step's work (V = 49152 for the default model), so it is done by hand, in
chunks of positions. With x and y the teacher's and student's logits less their row maxima and
p = softmax(x):

    KL = <p, x - y> - log sum_v exp(x_v) + log sum_v exp(y_v)      dKL/dz = softmax(z) - p

so no student log-softmax is ever materialised, and the gradient of each chunk goes straight through
the frozen head (grad_z @ W) into the exit's normed hidden state.

With reverse_weight b > 0 the objective is (1 - b) KL(p || q) + b KL(q || p), q = softmax(y). The
reverse KL is mode-seeking: a student too small to cover the teacher's spread is pulled onto its
largest modes rather than spread between them (what greedy decoding and top-1 agreement reward; the
forward KL is what perplexity rewards). With d = x - y and L_x, L_y the two log-partition functions,

    KL(q || p) = -<q, d> + L_x - L_y = R        dR/dz = q * (-d + L_x - L_y - R)

Per-position targets (training/repeat_marks.py) can drop the KL at some positions (kl_keep 0) and
add a token-level unlikelihood term u * -log(1 - q_t) at others, t the token the exit should not
write there (Welleck et al. 2019); with q_t = softmax(z)_t,

    d/dz [-log(1 - q_t)] = q_t / (1 - q_t) * (onehot_t - q)

With targets.penalty, the teacher inside the exits' own answers is the full model with OpenAI's
frequency penalty on what the answer has written so far: x_v - a * count_v before the softmax, the
distribution that penalised decoding samples from, so the exit learns to avoid its own repeats
where the loop has not begun yet (what the penalty does at decoding time, put into the weights).

With targets.anchor, those positions also take the KL toward p', the full model's distribution with
t removed (p'_v = p_v / (1 - p_t), p'_t = 0): the unlikelihood term says what not to write, p' where
the probability should go instead (without it, ending the answer is the easy way out). With
r = 1 - p_t and d = x - y as above,

    KL(p' || q) = (<p, d> - p_t d_t) / r - (L_x - L_y) - log r          dKL/dz = q - p'

One chunk of teacher and student logits is alive at a time (about 5 x chunk x V fp32 numbers at the
peak); the balconies' own backward runs once at the end from the accumulated [T, H] gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


class TeacherPenalty(NamedTuple):
    """A frequency penalty on the teacher's logits (training/repeat_marks.answer_counts): for each
    pair, ``amount`` is subtracted from the logit of ``tokens[i]`` at position ``positions[i]``."""

    positions: torch.Tensor  # [P] int64, rows of the flattened batch (or of a chunk)
    tokens: torch.Tensor  # [P] int64
    amount: float

    def rows(self, rows: slice) -> "TeacherPenalty":
        inside = (self.positions >= rows.start) & (self.positions < rows.stop)
        return TeacherPenalty(self.positions[inside] - rows.start, self.tokens[inside], self.amount)


class PositionTargets(NamedTuple):
    """Per-position training targets of a flattened batch (training/repeat_marks.position_targets)."""

    kl_keep: torch.Tensor  # [T] float: 1 where the KL toward the full model is taken, 0 where not
    unlikely: torch.Tensor  # [T] int64: the token to push away from (unlikelihood), or -1
    weight: float  # u, the unlikelihood term's weight beside the KL
    anchor: bool = False  # also the KL toward the full model's distribution without the unlikely token
    penalty: TeacherPenalty | None = None  # a frequency penalty on the teacher inside the exits' answers

    def rows(self, rows: slice) -> "PositionTargets":
        return PositionTargets(self.kl_keep[rows], self.unlikely[rows], self.weight, self.anchor,
                               None if self.penalty is None else self.penalty.rows(rows))


# Below this share of the full model's probability left outside the repeated token, p' is mostly
# rounding noise: such positions get the unlikelihood term alone.
MIN_REST = 0.01


def teacher_rest_kl(teacher: "TeacherChunk", diff: torch.Tensor, p_dot_diff: torch.Tensor, log_ratio: torch.Tensor,
                    q: torch.Tensor, grad_z: torch.Tensor | None, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum over the marked rows of KL(p' || q), p' the full model's distribution without the
    unlikely token; adds q - p' into those rows of grad_z.

    diff: [c, V] x - y; p_dot_diff, log_ratio: [c] as in student_chunk; q: [c, V]; rows, tokens: [m]
    the marked rows and their unlikely tokens."""
    p_t = teacher.probs[rows, tokens]  # [m]
    keep = (1.0 - p_t) >= MIN_REST
    rows, tokens, p_t = rows[keep], tokens[keep], p_t[keep]
    if rows.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=q.device)
    rest = 1.0 - p_t  # [m]
    kl = (p_dot_diff[rows] - p_t * diff[rows, tokens]) / rest - log_ratio[rows] - rest.log()  # [m]
    if grad_z is not None:
        p_rest = teacher.probs[rows] / rest.unsqueeze(1)  # [m, V]
        p_rest[torch.arange(rows.numel(), device=q.device), tokens] = 0.0
        grad_z.index_add_(0, rows, (q[rows] - p_rest).to(grad_z.dtype))
    return kl.sum()


def unlikelihood(q: torch.Tensor, grad_z: torch.Tensor | None, rows: torch.Tensor, tokens: torch.Tensor,
                 weight: float) -> torch.Tensor:
    """Sum over the marked rows of u * -log(1 - q_t); adds its gradient w.r.t. the logits into grad_z.

    q: [c, V] the student's probabilities; grad_z: [c, V] the KL's gradient (the head's dtype) or
    None when only the loss is wanted; rows, tokens: [m] the marked rows and their unlikely tokens."""
    q_rows = q[rows].float()  # [m, V]
    q_t = q_rows.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [m]
    # 1 - q_t underflows to 0 when the exit is sure of the repeat: floor it so the loss and its
    # gradient stay finite (the clip bounds the step)
    rest = (1.0 - q_t).clamp_min(1e-6)
    loss = -rest.log().sum() * weight
    if grad_z is not None:
        g = q_rows.mul_(-1.0)  # -q
        g[torch.arange(rows.numel(), device=g.device), tokens] += 1.0  # onehot_t - q
        g.mul_((weight * q_t / rest).unsqueeze(1))
        grad_z.index_add_(0, rows, g.to(grad_z.dtype))
    return loss


def teacher_chunk(model: BalconyModel, hidden: torch.Tensor, weight: torch.Tensor | None,
                  penalty: TeacherPenalty | None = None) -> TeacherChunk:
    shifted = lm_logits(model, hidden, weight)  # [c, V] fp32
    if penalty is not None and penalty.positions.numel():
        # one pair per occurrence: accumulate sums them into amount x count, OpenAI's frequency penalty
        amounts = torch.full(penalty.positions.shape, -penalty.amount, dtype=shifted.dtype, device=shifted.device)
        shifted.index_put_((penalty.positions, penalty.tokens), amounts, accumulate=True)
    shifted.sub_(shifted.amax(dim=-1, keepdim=True))
    probs = shifted.exp()
    total = probs.sum(dim=-1, keepdim=True)  # [c, 1]
    probs.div_(total)
    return TeacherChunk(probs, shifted, total.view(-1).log())


def student_chunk(model: BalconyModel, hidden: torch.Tensor, teacher: TeacherChunk,
                  weight: torch.Tensor | None, grad_scale: float | None, reverse_weight: float = 0.0,
                  targets: PositionTargets | None = None):
    """Sum over the chunk of (1 - b) KL(p || q) + b KL(q || p) with q = softmax(z) and b =
    reverse_weight, and grad_scale x its gradient w.r.t. hidden [c, H]. With ``targets`` (forward
    KL only), the KL only where targets.kl_keep is 1, plus the unlikelihood term.

    With x and y the teacher's and student's logits less their row maxima,
    KL = <p, x - y> - log sum exp x + log sum exp y. Taking x - y before the dot product keeps fp32
    exact where the KL is small beside the entropy (p.log p - p.z subtracts two numbers near the
    entropy: 10x the error on a tiny model's test)."""
    weight = model.lm_head if weight is None else weight
    shifted = lm_logits(model, hidden, weight)  # [c, V] fp32
    shifted.sub_(shifted.amax(dim=-1, keepdim=True))  # y
    diff = teacher.shifted_logits - shifted  # d = x - y: [c, V]
    p_dot_diff = row_dot(teacher.probs, diff)  # [c]
    total = shifted.exp_().sum(dim=-1, keepdim=True)  # shifted now holds exp(y): [c, V]
    log_ratio = teacher.log_total - total.view(-1).log()  # L_x - L_y: [c]
    forward = p_dot_diff - log_ratio  # KL(p || q) per row: [c]
    if targets is not None:
        if reverse_weight:
            raise ValueError("unlikelihood targets go with the forward KL only")
        q = shifted.div_(total)  # [c, V]
        keep = targets.kl_keep.to(q.dtype)  # [c]
        loss = (forward * keep).sum()
        grad_z = None
        if grad_scale is not None:
            grad_z = torch.sub(q, teacher.probs).mul_(keep.unsqueeze(1)).to(weight.dtype)  # [c, V]
        rows = (targets.unlikely >= 0).nonzero().view(-1)  # [m]: once for both terms (a host sync)
        if rows.numel():
            tokens = targets.unlikely[rows]  # [m]
            if targets.anchor:
                loss = loss + teacher_rest_kl(teacher, diff, p_dot_diff, log_ratio, q, grad_z, rows, tokens)
            loss = loss + unlikelihood(q, grad_z, rows, tokens, targets.weight)
        del diff
        if grad_z is None:
            return loss, None
        return loss, (grad_z @ weight).float() * grad_scale  # [c, H]
    if reverse_weight == 0.0:
        loss = forward.sum()
        if grad_scale is None:
            return loss, None
        del diff  # one [c, V] buffer fewer at the peak
        # softmax(z) - p, written straight in the head's dtype: one pass instead of three plus a cast
        grad_z = torch.empty(shifted.shape, dtype=weight.dtype, device=shifted.device)
        torch.sub(shifted.div_(total), teacher.probs, out=grad_z)
        return loss, (grad_z @ weight).float() * grad_scale  # [c, H]
    q = shifted.div_(total)  # [c, V]
    reverse = log_ratio - row_dot(q, diff)  # KL(q || p) per row: [c]
    loss = ((1.0 - reverse_weight) * forward + reverse_weight * reverse).sum()
    if grad_scale is None:
        return loss, None
    # b q (L_x - L_y - R - d) + (1 - b)(q - p), built in place in diff
    diff.neg_().add_((log_ratio - reverse).unsqueeze(1)).mul_(q).mul_(reverse_weight)
    diff.add_(q, alpha=1.0 - reverse_weight).sub_(teacher.probs, alpha=1.0 - reverse_weight)
    grad_hidden = (diff.to(weight.dtype) @ weight).float() * grad_scale  # [c, H]
    return loss, grad_hidden


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
    reverse_weight: float = 0.0,
    targets: PositionTargets | None = None,
) -> dict[int, torch.Tensor]:
    """Sum over this batch's tokens of KL(p_full || q_exit), per exit (detached fp32 scalars); with
    reverse_weight b, of (1 - b) KL(p_full || q_exit) + b KL(q_exit || p_full).

    grad_scale: when given, back-propagates grad_scale x (sum over exits of the KL sums) into the
    balconies. The caller picks grad_scale = 1 / (tokens x exits x steps averaged).
    head_weight: the LM head in the dtype to run it in (default: the model's own).
    targets: per-position KL mask and unlikelihood tokens over the flattened batch [T], or None.
    """
    with torch.no_grad():
        teacher = final_normed(model, *states.final)  # [T, H]
    students = {k: balcony_normed(model, k, states) for k in exits}  # [T, H] each, with graph if training
    grads = {k: torch.empty(s.shape, dtype=torch.float32, device=s.device) for k, s in students.items()}
    sums = {k: torch.zeros((), dtype=torch.float32) for k in exits}
    with torch.no_grad():
        for start in range(0, teacher.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            part = None if targets is None else targets.rows(rows)
            teacher_part = teacher_chunk(model, teacher[rows], head_weight, None if part is None else part.penalty)
            for k in exits:
                kl, grad = student_chunk(model, students[k][rows], teacher_part, head_weight, grad_scale,
                                         reverse_weight, part)
                sums[k] += kl.cpu()
                if grad is not None:
                    grads[k][rows] = grad
    if grad_scale is not None:
        torch.autograd.backward([students[k] for k in exits], [grads[k].to(students[k].dtype) for k in exits])
    return sums
