"""Structured outputs inside the engine: constrained and free rows share batches at every exit."""

from __future__ import annotations

import json

import jsonschema
import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.errors import RequestError
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.structured.constraint import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "word": {"type": "string", "maxLength": 6},
    },
    "required": ["colour", "ok", "n", "word"],
    "additionalProperties": False,
}
CONSTRAINED = SamplingParams(max_tokens=40, temperature=0, structured=StructuredOutput.of_schema(SCHEMA))
FREE = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Three colours:"]


def run(engine: LLMEngine, requests: list[tuple[str, SamplingParams, int]]) -> dict[str, object]:
    """Queue every request before the first step, so they share batches; outputs by request id."""
    from balcony_runtime.request_output import CompletedRequest

    done = {}
    for i, (prompt, params, exit_layer) in enumerate(requests):
        rid = engine.add_request(prompt, params, exit_layer, request_id=f"r{i}")
        done[rid] = CompletedRequest(rid)
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id].absorb(out)
    return done


def test_mixed_batch_constrains_only_its_grammar_rows_at_every_exit(tiny_model):
    exits = (*tiny_model.model.exits, tiny_model.model.full_depth)  # 1, 2, 3 and the full 4
    free = [(PROMPTS[i], FREE, e) for i, e in enumerate(exits)]
    constrained = [(PROMPTS[i], CONSTRAINED, e) for i, e in enumerate(exits)]
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024))
    alone = run(engine, free)
    mixed = run(engine, [row for pair in zip(free, constrained) for row in pair])
    mixed = list(mixed.values())
    for k, exit_layer in enumerate(exits):
        free_row, grammar_row = mixed[2 * k], mixed[2 * k + 1]
        assert free_row.exit_layer == grammar_row.exit_layer == exit_layer
        # A constrained neighbour changes nothing in a free row's greedy output.
        assert free_row.token_ids == alone[f"r{k}"].token_ids
        assert grammar_row.finish_reason == "stop", grammar_row.text
        jsonschema.validate(json.loads(grammar_row.text), SCHEMA)


def test_max_tokens_still_cuts_a_constrained_request(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=256))
    params = SamplingParams(max_tokens=3, temperature=0, structured=StructuredOutput.of_schema(SCHEMA))
    out = engine.generate([PROMPTS[0]], params)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith("{")


def test_sampled_constrained_rows_stay_valid(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512))
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured=StructuredOutput.of_schema(SCHEMA))
    for out in engine.generate(PROMPTS, params):
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_invalid_schema_is_a_request_error_and_queues_nothing(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=64))
    with pytest.raises(RequestError, match="Invalid type"):
        engine.add_request(PROMPTS[0], SamplingParams(structured=StructuredOutput.of_schema({"type": "nope"})))
    assert not engine.has_unfinished()
