"""Which tokens of an exit's own answer teach it to loop, and what the trainer does with them.

An exit's greedy answer often falls into a loop (a run of tokens written again and again). Once
it has, the full model would mostly continue the loop too (copying from context is as easy for the
teacher as for the student: docs/training.md "Why the exits loop"), so distilling on that text
teaches looping. Token-level unlikelihood (Welleck et al. 2019, "Neural text generation with
unlikelihood training") trains the student *against* a token it should not write: loss
-log(1 - q(token)). Here, in answers an exit wrote itself:

- a token that ends a run of ``RUN_TOKENS`` tokens already written earlier in the answer is
  UNLIKELY: the prediction of that token is pushed away from it and not toward the teacher;
- every other token from the first repeat on is NO_TEACHER: the context is the loop, where the
  teacher's distribution teaches looping, so no KL is taken;
- tokens before the first repeat (the prompt, the fresh part of the answer) keep the plain KL.

Marks are per token: mark[t] says what happens to the prediction *of* token t (made at t - 1).
Every token of an own answer also carries the ANSWER bit, so a frequency penalty on the teacher
(``answer_counts``) can count what the answer has written so far.
"""

from __future__ import annotations

import torch

NORMAL, UNLIKELY, NO_TEACHER = 0, 1, 2
KIND = 3  # the bits of a mark that hold NORMAL / UNLIKELY / NO_TEACHER
ANSWER = 4  # bit set on every token of an exit's own answer
RUN_TOKENS = 4  # the loop rule of bench/exit_samples.py: a run of 4 tokens seen again


def repeats(answer: list[int], n: int = RUN_TOKENS) -> list[bool]:
    """Per token: whether the run of ``n`` tokens it ends was already in the answer."""
    seen, marks = set(), []
    for i in range(len(answer)):
        gram = tuple(answer[max(0, i - n + 1) : i + 1])
        marks.append(i >= n - 1 and gram in seen)
        seen.add(gram)
    return marks


def answer_marks(answer: list[int], n: int = RUN_TOKENS) -> list[int]:
    """NORMAL up to the first repeated run; from there UNLIKELY on repeats and NO_TEACHER elsewhere."""
    flags = repeats(answer, n)
    first = next((i for i, r in enumerate(flags) if r), len(answer))
    return [NORMAL] * first + [UNLIKELY if r else NO_TEACHER for r in flags[first:]]


def document_marks(ids: list[int], answer_start: int, n: int = RUN_TOKENS) -> list[int]:
    """Marks of a whole encoded document whose answer begins at ``answer_start``; the tokens after
    the answer (the template's end of turn) follow the answer's last mark's rule: NO_TEACHER once
    the answer has looped."""
    return [NORMAL] * answer_start + [m | ANSWER for m in answer_marks(ids[answer_start:], n)]


def position_targets(ids: torch.Tensor, marks: torch.Tensor, kl_in_loops: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of a packed batch, from its token marks: (kl_keep, unlikely).

    ids, marks: [B, S]. Position p predicts token p + 1, so it takes that token's mark; the last
    position of a row predicts a token in the next row, which it cannot see: plain KL.
    kl_keep: [B * S] float, 1 where the KL toward the full model is taken (everywhere with
    ``kl_in_loops``, for a teacher that is penalised inside the answers and so does not loop).
    unlikely: [B * S] int64, the token id to push away from, or -1.
    """
    kind = marks & KIND
    nxt = torch.full_like(kind, NORMAL)
    nxt[:, :-1] = kind[:, 1:]
    unlikely = torch.full_like(ids, -1)
    unlikely[:, :-1] = torch.where(kind[:, 1:] == UNLIKELY, ids[:, 1:], -1)
    kl_keep = torch.ones_like(nxt, dtype=torch.float32) if kl_in_loops else (nxt == NORMAL).float()
    return kl_keep.reshape(-1), unlikely.reshape(-1)


def answer_counts(ids: torch.Tensor, marks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What each position of a packed batch has already written of its answer, as pairs.

    ids, marks: [B, S]. Returns (positions, tokens), [P] int64 each, positions flattened over B * S:
    one pair (p, ids[i]) for every answer token i at or before p in the same answer and row. Summed
    per position, the pairs count each token's occurrences so far: what OpenAI's frequency penalty
    subtracts from the logits of the prediction made at p. A row that begins inside an answer counts
    from the row's start, which is all the model sees of it.
    """
    flags = ((marks & ANSWER) != 0).to(torch.int8)  # [B, S]
    zero = torch.zeros((flags.shape[0], 1), dtype=torch.int8, device=flags.device)
    edges = torch.diff(flags, prepend=zero, append=zero)  # [B, S + 1]: +1 where a run starts, -1 after it ends
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()  # row-major, so the k-th start pairs the k-th end
    seq_len = ids.shape[1]
    positions, tokens = [], []
    for (row, start), (_, end) in zip(starts.tolist(), ends.tolist()):
        at, written = torch.tril_indices(end - start, end - start, device=ids.device)  # written <= at
        positions.append(row * seq_len + start + at)
        tokens.append(ids[row, start + written])
    if not positions:
        empty = torch.zeros(0, dtype=torch.long, device=ids.device)
        return empty, empty
    return torch.cat(positions), torch.cat(tokens)
