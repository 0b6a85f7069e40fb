"""response_format json_object and json_schema through the official openai client, on a live server."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

MODEL = "smollm2-135m"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe Alice, 30, who lives in Paris, as JSON."}]
STRICT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
SHALLOW = {"X-Balcony-Exit": "8"}  # a fresh balcony: its text is noise, so only the grammar makes it JSON


def test_json_schema_reply_parses_and_validates(default_server):
    out = default_server.openai().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0, response_format=STRICT)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_holds_at_a_shallow_exit_and_when_streamed(default_server):
    chunks = list(default_server.openai().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0.7, seed=5, response_format=STRICT,
        stream=True, extra_headers=SHALLOW))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_on_completions(default_server):
    out = default_server.openai().completions.create(
        model=MODEL, prompt="A JSON object describing a cat:", max_tokens=30, temperature=0,
        extra_body={"response_format": {"type": "json_object"}}, extra_headers=SHALLOW)
    text = out.choices[0].text
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":  # else max_tokens cut it, which still applies
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_invalid_schema_is_a_400_naming_response_format(default_server, path):
    body = {"model": MODEL, "max_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}}}
    body.update({"messages": ASK} if "chat" in path else {"prompt": "hi"})
    r = httpx.post(default_server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and "nope" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_response_format_is_refused_by_the_sdk_call(default_server):
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        default_server.openai().chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5, response_format={"type": "json_schema"})
