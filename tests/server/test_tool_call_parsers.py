"""tool_choice "auto": the call-format parsers on realistic replies, their streams against whole-text
parsing at every cut, and the chat stream built on them (no model: a fake generation group)."""

from __future__ import annotations

import asyncio
import json

import pytest

from balcony_runtime.request_output import RequestOutput
from balcony_runtime.sampling_params import SamplingParams
from server.chat import build_specs, choice_message, stream_chat
from server.errors import APIError
from server.generation_group import ChoiceResult, ChoiceSpec
from server.protocol import ChatCompletionRequest
from server.tool_calls import ParsedCallStream, parsed_message
from server.tool_parsers import PARSERS, ParsedCall, parser_for_template, select_format

HERMES, LLAMA = PARSERS["hermes"], PARSERS["llama3_json"]
WEATHER = ParsedCall("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ParsedCall("get_time", '{"timezone": "Europe/Paris"}')

# Excerpts of the real templates, as their tokenizer_config.json ship them.
QWEN25_TEMPLATE = (
    '{%- if tools %}\n    {{- \'<|im_start|>system\\n\' }}\n    {{- "\\n\\n# Tools\\n\\nYou may call one or more '
    'functions to assist with the user query.\\n\\nYou are provided with function signatures within '
    '<tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n        {{- "\\n" }}\n        '
    '{{- tool | tojson }}\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\nFor each function call, return a json '
    'object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- endif %}')
LLAMA31_TEMPLATE = (
    '{%- if tools is not none and not tools_in_user_message %}\n    {{- "Given the following functions, please '
    'respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    'value}.\' }}\n{%- endif %}\n{%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n'
    '    {{- \'<|python_tag|>\' + tool_call.name + \'.call(\' }}\n{%- endif %}')
SMOLLM2_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                    "{% endif %}")
MISTRAL_TEMPLATE = '{%- if tools is not none %}{{- "[AVAILABLE_TOOLS] " + tools|tojson + "[/AVAILABLE_TOOLS]" }}' \
                   '{%- endif %}{{- "[TOOL_CALLS] " + tool_calls|tojson }}'


@pytest.mark.parametrize("template, expected", [
    (QWEN25_TEMPLATE, "hermes"), (LLAMA31_TEMPLATE, "llama3_json"), (SMOLLM2_TEMPLATE, None),
    (MISTRAL_TEMPLATE, None), ("", None),
])
def test_the_parser_follows_the_chat_template(template, expected):
    parser = parser_for_template(template)
    assert (parser.name if parser else None) == expected


# (reply, whole-text parse): realistic replies, calls and text, and what must stay text.
HERMES_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     [WEATHER]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
     [WEATHER, TIME]),
    ('I will look that up.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
     '"celsius"}}\n</tool_call>\nOne moment.',
     ["I will look that up.", WEATHER, "One moment."]),
    # Hermes 2 Pro writes arguments first; no closing tag at the end (vLLM takes it too).
    ('<tool_call>\n{"arguments": {"city": "Paris", "unit": "celsius"}, "name": "get_weather"}', [WEATHER]),
    # Braces and quotes inside strings, non-ASCII, a raw newline in a string.
    ('<tool_call>{"name": "note", "arguments": {"text": "a } b { \\" c\\\\", "who": "Zoë\nX"}}</tool_call>',
     [ParsedCall("note", '{"text": "a } b { \\" c\\\\", "who": "Zoë\\nX"}')]),
    ('<tool_call>{"name": "ping"}</tool_call>', [ParsedCall("ping", "{}")]),
    # Malformed: never an error, the text stays text.
    ('<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
     ['<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>']),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', ['<tool_call>\n{"name": "get_weather", '
                                                                        '"arguments": {"city": "Par']),
    ('Use <tool_call> tags: <tool_call>{"name": "ping", "arguments": {}}</tool_call>',
     ["Use <tool_call> tags:", ParsedCall("ping", "{}")]),
    ('<tool_call>{"arguments": {}}</tool_call> <tool_call>[1, 2]</tool_call>',
     ['<tool_call>{"arguments": {}}</tool_call> <tool_call>[1, 2]</tool_call>']),
    ('<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>',
     ['<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>']),
    ("Paris is sunny today, 21 °C.  \n", ["Paris is sunny today, 21 °C.  \n"]),
    ("a < b and <tool_ is not a tag", ["a < b and <tool_ is not a tag"]),
    ("", []),
]
LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', [WEATHER]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', [WEATHER]),
    ('\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', [WEATHER, TIME]),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}\nShall I go on?',
     [WEATHER, "Shall I go on?"]),
    ("The weather in Paris is sunny.", ["The weather in Paris is sunny."]),
    ('Here: {"name": "get_weather", "parameters": {}}', ['Here: {"name": "get_weather", "parameters": {}}']),
    ('{"answer": 42}', ['{"answer": 42}']),
    ('{"name": "get_weather", "parameters": {"city": Paris}}',
     ['{"name": "get_weather", "parameters": {"city": Paris}}']),
    ('{"name": "get_weather", "parameters": {"city": "Pa', ['{"name": "get_weather", "parameters": {"city": "Pa']),
    ("<|python_tag|>brave_search.call(query=\"x\")", ["<|python_tag|>brave_search.call(query=\"x\")"]),
    ("  ", ["  "]),
]
CASES = [(HERMES, text, parsed) for text, parsed in HERMES_CASES] + [(LLAMA, t, parsed) for t, parsed in LLAMA_CASES]
IDS = [f"{p.name}-{i}" for i, (p, _, _) in enumerate(CASES)]


@pytest.mark.parametrize("parser, text, parsed", CASES, ids=IDS)
def test_whole_reply(parser, text, parsed):
    assert parser.parse(text, final=True) == parsed


def streamed(parser, pieces: list[str], finish_reason: str = "stop") -> tuple[str, list[ParsedCall], list[dict]]:
    """What a ParsedCallStream sends for a reply arriving in these pieces: content, calls, deltas."""
    stream, text, deltas = ParsedCallStream(parser), "", []
    for k, piece in enumerate(pieces):
        text += piece
        deltas += stream.deltas(text, finish_reason if k == len(pieces) - 1 else None)
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for entry in d.get("tool_calls", []):
            call = calls.setdefault(entry["index"], {"name": None, "arguments": ""})
            if "id" in entry:
                assert entry["id"].startswith("call_") and entry["type"] == "function" and call["name"] is None
                assert entry["function"]["arguments"] == ""
                call["name"] = entry["function"]["name"]
            call["arguments"] += entry["function"]["arguments"]
    return content, [ParsedCall(c["name"], c["arguments"]) for _, c in sorted(calls.items())], deltas


@pytest.mark.parametrize("parser, text, parsed", CASES, ids=IDS)
def test_a_stream_cut_anywhere_sends_the_whole_replys_parse(parser, text, parsed):
    content = "".join(s for s in parsed if isinstance(s, str))
    calls = [s for s in parsed if isinstance(s, ParsedCall)]
    cuts = [list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]  # character by character, in two
    for pieces in cuts:
        got_content, got_calls, deltas = streamed(parser, pieces)
        assert (got_content, got_calls) == (content, calls), pieces
        assert all(d for d in deltas)  # no empty delta
    # Settled means settled: each prefix's parse begins every longer prefix's (the last text may grow).
    previous: list = []
    for i in range(len(text) + 1):
        now = parser.parse(text[:i], final=False)
        assert now[:len(previous) - 1] == previous[:-1] and len(now) >= len(previous)
        if previous:
            last, same = previous[-1], now[len(previous) - 1]
            assert same.startswith(last) if isinstance(last, str) else same == last
        previous = now


def test_text_streams_as_it_comes_and_a_call_when_its_json_closes():
    stream = ParsedCallStream(HERMES)
    assert stream.deltas("Let me", None) == [{"content": "Let me"}]
    assert stream.deltas("Let me check. <tool", None) == [{"content": " check."}]  # the tail may be a marker
    assert stream.deltas('Let me check. <tool_call>{"name": "ping", "arguments": {"a"', None) == []
    head, arguments = stream.deltas('Let me check. <tool_call>{"name": "ping", "arguments": {"a": 1}}', None)
    assert head["tool_calls"][0]["function"] == {"name": "ping", "arguments": ""}
    assert arguments == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}
    assert stream.finish_reason("stop") == "tool_calls" and stream.finish_reason("length") == "length"


def test_finished_messages_as_openai_returns_them():
    text = 'On it.\n<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}'
    message, reason = parsed_message(HERMES, text, "stop", None)
    assert reason == "tool_calls" and message["content"] == "On it."
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("function", "a", "{}"), ("function", "b", "{}")]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    only, _ = parsed_message(HERMES, text, "stop", 1)  # parallel_tool_calls: false
    assert [c["function"]["name"] for c in only["tool_calls"]] == ["a"]
    message, reason = parsed_message(LLAMA, '{"name": "a", "parameters": {}}', "stop", None)
    assert message["content"] is None and reason == "tool_calls"
    cut = 'Sure. <tool_call>{"name": "a", "argu'
    assert parsed_message(HERMES, cut, "length", None) == ({"role": "assistant", "content": cut}, "length")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                                 **fields)


def result(text: str, finish_reason: str = "stop") -> ChoiceResult:
    r = ChoiceResult(request_id="r-0", index=0, spec=ChoiceSpec([1, 2], SamplingParams(), 0))
    r.absorb(RequestOutput(request_id="r-0", exit_layer=4, new_token_ids=[7], new_text=text, new_logprobs=[],
                           prompt_logprobs=None, num_prompt_tokens=2, num_output_tokens=1, finished=True,
                           finish_reason=finish_reason, arrival_time=0.0, first_scheduled_time=None,
                           first_token_time=None))
    return r


def test_auto_parses_and_the_other_choices_do_not():
    assert choice_message(request(), result(CALL_TEXT), HERMES)[1] == "tool_calls"  # no tool_choice: auto
    assert choice_message(request(tool_choice="auto"), result(CALL_TEXT), HERMES)[1] == "tool_calls"
    plain = ({"role": "assistant", "content": CALL_TEXT}, "stop")
    assert choice_message(request(tool_choice="none"), result(CALL_TEXT), HERMES) == plain
    # A reply shaped by response_format is that format's, not a call.
    assert choice_message(request(response_format={"type": "json_object"}), result(CALL_TEXT), HERMES) == plain


@pytest.mark.parametrize("template, why", [(SMOLLM2_TEMPLATE, "declares no tools"),
                                           (MISTRAL_TEMPLATE, "no parser for")])
def test_auto_without_a_parser_is_a_400_naming_the_model_and_why(template, why):
    class Tokenizer:
        chat_template = template

    with pytest.raises(APIError) as info:
        build_specs(request(), Tokenizer(), 256, "some-model", select_format("auto", template))
    error = info.value
    assert error.status == 400 and error.param == "tool_choice"
    assert "some-model" in error.message and why in error.message and "required" in error.message


def test_parallel_tool_calls_false_streams_the_first_call_only():
    stream, text = ParsedCallStream(HERMES, max_calls=1), CALL_TEXT + CALL_TEXT.replace("Checking.", "")
    deltas = stream.deltas(text, "stop")
    assert [e["index"] for d in deltas for e in d.get("tool_calls", [])] == [0, 0]
    assert stream.finish_reason("stop") == "tool_calls"


class FakeGroup:
    """Just what stream_chat reads of a GenerationGroup: the text arrives in these pieces."""

    def __init__(self, pieces: list[str]):
        self.id, self.request_ids, self.pieces = "g", ["g-0"], pieces
        self.specs = [ChoiceSpec([1, 2], SamplingParams(), 0)]

    def balcony_info(self, measured_ms):
        return {"exit": "full"}

    def measured_ms(self) -> float:
        return 1.0

    async def batches(self):
        for k, piece in enumerate(self.pieces):
            last = k == len(self.pieces) - 1
            yield [(0, RequestOutput(request_id="g-0", exit_layer=4, new_token_ids=[7], new_text=piece,
                                   new_logprobs=[], prompt_logprobs=None, num_prompt_tokens=2,
                                   num_output_tokens=k + 1, finished=last, finish_reason="stop" if last else None,
                                   arrival_time=0.0, first_scheduled_time=0.0, first_token_time=0.0))]


def test_chat_stream_sends_text_then_the_call_and_finishes_with_tool_calls():
    async def chunks():
        # (a write may carry several events: an SSE client splits them at blank lines)
        sent = b"".join([line async for line in stream_chat(request(), FakeGroup(list(CALL_TEXT)), None, "m", HERMES)])
        return [event + b"\n\n" for event in sent.split(b"\n\n") if event]

    lines = asyncio.run(chunks())
    assert lines[-1] == b"data: [DONE]\n\n"
    choices = [json.loads(line[len(b"data: "):])["choices"][0] for line in lines[:-1]]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["delta"].get("content") or "" for c in choices) == "Checking."
    calls = [entry for c in choices for entry in c["delta"].get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["tool_calls"]
    assert choices[-1]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("setting, template, expected", [
    ("auto", SMOLLM2_TEMPLATE, None),
    ("hermes", SMOLLM2_TEMPLATE, "hermes"),  # named: whatever the template says
    ("llama3_json", MISTRAL_TEMPLATE, "llama3_json"),
    ("none", QWEN25_TEMPLATE, None),  # off even where the template declares a parsed format
])
def test_tool_call_parser_setting(setting, template, expected):
    chosen = select_format(setting, template)
    assert (chosen.parser.name if chosen.parser else None) == expected
    if expected is None and setting == "none":
        with pytest.raises(APIError, match="--tool-call-parser none"):
            build_specs(request(), type("Tokenizer", (), {"chat_template": template})(), 256, "m", chosen)
