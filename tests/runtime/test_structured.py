"""The structured package with the real SmolLM2 tokenizer: compiling, caching, masks, completion."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from balcony_runtime.structured.compiler import GrammarCompiler, InvalidGrammar
from balcony_runtime.structured.constraint import StructuredOutput
from balcony_runtime.structured.token_masks import MaskFiller, mask_logits

# Every value is bounded, so a walk over allowed tokens always ends.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def compiler(default_model):
    return GrammarCompiler(default_model.tokenizer, default_model.model.arch.vocab_size)


def vocab(tokenizer) -> int:
    return len(tokenizer)


def allowed_tokens(logits_row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits_row).nonzero().flatten().tolist())


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "frobnicate"}, "frobnicate"),
    ({"type": "object", "properties": {"a": {"$ref": "#/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(("}, "regex"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
])
def test_invalid_schemas_raise_with_the_reason(compiler, schema, fragment):
    with pytest.raises(InvalidGrammar, match="invalid JSON schema") as info:
        compiler.matcher(StructuredOutput.of_schema(schema))
    assert fragment in str(info.value)


def test_constraint_refuses_text_that_is_not_a_schema():
    with pytest.raises(ValueError):
        StructuredOutput("[1, 2]")
    with pytest.raises(ValueError):
        StructuredOutput("{not json")


def test_schema_compiled_once_and_each_request_gets_its_own_state(compiler, tokenizer):
    person = StructuredOutput.of_schema(PERSON)
    assert compiler.matcher(person) is compiler.matcher(person)
    first, second = compiler.new_state(person), compiler.new_state(person)
    for token in tokenizer.encode('{"name":"', add_special_tokens=False):
        assert not first.accept(token)
    # The second state (and the cached original) still stand at the start: only '{' may come.
    logits = torch.zeros(2, vocab(tokenizer))
    mask_logits(logits, [first, second])
    at_start = allowed_tokens(logits[1])
    assert at_start and all(tokenizer.decode([t]).startswith("{") for t in at_start)
    assert allowed_tokens(logits[0]) != at_start


def test_cache_drops_the_least_recently_used_schema(default_model):
    compiler = GrammarCompiler(default_model.tokenizer, default_model.model.arch.vocab_size, cache_size=2)
    a, b, c = (StructuredOutput.of_schema({"type": "object", "properties": {k: {"type": "integer"}}}) for k in "abc")
    kept_a = compiler.matcher(a)
    compiler.matcher(b)
    assert compiler.matcher(a) is kept_a  # a is now the most recent
    compiler.matcher(c)  # evicts b
    assert compiler.matcher(a) is kept_a
    assert list(compiler._cache) == [c, a]


def test_mask_touches_only_constrained_rows(compiler, tokenizer):
    torch.manual_seed(0)
    logits = torch.randn(3, vocab(tokenizer))
    before = logits.clone()
    mask_logits(logits, [None, compiler.new_state(StructuredOutput.json_object()), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = allowed_tokens(logits[1])
    brace = tokenizer.convert_tokens_to_ids("{")
    assert brace in allowed and len(allowed) < 200
    assert torch.equal(logits[1, sorted(allowed)], before[1, sorted(allowed)])  # allowed logits unchanged


def test_prefetched_masks_equal_masks_filled_in_place_and_stale_ones_are_ignored(compiler, tokenizer):
    person = StructuredOutput.of_schema(PERSON)
    states = [compiler.new_state(person) for _ in range(3)]
    for token in tokenizer.encode('{"name":"Al', add_special_tokens=False):
        states[1].accept(token)
    filler = MaskFiller(vocab(tokenizer))
    try:
        filler.prefetch(states)
        states[2].accept(tokenizer.convert_tokens_to_ids("{"))  # moves on: its prefetched mask is stale
        prefetched = torch.zeros(3, vocab(tokenizer))
        mask_logits(prefetched, states)
    finally:
        filler.close()
    in_place = torch.zeros(3, vocab(tokenizer))
    mask_logits(in_place, states)
    assert torch.equal(prefetched, in_place)
    assert allowed_tokens(in_place[2]) != allowed_tokens(in_place[0])  # the stale mask was not used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_under_the_mask_always_yields_schema_valid_json(compiler, tokenizer, seed):
    """Random logits, masked, argmax: whatever the model prefers, the output parses and validates."""
    g = torch.Generator().manual_seed(seed)
    state = compiler.new_state(StructuredOutput.of_schema(PERSON))
    tokens = []
    for _ in range(80):
        logits = torch.randn(1, vocab(tokenizer), generator=g)
        mask_logits(logits, [state])
        token = int(logits.argmax())
        tokens.append(token)
        if state.accept(token):
            break
    else:
        pytest.fail(f"the grammar never completed: {tokenizer.decode(tokens)!r}")
    value = json.loads(tokenizer.decode(tokens, skip_special_tokens=True))
    jsonschema.validate(value, PERSON)


def test_completion_is_reported_when_the_object_closes(compiler, tokenizer):
    state = compiler.new_state(StructuredOutput.json_object())
    tokens = tokenizer.encode('{"a":[1,2]}', add_special_tokens=False)
    assert [state.accept(t) for t in tokens] == [False] * (len(tokens) - 1) + [True]


def test_objects_that_list_their_properties_are_closed_unless_the_schema_says_otherwise():
    from balcony_runtime.structured.compiler import closed_objects

    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a key named "properties"
        "open": {"type": "object", "properties": {}, "additionalProperties": True},
        "list": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "string"}}}},
    }, "$defs": {"d": {"type": "object", "properties": {"z": {}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]  # the name -> schema map itself is untouched
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed_objects({"type": "object"}) == {"type": "object"}  # json_object stays open
    assert closed_objects({"type": "number"})["multipleOf"] == 1e-6  # a bounded fraction
    assert closed_objects({"type": ["number", "null"], "multipleOf": 0.5})["multipleOf"] == 0.5
