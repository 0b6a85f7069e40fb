"""SSE events: each is one ``data:`` line of JSON that the standard library reads back to the payload."""

from __future__ import annotations

import json
import math

from server import sse


def test_an_event_reads_back_to_its_payload_with_non_ascii_text():
    payload = {"id": "cmpl-1", "choices": [{"index": 0, "text": "Ça coûte 5 €, 東京 🙂\n\"q\"", "logprobs": None,
                                             "finish_reason": None}], "usage": {"prompt_tokens": 3}}
    event = sse.event(payload)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[len(b"data: "):].decode()) == payload


def test_non_finite_floats_become_null_so_strict_clients_can_parse():
    event = sse.event({"logprob": -math.inf, "x": math.nan, "top": {"a": -1.5}})
    # json.loads accepts the non-standard -Infinity/NaN; a strict parser would not: parse strictly.
    strict = json.loads(event[6:], parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert strict == {"logprob": None, "x": None, "top": {"a": -1.5}}


def test_done_is_the_openai_terminator():
    assert sse.DONE == b"data: [DONE]\n\n"


def test_text_events_are_the_bytes_event_writes():
    import random

    rng = random.Random(0)
    alphabet = ["a", " ", "\"", "\\", "\n", "\t", "\u0000", "\u2028", "é", "東", "🙂", "@", "9", "}", "data: "]

    def completion(index, text):
        return {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "org/model:1",
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": None}]}

    def chat(index, text):
        return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}

    for make in (completion, chat):
        events = sse.text_events(make)
        for _ in range(300):
            index, text = rng.randrange(12), "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
            assert events(index, text) == sse.event(make(index, text))


def test_a_payload_that_holds_a_sentinel_is_not_templated():
    assert sse.text_events(lambda index, text: {"model": "987654321987654", "index": index, "text": text}) is None
    assert sse.text_events(lambda index, text: {"text": text, "index": index}) is None  # text before index
