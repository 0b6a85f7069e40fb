"""A steady decode's outputs as columns, when every row is plain (LLMEngine._postprocess).

Under steady load most steps are a steady decode (scheduler.DecodeRun: the same requests, one token
each) whose requests are plain (engine._Tracked.plain_text: no stop strings, logprobs, prompt
logprobs or grammar). Then a step's outputs differ from the last step's only in each row's token,
its text and its output count: the rest is kept for the run (RunColumns), the checks that a row
ends (a stop token, its length) are one set operation and a flag of the plan's (DecodeRun.ends_a_row),
and the tokens are placed with one C-level pass. What is left per row is its text. Any row that
could end, and any step after a request finished or was aborted, goes down the engine's row-by-row
path instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter, call
from typing import TYPE_CHECKING

import numpy as np

from balcony_runtime.request import Request
from balcony_runtime.request_output import RequestOutput, RunColumns, StepOutputs
from balcony_runtime.scheduler import DecodeRun

if TYPE_CHECKING:  # (the engine imports this module)
    from balcony_runtime.engine import _Tracked


@dataclass(frozen=True, slots=True)
class PlainRun:
    """What a steady decode of plain requests keeps from its first step to its last."""

    requests: list[Request]  # DecodeRun.requests, whose identity marks the run
    columns: RunColumns
    output_lists: list[list[int]]  # each row's request.output_token_ids (grown in place)
    text_of: list[Callable[[int], str]]  # each row's detokenizer step (_Tracked.plain_text)
    stop_ids: frozenset[int]  # every row's stop tokens together
    output_from_start: np.ndarray  # [B] int64 2 - prompt length: a row fed token `start` samples output token start + this

    @classmethod
    def of(cls, requests: list[Request], tracked: Mapping[str, "_Tracked"]) -> "PlainRun | None":
        """The run's kept columns; None unless every row is a plain request. Every row must be past
        its first token (its first_token_time is kept)."""
        rows = [tracked.get(r.request_id) for r in requests]
        if any(t is None or t.plain_text is None for t in rows):
            return None
        num_prompt = [len(r.prompt_token_ids) for r in requests]
        columns = RunColumns(
            [r.request_id for r in requests], [r.exit_layer for r in requests], num_prompt,
            [r.arrival_time for r in requests], [r.first_scheduled_time for r in requests],
            [r.first_token_time for r in requests], [r.num_cached_tokens for r in requests])
        return cls(requests, columns, [r.output_token_ids for r in requests],
                   list(map(attrgetter("plain_text"), rows)), frozenset().union(*(t.stop_ids for t in rows)),
                   2 - np.array(num_prompt, dtype=np.int64))

    def outputs(self, run: DecodeRun, tokens: list[int], positions: list[int | None] | None,
                make: Callable[..., RequestOutput | tuple]) -> StepOutputs | None:
        """This step's outputs, its tokens placed in the requests' outputs and their text read; None
        (nothing changed) if some row may end with it: the row-by-row path then takes the step.

        ``run``: the plan's; ``tokens``: each row's sampled token, in the rows' order;
        ``positions``: where each row's placeholder sits (overlapped steps), else None."""
        if run.ends_a_row or not self.stop_ids.isdisjoint(tokens):  # a row's last token, or a stop
            return None
        # A decode row fed token `start` samples output token number start - prompt + 2 (a later
        # step's placeholder may already follow it; its own sits at start - prompt + 1).
        num_output = run.starts + self.output_from_start  # [B]
        if positions is None:
            deque(map(list.append, self.output_lists, tokens), maxlen=0)  # (a loop in C)
        else:
            deque(map(list.__setitem__, self.output_lists, positions, tokens), maxlen=0)  # over the placeholders
        texts = list(map(call, self.text_of, tokens))  # (a lookup per row first measured no faster)
        return StepOutputs(self.columns, tokens, texts, num_output.tolist(), make)
