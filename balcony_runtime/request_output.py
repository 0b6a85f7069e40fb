"""What the engine gives for a request: one RequestOutput per request per step (deltas), and a
whole request gathered from them (CompletedRequest). No torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # (annotations only: the sampler imports torch)
    from balcony_runtime.routing.router import RouteDecision
    from balcony_runtime.sampler import TokenLogprobs


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (deltas), plus its state."""

    request_id: str
    exit_layer: int  # backbone layers run (num_layers = full depth)
    new_token_ids: Sequence[int]  # tokens sampled this step (0 or 1)
    new_text: str  # text now safe to show
    new_logprobs: Sequence[TokenLogprobs]  # logprobs of new_token_ids, when asked for
    prompt_logprobs: list[TokenLogprobs] | None  # all prompt tokens after the first, once ready
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    # How its exit was chosen, on a request's final output (None on the others, and when the exit
    # was given with no router): one reference per request, not one per token sent to another process.
    route: RouteDecision | None = None
    latency_s: float | None = None  # arrival to finish, once finished
    budget_met: bool | None = None  # once finished with a budget: whether latency_s was within it
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache rather than computed


def output_row(*fields) -> tuple:
    """A step's output as the tuple of RequestOutput's fields (LLMEngine.emit_rows)."""
    return fields


def plain_output(make: Callable[..., RequestOutput | tuple], request_id: str, exit_layer: int, token: int,
                 text: str, num_prompt_tokens: int, num_output_tokens: int, arrival_time: float,
                 first_scheduled_time: float, first_token_time: float, num_cached_tokens: int) -> RequestOutput | tuple:
    """``make``'s output (RequestOutput, or emit_rows' tuple) for a plain request's token that
    does not end it: no logprobs, not finished, no route. Positional, in RequestOutput's field
    order (17 keyword arguments were a measurable share of a row's host time)."""
    return make(request_id, exit_layer, [token], text, (), None, num_prompt_tokens, num_output_tokens, False, None,
                arrival_time, first_scheduled_time, first_token_time, None, None, None, num_cached_tokens)


@dataclass(frozen=True, slots=True)
class RunColumns:
    """The fields of a steady decode's rows that stay the same from step to step (each a list in
    the rows' order; plain_outputs.PlainRun keeps them for the run)."""

    request_ids: list[str]
    exit_layers: list[int]
    num_prompt_tokens: list[int]
    arrival_times: list[float]
    first_scheduled_times: list[float]
    first_token_times: list[float]
    num_cached_tokens: list[int]


class StepOutputs(Sequence):
    """One step's outputs for the plain rows of a steady decode (none ending, none asking for
    logprobs), as columns: what changes per step (token, text, output count) beside a run's
    RunColumns. Each row's output (``make``'s: a RequestOutput, or emit_rows' tuple) is made when
    the rows are first read, by whoever reads them: the server's event loop, or the HTTP process
    after the columns crossed the pipe (pickled as columns, not as a tuple per row). The engine's
    step, which the device waits for, then makes no object per row (docs/benchmarks.md, "Outputs
    as columns")."""

    __slots__ = ("columns", "tokens", "texts", "num_output_tokens", "make", "_items")

    def __init__(self, columns: RunColumns, tokens: list[int], texts: list[str], num_output_tokens: list[int],
                 make: Callable[..., RequestOutput | tuple] = RequestOutput):
        self.columns = columns
        self.tokens = tokens  # [B] each row's new token
        self.texts = texts  # [B] the text it completes
        self.num_output_tokens = num_output_tokens  # [B] each row's output tokens, this one included
        self.make = make
        self._items: list | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self._made()[index]

    def __iter__(self):
        return iter(self._made())

    def __reduce__(self):
        return StepOutputs, (self.columns, self.tokens, self.texts, self.num_output_tokens, self.make)

    def _made(self) -> list:
        if self._items is None:
            c = self.columns
            self._items = list(map(
                partial(plain_output, self.make), c.request_ids, c.exit_layers, self.tokens, self.texts,
                c.num_prompt_tokens, self.num_output_tokens, c.arrival_times, c.first_scheduled_times,
                c.first_token_times, c.num_cached_tokens))
        return self._items


@dataclass
class CompletedRequest:
    """A whole request's output, accumulated from its step outputs."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    exit_layer: int | None = None
    route: RouteDecision | None = None  # how its exit was chosen, when routed
    latency_s: float | None = None  # arrival to finish
    budget_met: bool | None = None  # with a budget: whether latency_s was within it
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache
    # The text's pieces, joined when it is read: appending each token's text to one string copied
    # the whole text every token (a stream's server side reads it once, at its end).
    _pieces: list[str] = field(default_factory=list, repr=False)
    text_length: int = 0  # len(text), kept as pieces come

    @property
    def text(self) -> str:
        pieces = self._pieces
        if len(pieces) != 1:
            self._pieces = pieces = ["".join(pieces)]
        return pieces[0]

    def absorb(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        if out.new_text:
            self._pieces.append(out.new_text)
            self.text_length += len(out.new_text)
        self.logprobs.extend(out.new_logprobs)
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        self.finish_reason = out.finish_reason
        self.exit_layer = out.exit_layer
        self.route = out.route
        self.latency_s = out.latency_s if out.finished else self.latency_s
        self.budget_met = out.budget_met if out.finished else self.budget_met
        self.num_cached_tokens = out.num_cached_tokens
