"""Sampling settings an operator gives the requests that leave them out.

``balcony serve --override-generation-config '{"frequency_penalty": 0.5}'`` (vLLM's flag name and
JSON form): a request that omits a field gets the operator's value instead of the API's default;
a request that sends the field, even at the API's default, keeps its own. The reason here is the
exits: under greedy decoding they fall into loops far more often than the full model, and a small
frequency penalty removes most of them (docs/training.md, "Decoding against the loops"); an
operator whose clients send no penalty can set one for them.

Only the decoding fields are offered: they change how tokens are chosen, never what a request asks
for (its length, stop strings, logprobs or format). The values are checked against the API's own
ranges (server/protocol.py) when the server starts.
"""

from __future__ import annotations

import argparse
import json

from pydantic import BaseModel, ValidationError

from server.protocol import CompletionRequest

FIELDS = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty")
FLAG = "--override-generation-config"

SamplingDefaults = tuple[tuple[str, float], ...]  # (field, value) pairs, sorted by field


def parse_sampling_defaults(text: str) -> SamplingDefaults:
    """The JSON object of FLAG as (field, value) pairs; ValueError naming what is wrong (argparse
    puts the flag's name before it)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected a JSON object such as '{{\"frequency_penalty\": 0.5}}': {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object such as '{{\"frequency_penalty\": 0.5}}', got {text!r}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"sets {', '.join(FIELDS)}; not {', '.join(map(repr, unknown))}")
    try:  # the API's own ranges and types, as a request would be checked
        checked = CompletionRequest(model="-", prompt="", **raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(problems) from None
    return tuple((name, getattr(checked, name)) for name in sorted(raw))


def sampling_defaults_option(text: str) -> SamplingDefaults:
    """argparse ``type`` of FLAG: a usage error (exit status 2) instead of a traceback."""
    try:
        return parse_sampling_defaults(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def with_sampling_defaults(body: BaseModel, defaults: SamplingDefaults) -> BaseModel:
    """``body`` with the defaults in the fields its client did not send (``body`` itself if none)."""
    missing = {name: value for name, value in defaults if name not in body.model_fields_set}
    return body.model_copy(update=missing) if missing else body


def describe(defaults: SamplingDefaults) -> str:
    return ", ".join(f"{name} {value}" for name, value in defaults)
