"""Tool calls through the official openai client, on a live server: forced ones by constrained
decoding, "auto" ones read out of the text by the chat template's call format."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server.tool_calls import parsed_message
from server.tool_parsers import PARSERS

MODEL = "smollm2-135m"
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_tool_call(default_server):
    out = default_server.openai().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=40, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    check_call(call.function.name, call.function.arguments)


def test_named_tool_call_streamed_as_openai_streams_it(default_server):
    chunks = list(default_server.openai().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=30, temperature=0, stream=True, extra_headers={"X-Balcony-Exit": "8"}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "add" and first.function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    check_call("add", "".join(d.function.arguments for d in deltas))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_required_tool_call_streamed_matches_the_whole_reply(default_server):
    client = default_server.openai()
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=40, temperature=0,
                  extra_headers={"X-Balcony-Exit": "15"})
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == whole.message.tool_calls[0].function.name
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == whole.message.tool_calls[0].function.arguments
    check_call(deltas[0].function.name, arguments)
    assert whole.finish_reason == "tool_calls"


@pytest.mark.parametrize("choice", ["auto", None])
def test_auto_is_a_400_naming_the_model_when_its_template_declares_no_tools(default_server, choice):
    extra = {} if choice is None else {"tool_choice": choice}
    with pytest.raises(openai.BadRequestError) as info:
        default_server.openai().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=5, **extra)
    error = info.value.body
    assert error["param"] == "tool_choice" and MODEL in error["message"] and "required" in error["message"]


def test_none_decodes_text_and_unknown_named_function_is_refused(default_server):
    client = default_server.openai()
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                         max_tokens=4, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="nope"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_auto_reads_calls_out_of_the_text_when_the_template_declares_them(hermes_server):
    # The tiny model's text is noise, so what it says is not the point: auto's reply must be the
    # hermes parse of the very text tool_choice "none" gets from the same prompt, streamed or not.
    client = hermes_server.openai()
    kwargs = dict(model=hermes_server.model, messages=ASK, tools=TOOLS[:1], max_tokens=24, temperature=0)
    free = client.chat.completions.create(**kwargs, tool_choice="none").choices[0]
    expected, reason = parsed_message(PARSERS["hermes"], free.message.content, free.finish_reason, None)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in expected.get("tool_calls", [])]
    for extra in ({}, {"tool_choice": "auto"}):
        choice = client.chat.completions.create(**kwargs, **extra).choices[0]
        assert choice.message.content == expected["content"] and choice.finish_reason == reason
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == calls
        assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls or [])
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (expected["content"] or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason


def test_auto_takes_a_history_of_calls_and_results(hermes_server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    out = hermes_server.openai().chat.completions.create(model=hermes_server.model, messages=history,
                                                        tools=TOOLS[:1], max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
