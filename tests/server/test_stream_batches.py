"""Outputs that wait together go out together: a stream's reader takes every output already queued
in one list, and a streaming response sends that list's events in one write, each event intact."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch

from balcony_runtime.request_output import RequestOutput
from balcony_runtime.routing.router import RouteDecision
from balcony_runtime.sampling_params import SamplingParams
from server.async_engine import AsyncEngine, EngineFailed, Submission, _Stream
from server.completions import stream_completion
from server.generation_group import ChoiceSpec
from server.metrics import ServerMetrics
from server.output_stream import OutputStream
from server.protocol import CompletionRequest


def output(k: int, text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id="r", exit_layer=4, new_token_ids=[100 + k], new_text=text, new_logprobs=[],
                         prompt_logprobs=None, num_prompt_tokens=2, num_output_tokens=k + 1, finished=finished,
                         finish_reason="length" if finished else None, arrival_time=0.0,
                         first_scheduled_time=0.0, first_token_time=0.0)


def front() -> AsyncEngine:
    """An AsyncEngine whose step loop never starts: the test fills a stream's queue itself."""
    engine = SimpleNamespace(model=SimpleNamespace(norm=torch.zeros(1, device="meta"), full_depth=4))
    return AsyncEngine(engine, ServerMetrics(), max_queued=4)


def submission(queue: OutputStream) -> Submission:
    decision = RouteDecision(exit_layer=4, budget_ms=None, predicted_ms=1.0, predicted_fit=None, forced=False)
    return Submission("r", decision, _Stream(queue, decision, 0.0, 2))


def test_outputs_queued_together_are_read_as_one_list_and_later_ones_as_the_next():
    async def main():
        queue, engine = OutputStream(), front()
        for k, text in enumerate("abc"):
            queue.put(output(k, text))
        stream = engine.stream(submission(queue))
        first = await anext(stream)
        queue.put(output(3, "d", finished=True))
        queue.put(output(4, "never read"))  # (nothing follows a finished output)
        rest = [batch async for batch in stream]
        return first, rest

    first, rest = asyncio.run(main())
    assert [o.new_text for o in first] == ["a", "b", "c"]
    assert [[o.new_text for o in batch] for batch in rest] == [["d"]]


def test_an_error_after_queued_outputs_delivers_them_first():
    async def main():
        queue, seen = OutputStream(), []
        queue.put(output(0, "a"))
        queue.put(output(1, "b"))
        queue.put(EngineFailed("the step failed"))
        with pytest.raises(EngineFailed):
            async for batch in front().stream(submission(queue)):
                seen.append([o.new_text for o in batch])
        return seen

    assert asyncio.run(main()) == [["a", "b"]]


class BatchedGroup:
    """What stream_completion reads of a GenerationGroup: outputs arriving in the given lists."""

    def __init__(self, batches: list[list[RequestOutput]]):
        self.id, self.request_ids, self._batches = "g", ["g-0"], batches
        self.specs = [ChoiceSpec([1, 2], SamplingParams(max_tokens=8), 0)]

    def balcony_info(self, measured_ms):
        return {"exit": "full"}

    def measured_ms(self) -> float:
        return 1.0

    async def batches(self):
        for batch in self._batches:
            yield [(0, out) for out in batch]


def events_of(writes: list[bytes]) -> list[dict | str]:
    """The SSE events in a response's writes, as a client splits them (at blank lines)."""
    text = b"".join(writes).decode()
    assert text.endswith("\n\n")
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.mark.parametrize("grouping", [[1, 1, 1, 1], [3, 1], [4]])
def test_a_list_of_outputs_is_one_write_carrying_the_same_events(grouping):
    texts = ["Hel", "lo", ", wor", "ld"]
    outputs = [output(k, t, finished=k == len(texts) - 1) for k, t in enumerate(texts)]
    batches, at = [], 0
    for size in grouping:
        batches.append(outputs[at:at + size])
        at += size
    body = CompletionRequest(model="m", prompt="hi", max_tokens=8, stream=True,
                             stream_options={"include_usage": True, "continuous_usage_stats": True})

    async def main():
        return [w async for w in stream_completion(body, BatchedGroup(batches), None, "m")]

    writes = asyncio.run(main())
    assert len(writes) == len(grouping) + 2  # the token writes, then the usage chunk and [DONE]
    events = events_of(writes)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-2]]
    assert [c["text"] for c in chunks] == texts  # one event per token, however they were written
    assert [c["finish_reason"] for c in chunks] == [None, None, None, "length"]
    # continuous usage counts each event's own tokens, not the write's
    assert [e["usage"]["completion_tokens"] for e in events[:-2]] == [1, 2, 3, 4]
    assert "balcony" in events[0] and all("balcony" not in e for e in events[1:-2])
