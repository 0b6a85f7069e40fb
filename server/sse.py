"""Server-sent events as the OpenAI streaming API sends them: ``data: <json>`` and a final ``[DONE]``.

Encoded with orjson: a streamed token is one event, and the standard library's encoder was a fifth
of the event loop's time per token with 256 streams (docs/benchmarks.md). orjson also writes
non-finite floats as null, where ``json.dumps`` writes ``NaN``/``Infinity``, which is not JSON.
"""

from __future__ import annotations

import orjson

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    """One SSE event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


_INDEX = 987_654_321_987_654  # sentinels: serialized once in a template, found, and cut out
_TEXT = "@@balcony-text-sentinel@@"


def text_events(make) -> "TextEvents | None":
    """A :class:`TextEvents` for ``make``, or None where its payload cannot be templated (a model
    name holding a sentinel): the caller then builds every event whole."""
    try:
        return TextEvents(make)
    except ValueError:
        return None


class TextEvents:
    """Events of one streamed response that differ only in a choice's index and text, written as
    :func:`event` writes them, byte for byte, without building and serializing the whole payload
    each time: most of a stream's events are one token's text. ``make(index, text)`` gives the
    payload; it is serialized once with sentinels, and each event splices the index and the text
    (serialized alone) between the fixed pieces."""

    def __init__(self, make):
        template = event(make(_INDEX, _TEXT))
        index, text = str(_INDEX).encode(), orjson.dumps(_TEXT)
        if template.count(index) != 1 or template.count(text) != 1 or template.index(index) > template.index(text):
            raise ValueError("the payload must hold the index, then the text, once each")
        head, rest = template.split(index)
        self._head, (self._middle, self._tail) = head, rest.split(text)
        self._prefix: dict[int, bytes] = {}  # index -> everything before the text

    def __call__(self, index: int, text: str) -> bytes:
        prefix = self._prefix.get(index)
        if prefix is None:
            prefix = self._prefix[index] = self._head + str(index).encode() + self._middle
        return prefix + orjson.dumps(text) + self._tail
