"""What the engine gives for a request: one RequestOutput per request per step (deltas), and a
whole request gathered from them (CompletedRequest). No torch."""

from __future__ import annotations

from dataclasses import dataclass, field
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
