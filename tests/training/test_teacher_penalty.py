"""A frequency penalty on the teacher inside the exits' own answers: the counts, the loss against a
dense reference through autograd, and the trainer's wiring."""

from __future__ import annotations

import pytest
import torch

from balcony_runtime.training import repeat_marks
from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.data import DataConfig
from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, final_normed, lm_logits
from balcony_runtime.training.loss import PositionTargets, TeacherPenalty, distillation_loss
from balcony_runtime.training.repeat_marks import ANSWER, NORMAL, UNLIKELY

from .test_unlikely_repeats import LOOP, masked_kl_sum, train_params, write_answers


def dense_counts(ids: torch.Tensor, marks: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B * S, V]: at each position, how often each token was written so far in its answer and row
    (the reference, by walking every row token by token)."""
    counts = torch.zeros(ids.numel(), vocab)
    for b in range(ids.shape[0]):
        running = torch.zeros(vocab)
        for s in range(ids.shape[1]):
            if marks[b, s] & ANSWER:
                running[ids[b, s]] += 1
                counts[b * ids.shape[1] + s] = running
            else:
                running = torch.zeros(vocab)  # a prompt ends the answer before it
    return counts


def pairs_to_dense(positions: torch.Tensor, tokens: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    dense = torch.zeros(rows, vocab)
    dense.index_put_((positions, tokens), torch.ones(positions.numel()), accumulate=True)
    return dense


def test_answer_counts_are_each_answer_token_written_so_far():
    A = ANSWER
    ids = torch.tensor([[5, 6, 7, 6, 6, 9, 3, 3, 8, 3],
                        [3, 3, 4, 2, 2, 2, 1, 1, 1, 1]])
    # row 0: a prompt (5), an answer (6 7 6 6 9), a prompt (3 3), an answer running off the row's end;
    # row 1 begins inside an answer: it counts from the row's start, all the model sees of it
    marks = torch.tensor([[0, A, A, A | UNLIKELY, A, A, 0, 0, A, A],
                          [A, A, A, 0, 0, A, A | UNLIKELY, A, A, A]])
    positions, tokens = repeat_marks.answer_counts(ids, marks)
    assert torch.equal(pairs_to_dense(positions, tokens, ids.numel(), 10), dense_counts(ids, marks, 10))
    # by hand: position 4 (the third 6) has written 6 three times and 7 once
    assert pairs_to_dense(positions, tokens, ids.numel(), 10)[4].tolist() == [0, 0, 0, 0, 0, 0, 3, 1, 0, 0]
    nothing = repeat_marks.answer_counts(ids, torch.full_like(ids, NORMAL))
    assert nothing[0].numel() == 0 and nothing[1].numel() == 0


@pytest.mark.parametrize("amount", [0.5, 2.0])
def test_penalised_teacher_loss_and_gradients_equal_autograd(tiny_trainable, amount):
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    g = torch.Generator().manual_seed(7)
    # few distinct tokens, so the answers repeat and the counts grow past 1
    ids = torch.randint(0, 6, (2, 18), generator=g) * 97
    marks = torch.zeros_like(ids)
    marks[0, 3:14] = ANSWER
    marks[1, :9] = ANSWER
    marks[1, 12:] = ANSWER
    V = model.arch.vocab_size
    counts = dense_counts(ids, marks, V)  # [T, V]
    assert counts.max() >= 3
    keep = (torch.rand(ids.numel(), generator=g) > 0.2).float()
    penalty = TeacherPenalty(*repeat_marks.answer_counts(ids, marks), amount)
    targets = PositionTargets(keep, torch.full((ids.numel(),), -1), 0.0, penalty=penalty)
    scale = 1.0 / (ids.numel() * len(exits))
    params = list(model.balconies.parameters())

    states = backbone_pass(model, ids, set(exits))
    ours = distillation_loss(model, states, exits, 5, scale, targets=targets)  # chunks of 5 cut the answers
    chunked = [p.grad.clone() for p in params]
    with torch.no_grad():
        unpenalised = distillation_loss(model, states, exits, 5, None, targets=targets._replace(penalty=None))

    model.zero_grad(set_to_none=True)
    states = backbone_pass(model, ids, set(exits))
    with torch.no_grad():
        teacher = lm_logits(model, final_normed(model, *states.final)) - amount * counts  # [T, V]
    students = {k: lm_logits(model, balcony_normed(model, k, states)) for k in exits}
    refs = {k: masked_kl_sum(teacher, students[k], keep) for k in exits}
    (sum(refs.values()) * scale).backward()
    for k in exits:
        torch.testing.assert_close(ours[k], refs[k].detach(), rtol=1e-4, atol=1e-5)
        # the penalty moves the loss well beyond ours' distance from the reference, so the test would
        # see it missing (the move is small: the tiny random model spreads its teacher over 49k tokens)
        assert abs(unpenalised[k] - ours[k]) > 10 * abs(ours[k] - refs[k].detach())
    for ours_grad, p in zip(chunked, params):
        assert (ours_grad - p.grad).norm() <= 1e-3 * p.grad.norm()


def test_penalty_is_refused_where_it_cannot_apply(text_corpus):
    plain = DataConfig((str(text_corpus),))
    with pytest.raises(ValueError, match="needs data.unlikely_repeats"):
        TrainConfig(data=plain, output_dir="out", max_steps=1, teacher_frequency_penalty=0.5)
    marked = DataConfig((str(text_corpus),), chat_template=True, unlikely_repeats=True)
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite number at least 0"):
            TrainConfig(data=marked, output_dir="out", max_steps=1, teacher_frequency_penalty=bad)
    TrainConfig(data=marked, output_dir="out", max_steps=1, teacher_frequency_penalty=3.0)  # above OpenAI's 2: a teacher may


def test_the_trainer_penalises_the_teacher_in_exit_answers_only(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Write about the sea, {i}.", "text": LOOP, "exit": "22" if i % 2 else "full"} for i in range(12)]
    common = dict(seq_len=32, chat_template=True, heldout_fraction=0.0, seed=1, unlikely_repeats=True)
    own = DataConfig(sources=(str(write_answers(tmp_path / "own.jsonl", rows)),), **common)
    plain = train_params(own, tiny_model_dir, tmp_path / "plain", 1.0)
    penalised = train_params(own, tiny_model_dir, tmp_path / "penalised", 1.0, teacher_frequency_penalty=1.0)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, penalised))

    # the full model's answers carry no ANSWER bit: the penalty changes nothing on them
    full = DataConfig(sources=(str(write_answers(tmp_path / "full.jsonl", [dict(r, exit="full") for r in rows])),),
                      **common)
    a = train_params(full, tiny_model_dir, tmp_path / "a", 1.0)
    b = train_params(full, tiny_model_dir, tmp_path / "b", 1.0, teacher_frequency_penalty=1.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_teacher_in_loops_keeps_the_kl_at_every_position_and_the_unlikely_tokens():
    ids = torch.tensor([[5, 6, 7, 6, 7, 6, 7, 9]])
    answer = repeat_marks.answer_marks(ids[0, 1:].tolist(), n=2)  # 6 7 6 7 6 7 9: repeats from the second "6 7"
    marks = torch.tensor([[NORMAL] + [m | ANSWER for m in answer]])
    keep, unlikely = repeat_marks.position_targets(ids, marks)
    keep_all, unlikely_all = repeat_marks.position_targets(ids, marks, kl_in_loops=True)
    assert keep.sum() < keep.numel()  # the loop drops the plain KL...
    assert torch.equal(keep_all, torch.ones_like(keep_all))  # ...the penalised teacher keeps it
    assert torch.equal(unlikely, unlikely_all) and (unlikely >= 0).any()


def test_teacher_in_loops_needs_the_penalty_and_changes_training(tmp_path, tiny_model_dir, text_corpus):
    marked = DataConfig((str(text_corpus),), chat_template=True, unlikely_repeats=True)
    with pytest.raises(ValueError, match="teacher_in_loops needs teacher_frequency_penalty"):
        TrainConfig(data=marked, output_dir="out", max_steps=1, teacher_in_loops=True)
    rows = [{"prompt": f"Write about the sea, {i}.", "text": LOOP, "exit": "22"} for i in range(12)]
    own = DataConfig(sources=(str(write_answers(tmp_path / "own.jsonl", rows)),), seq_len=32, chat_template=True,
                     heldout_fraction=0.0, seed=1, unlikely_repeats=True)
    outside = train_params(own, tiny_model_dir, tmp_path / "outside", 1.0, teacher_frequency_penalty=1.0)
    inside = train_params(own, tiny_model_dir, tmp_path / "inside", 1.0, teacher_frequency_penalty=1.0,
                          teacher_in_loops=True)
    assert any(not torch.allclose(a, b) for a, b in zip(outside, inside))
