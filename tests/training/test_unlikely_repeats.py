"""Unlikelihood on the exits' own loops: the marks, their packing, the loss against autograd, and
the trainer's wiring."""

from __future__ import annotations

import json

import pytest
import torch

from balcony_runtime.training import repeat_marks
from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.data import DataConfig, DataError, iter_documents, marks_of, training_stream
from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, final_normed, lm_logits
from balcony_runtime.training.loss import PositionTargets, distillation_loss
from balcony_runtime.training.repeat_marks import ANSWER, KIND, NO_TEACHER, NORMAL, UNLIKELY
from balcony_runtime.training.trainer import train

from .test_distillation_loss import kl_sum


def test_marks_start_at_the_first_repeated_run():
    answer = [1, 2, 3, 4, 5, 1, 2, 3, 4, 9, 1, 2, 3, 4]
    assert repeat_marks.repeats(answer) == [False] * 8 + [True, False, False, False, False, True]
    assert repeat_marks.answer_marks(answer) == [NORMAL] * 8 + [UNLIKELY, NO_TEACHER, NO_TEACHER, NO_TEACHER,
                                                                 NO_TEACHER, UNLIKELY]
    assert repeat_marks.answer_marks([1, 2, 3, 4, 5, 6]) == [NORMAL] * 6
    # runs in the prompt do not count: only the answer is searched; its tokens carry the ANSWER bit
    assert repeat_marks.document_marks([1, 2, 3, 4, 1, 2, 3, 4], answer_start=4) == [NORMAL] * 4 + [ANSWER] * 4
    assert repeat_marks.document_marks([7, 1, 2, 3, 4, 1, 2, 3, 4], answer_start=1) == (
        [NORMAL] + [NORMAL | ANSWER] * 7 + [UNLIKELY | ANSWER])


def test_position_targets_take_the_mark_of_the_next_token():
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    marks = torch.tensor([[NORMAL, NORMAL, UNLIKELY, NO_TEACHER], [UNLIKELY, NORMAL, NORMAL, UNLIKELY]])
    keep, unlikely = repeat_marks.position_targets(ids, marks)
    # position p predicts token p + 1; a row's last position sees no next token: plain KL
    assert keep.tolist() == [1, 0, 0, 1, 1, 1, 0, 1]
    assert unlikely.tolist() == [-1, 12, -1, -1, -1, -1, 23, -1]
    # the ANSWER bit does not change what a mark means here
    keep_a, unlikely_a = repeat_marks.position_targets(ids, marks | ANSWER)
    assert torch.equal(keep_a, keep) and torch.equal(unlikely_a, unlikely)


def unlikely_sum(student_logits: torch.Tensor, unlikely: torch.Tensor) -> torch.Tensor:
    """sum over marked positions of -log(1 - q_t), straight from a softmax (the reference)."""
    q = student_logits.float().softmax(-1).reshape(unlikely.numel(), -1)
    rows = (unlikely >= 0).nonzero().view(-1)
    return -(1 - q[rows, unlikely[rows]]).log().sum()


def masked_kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    p_log = teacher_logits.float().log_softmax(-1).reshape(keep.numel(), -1)
    q_log = student_logits.float().log_softmax(-1).reshape(keep.numel(), -1)
    return ((p_log.exp() * (p_log - q_log)).sum(-1) * keep).sum()


def rest_kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, unlikely: torch.Tensor) -> torch.Tensor:
    """sum over marked positions of KL(p' || q), p' the teacher's softmax with the marked token
    zeroed and renormalised (the reference; positions where p' is under MIN_REST are skipped)."""
    from balcony_runtime.training.loss import MIN_REST

    rows = (unlikely >= 0).nonzero().view(-1)
    p = teacher_logits.float().softmax(-1).reshape(unlikely.numel(), -1)[rows]
    p_t = p[torch.arange(rows.numel()), unlikely[rows]]
    p = p.clone()
    p[torch.arange(rows.numel()), unlikely[rows]] = 0
    p = p / p.sum(-1, keepdim=True)
    q_log = student_logits.float().log_softmax(-1).reshape(unlikely.numel(), -1)[rows]
    per_row = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q_log), 0.0).sum(-1)
    return (per_row * (1 - p_t >= MIN_REST)).sum()


@pytest.mark.parametrize("anchor", [False, True])
def test_unlikelihood_loss_and_gradients_equal_autograd(tiny_trainable, anchor):
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.arch.vocab_size, (2, 18), generator=g)
    with torch.no_grad():  # sharper exits: the repeat tokens get a real share of probability below
        for k in exits:
            model.balconies[str(k)].norm.mul_(40.0)
    states = backbone_pass(model, ids, set(exits))
    with torch.no_grad():
        teacher = lm_logits(model, final_normed(model, *states.final))  # [T, V]
        # push away from each exit's own favourite token at some positions (where the term is large)
        favourite = lm_logits(model, balcony_normed(model, exits[-1], states)).argmax(-1)  # [T]
    keep = (torch.rand(ids.numel(), generator=g) > 0.3).float()
    unlikely = torch.where(torch.rand(ids.numel(), generator=g) > 0.5, favourite, -1)
    weight, scale = 50.0, 1.0 / (ids.numel() * len(exits))
    balcony_params = list(model.balconies.parameters())

    ours = distillation_loss(model, states, exits, 5, scale, targets=PositionTargets(keep, unlikely, weight, anchor))
    chunked = [p.grad.clone() for p in balcony_params]
    assert all(p.grad is None for p in model.backbone_parameters())

    model.zero_grad(set_to_none=True)
    states = backbone_pass(model, ids, set(exits))
    students = {k: lm_logits(model, balcony_normed(model, k, states)) for k in exits}
    refs = {k: masked_kl_sum(teacher, students[k], keep) + weight * unlikely_sum(students[k], unlikely) for k in exits}
    if anchor:
        refs = {k: refs[k] + rest_kl_sum(teacher, students[k], unlikely) for k in exits}
    (sum(refs.values()) * scale).backward()
    for k in exits:
        torch.testing.assert_close(ours[k], refs[k].detach(), rtol=1e-4, atol=1e-5)
    # the term is not negligible beside the KL: the test would see it missing
    terms = sum(weight * unlikely_sum(students[k], unlikely).item() for k in exits)
    assert terms > 0.05 * sum(r.item() for r in refs.values())
    for ours_grad, p in zip(chunked, balcony_params):
        assert (ours_grad - p.grad).norm() <= 1e-3 * p.grad.norm()


def test_all_kept_and_nothing_unlikely_is_the_plain_kl(tiny_trainable):
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    ids = torch.randint(0, model.arch.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    targets = PositionTargets(torch.ones(12), torch.full((12,), -1), 1.0)
    with torch.no_grad():
        states = backbone_pass(model, ids, set(exits))
        plain = distillation_loss(model, states, exits, 5, None)
        marked = distillation_loss(model, states, exits, 5, None, targets=targets)
        teacher = lm_logits(model, final_normed(model, *states.final))
        for k in exits:
            torch.testing.assert_close(marked[k], plain[k])
            torch.testing.assert_close(plain[k], kl_sum(teacher, lm_logits(model, balcony_normed(model, k, states))),
                                       rtol=1e-4, atol=1e-5)


LOOP = "The sea is a sea of waves. The sea is a sea of waves. The sea is a sea of waves."


def write_answers(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_marks_fall_on_the_loops_of_exit_answers_only(tmp_path, default_model):
    tok = default_model.tokenizer
    data = write_answers(tmp_path / "own.jsonl", [
        {"prompt": "Write about the sea.", "text": LOOP, "exit": "22"},
        {"prompt": "Write about the sea.", "text": LOOP, "exit": "full"},
        {"prompt": "Write about the sea.", "text": LOOP},
    ])
    config = DataConfig((str(data),), seq_len=16, chat_template=True, heldout_fraction=0.0, unlikely_repeats=True)
    docs = list(iter_documents(config))
    from balcony_runtime.training.data import encode_document

    encoded = [encode_document(d, tok, config) for d in docs]
    marks = [marks_of(d, ids, tok, config) for d, ids in zip(docs, encoded)]
    assert all(m == [NORMAL] * len(ids) for m, ids in zip(marks[1:], encoded[1:]))  # the full model's, plain text
    own, ids = [m & KIND for m in marks[0]], encoded[0]
    answer_ids = tok.encode(LOOP, add_special_tokens=False)
    start = next(i for i in range(len(ids)) if ids[i : i + len(answer_ids)] == answer_ids)
    first = own.index(UNLIKELY)
    assert own[:first] == [NORMAL] * first and first > start
    # the ANSWER bit covers the answer (and the template's end of turn after it), not the prompt
    assert [bool(m & ANSWER) for m in marks[0]] == [i >= start for i in range(len(ids))]
    # every UNLIKELY token ends a run of 4 answer tokens seen before, and only those are marked
    for i in range(start, len(ids)):
        seen = any(ids[i - 3 : i + 1] == ids[j - 3 : j + 1] for j in range(start + 3, i))
        assert (own[i] == UNLIKELY) == (i >= start + 3 and seen), i
    assert set(own[first:]) == {UNLIKELY, NO_TEACHER}

    # packed, the marks travel with their tokens through every epoch's shuffle
    stream = training_stream(config, tok)
    flat_ids = torch.cat([stream.batch(i, 1).view(-1) for i in range(3 * stream.per_epoch)])
    flat_marks = torch.cat([stream.marks_batch(i, 1).view(-1) for i in range(3 * stream.per_epoch)]) & KIND
    unlikely_tokens = [t for t, m in zip(ids, own) if m == UNLIKELY]
    assert flat_marks.eq(UNLIKELY).any()
    assert set(flat_ids[flat_marks == UNLIKELY].tolist()) <= set(unlikely_tokens)
    plain = training_stream(DataConfig(config.sources, seq_len=16, chat_template=True, heldout_fraction=0.0), tok)
    assert plain.marks_batch(0, 1) is None
    assert torch.equal(plain.batch(0, 2), stream.batch(0, 2))


def test_unlikely_repeats_are_refused_where_they_cannot_apply(tmp_path, text_corpus):
    with pytest.raises(DataError, match="chat template"):
        DataConfig((str(text_corpus),), unlikely_repeats=True)
    with pytest.raises(DataError, match="local sources"):
        DataConfig(("hf:wikitext:train",), chat_template=True, unlikely_repeats=True)
    data = DataConfig((str(text_corpus),), chat_template=True, unlikely_repeats=True)
    with pytest.raises(ValueError, match="forward KL"):
        TrainConfig(data=data, output_dir="out", max_steps=1, reverse_kl_weight=0.5)
    with pytest.raises(ValueError, match="needs data.unlikely_repeats"):
        TrainConfig(data=DataConfig((str(text_corpus),)), output_dir="out", max_steps=1, unlikelihood_weight=1.0)
    with pytest.raises(ValueError, match="at least 0"):
        TrainConfig(data=data, output_dir="out", max_steps=1, unlikelihood_weight=-1.0)


def train_params(data: DataConfig, model_dir, output, weight: float, **extra) -> list[torch.Tensor]:
    from balcony_runtime.loader import load_model

    loaded = load_model(str(model_dir), adapters=None, exits=(1, 3), dtype="float32", device="cpu")
    config = TrainConfig(data=data, output_dir=str(output), model=str(model_dir), exits=(1, 3), device="cpu",
                         autocast="off", micro_batch_size=2, max_steps=3, log_every=1, save_every=100, kl_chunk=16,
                         lr=1e-2, unlikelihood_weight=weight, **extra)
    train(config, loaded=loaded, log=lambda _: None)
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert all(v == v and v >= 0 for r in log for v in r["loss"].values())  # finite, not negative
    return [p.detach().clone() for p in loaded.model.balconies.parameters()]


def test_the_trainer_applies_the_marks_of_exit_answers(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Write about the sea, {i}.", "text": LOOP, "exit": "22" if i % 2 else "full"} for i in range(12)]
    data = write_answers(tmp_path / "own.jsonl", rows)
    common = dict(sources=(str(data),), seq_len=32, chat_template=True, heldout_fraction=0.0, seed=1)
    plain = train_params(DataConfig(**common), tiny_model_dir, tmp_path / "plain", 0.0)
    masked = train_params(DataConfig(**common, unlikely_repeats=True), tiny_model_dir, tmp_path / "masked", 0.0)
    pushed = train_params(DataConfig(**common, unlikely_repeats=True), tiny_model_dir, tmp_path / "pushed", 5.0)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, masked))  # the KL is dropped in the loops
    assert any(not torch.allclose(a, b) for a, b in zip(masked, pushed))  # and the unlikelihood term trains

    # without exit answers in the data the marks change nothing
    full_only = write_answers(tmp_path / "full.jsonl", [dict(r, exit="full") for r in rows])
    common["sources"] = (str(full_only),)
    a = train_params(DataConfig(**common), tiny_model_dir, tmp_path / "a", 0.0)
    b = train_params(DataConfig(**common, unlikely_repeats=True), tiny_model_dir, tmp_path / "b", 5.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
