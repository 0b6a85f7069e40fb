"""A request's life inside the engine: its tokens, its exit, and what it has produced. No torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from balcony_runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from balcony_runtime.structured.request_grammar import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no cache blocks
    RUNNING = "running"  # holds cache blocks, scheduled every step
    FINISHED = "finished"


# eq=False: a request is an entity, equal only to itself. The generated field-by-field __eq__
# made every list.remove and `in` of the scheduler build and compare tuples of all fields for each
# element passed: a request finishing among hundreds running, or admitted from a deep queue, paid
# for every one ahead of it (docs/benchmarks.md).
@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    exit_layer: int  # backbone layers this request runs before its exit (num_layers = full depth)
    num_cache_layers: int  # cache layers it writes: exit_layer, plus one for a balcony
    arrival_time: float  # time.monotonic() when added
    eos_token_ids: frozenset[int] = frozenset()  # the tokenizer's end-of-sequence ids
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # leading tokens whose keys and values are in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    num_preemptions: int = 0  # times its blocks were taken back and its tokens recomputed
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    first_scheduled_time: float | None = None  # when it first ran (end of its queue wait)
    first_token_time: float | None = None  # when its first output token was sampled
    prompt_logprobs_done: bool = False  # prompt logprobs were computed (they survive preemption)
    deadline: float | None = None  # time.monotonic() by which it should finish (arrival + budget)
    waited_s: float = 0.0  # seconds of steps that skipped it (depth-limited) since it last ran
    grammar: RequestGrammar | None = None  # structured output: masks its sampling, advanced per token
    cache_layers: tuple[int, ...] = ()  # the cache layers it writes, in block-table order (prefix cache keys)
    # Another choice of the same prompt: admitted once that one's prompt is computed, so the prompt's
    # blocks are read from the prefix cache instead of being computed again.
    prefix_leader: "Request | None" = None
    # Its sampling reads its last token on the host (a grammar's mask, penalties) or reads back
    # more than the token (logprobs): an overlapped engine reads the step in flight before sampling
    # a step with it (LLMEngine.step).
    needs_sync: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``start:stop`` of prompt + output."""
        prompt = self.prompt_token_ids
        if stop <= len(prompt):
            return prompt[start:stop]
        return (prompt + self.output_token_ids)[start:stop]

    @property
    def num_remaining_steps(self) -> int:
        """Steps it still needs at least: one per token left to generate (the step that ends its
        prefill samples the first), and at least one (a prompt-scoring request's prefill)."""
        return max(1, self.params.max_tokens - len(self.output_token_ids))

    @property
    def waits_for_leader(self) -> bool:
        leader = self.prefix_leader
        return (leader is not None and leader.status is not RequestStatus.FINISHED
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
