"""What real clients send beyond the basics: SDK-dumped history, tool turns, hint fields, vLLM's
continuous usage, model retrieval, and bodies sent without a JSON Content-Type."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_TURN = [
    *QUESTION,
    {"role": "assistant", "content": None, "refusal": None, "audio": None, "function_call": None,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
]


def rendered_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt the server should build: the chat template over role and content, null as ''."""
    plain = [{"role": m["role"], "content": m["content"] or ""} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def sse(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_sdk_dumped_reply_goes_back_into_the_history(default_server, default_model):
    client = default_server.openai()
    messages = [{"role": "user", "content": "Say hello."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    dumped = first.choices[0].message.model_dump()
    assert dumped["refusal"] is None and dumped["tool_calls"] is None  # the fields this must accept
    messages += [dumped, {"role": "user", "content": "Again."}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens == len(rendered_ids(default_model.tokenizer, messages))


def test_tool_call_and_tool_result_render_through_the_template(default_server, default_model):
    client = default_server.openai()
    ids = rendered_ids(default_model.tokenizer, TOOL_TURN)
    assert "18 degrees" in default_model.tokenizer.decode(ids)
    chat = client.chat.completions.create(model=MODEL, messages=TOOL_TURN, max_tokens=6, temperature=0)
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == plain.choices[0].text


def test_hint_and_bookkeeping_fields_are_accepted_and_change_nothing(default_server):
    client = default_server.openai()
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0)
    base = client.chat.completions.create(**kwargs).choices[0].message.content
    hinted = client.chat.completions.create(
        **kwargs, store=False, metadata={"team": "eval"}, service_tier="auto", prompt_cache_key="k1",
        safety_identifier="user-1", user="u1", parallel_tool_calls=True)
    assert hinted.choices[0].message.content == base
    parts = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True, "include_obfuscation": False}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == base


@pytest.mark.parametrize("field, value", [
    ("store", True), ("metadata", {"k": "v"}), ("service_tier", "flex"), ("prompt_cache_key", "abc"),
    ("safety_identifier", "hash-1"), ("user", "someone"), ("parallel_tool_calls", False),
])
def test_each_hint_field_alone_is_accepted(default_server, field, value):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1, field: value}
    r = httpx.post(default_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": QUESTION}),
    ("/v1/completions", {"prompt": "The sky is"}),
])
def test_null_in_an_optional_field_reads_as_left_out(default_server, path, body):
    # OpenAI's spec makes these nullable; clients generated from it send null for "default"
    nulls = {"temperature": None, "top_p": None, "n": None, "presence_penalty": None, "frequency_penalty": None,
             "stream": None, "seed": None, "stop": None, "logit_bias": None, "user": None}
    base = {"model": MODEL, "max_tokens": 6, "temperature": 0, **body}

    def text(extra: dict) -> str:
        r = httpx.post(default_server.url + path, json={**base, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"]
        assert len(choice) == 1  # n null: one choice
        return choice[0]["message"]["content"] if "messages" in body else choice[0]["text"]

    assert text({k: v for k, v in nulls.items() if k != "temperature"}) == text({})
    r = httpx.post(default_server.url + path, json={**base, "model": None}, timeout=60)
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]  # a required field stays required


def test_null_inside_nested_objects_reads_as_left_out(default_server):
    # the same rule one level down: stream_options and a tool call sent back as history
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": None, "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    body = {"model": MODEL, "messages": history, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": None, "continuous_usage_stats": None}}
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c.get("usage") is None for c in chunks)  # include_usage null: false, no usage chunk
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] >= 1  # and the field still works when set
    missing = {**body, "messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": None, "function": {"name": "lookup", "arguments": "{}"}}]}]}
    error = error_of(httpx.post(default_server.url + "/v1/chat/completions", json=missing, timeout=60), 400)
    assert "tool_calls.0.id" in error["message"]  # a required field stays required inside


@pytest.mark.parametrize("change, fragment", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, "messages.0.mood"),
    ({"stream": True, "stream_options": {"include_usage": True, "verbose": True}}, "stream_options.verbose"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "c"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "refusal": "no"}]}, "refusal"),
    ({"messages": [{"role": "user", "content": None}]}, "content"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": None, "audio": {"id": "a1"}}]}, "audio"),
])
def test_unknown_or_misplaced_fields_are_refused_by_name(default_server, change, fragment):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1, **change}
    error = error_of(httpx.post(default_server.url + "/v1/chat/completions", json=body, timeout=60), 400)
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def check_running_usage(chunks: list[dict], final: dict) -> None:
    """Every chunk carries usage; the generated count never drops, grows with each chunk that
    brings tokens, and ends at the final count."""
    assert all(c.get("usage") for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == final["completion_tokens"]
    with_choices = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert with_choices[-1] == final["completion_tokens"]
    for c in chunks:
        u = c["usage"]
        assert u["prompt_tokens"] == final["prompt_tokens"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_continuous_usage_stats_chat_through_the_sdk(default_server):
    client = default_server.openai()
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = [c.model_dump(exclude_none=True) for c in client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})]
    assert chunks[-1]["choices"] == []  # include_usage keeps its final usage-only chunk
    final = chunks[-1]["usage"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: final[k] for k in counts} == whole.usage.model_dump(include=set(counts)) and final["completion_tokens"] == 8
    # The stream came second: it reads at least what the first read of the same prompt from the
    # prefix cache (run alone, on a fresh server, the first reads nothing and the second 32 tokens).
    cached = final.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    assert cached >= (whole.usage.prompt_tokens_details.cached_tokens if whole.usage.prompt_tokens_details else 0)
    check_running_usage(chunks, final)
    content = [c["usage"]["completion_tokens"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert content == sorted(set(content))  # strictly increasing: one more token per content chunk


def test_continuous_usage_stats_completions_as_guidellm_sends_it(default_server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "n": 2, "temperature": 0,
            "ignore_eos": True, "stop": None, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = sse(default_server, "/v1/completions", body)
    final = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and final["completion_tokens"] == 10  # both choices counted
    check_running_usage(chunks, final)


def test_continuous_usage_stats_needs_include_usage_as_in_vllm(default_server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    chunks = sse(default_server, "/v1/completions", body)
    assert chunks and not any("usage" in c for c in chunks)


def test_retrieve_every_listed_model(default_server):
    client = default_server.openai()
    with default_server.client() as http:
        listed = http.get("/v1/models").json()["data"]
        assert listed
        for card in listed:
            r = http.get(f"/v1/models/{card['id']}")
            assert r.status_code == 200 and r.json() == card
            assert client.models.retrieve(card["id"]).id == card["id"]


@pytest.mark.parametrize("name", ["gpt-4", "org/some-model"])
def test_retrieving_an_unknown_model_is_404_naming_it(default_server, name):
    error = error_of(httpx.get(f"{default_server.url}/v1/models/{name}", timeout=30), 404)
    assert repr(name) in error["message"] and error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        default_server.openai().models.retrieve(name)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_without_json_content_type_is_415_naming_the_header(default_server, path, content_type):
    body = {"model": MODEL, "prompt": "hi", "messages": QUESTION, "max_tokens": 1}
    body.pop("prompt" if "chat" in path else "messages")
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(default_server.url + path, content=json.dumps(body).encode(), headers=headers, timeout=30)
    assert r.request.headers.get("content-type") == content_type
    error = error_of(r, 415)
    assert "JSON" in error["message"] and "Content-Type" in error["message"]
    assert (content_type or "no Content-Type") in error["message"]


def test_json_content_type_with_parameters_is_accepted(default_server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    r = httpx.post(default_server.url + "/v1/completions", content=json.dumps(body).encode(),
                   headers={"Content-Type": "application/json; charset=utf-8"}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw, fragment", [
    (b'{"model": "smollm2-135m", "prompt": "hi",}', "not valid JSON"),
    (b'["model", "smollm2-135m"]', "must be a JSON object"),
    (b"", "body is empty"),
])
def test_malformed_json_bodies_get_clear_messages(default_server, raw, fragment):
    r = httpx.post(default_server.url + "/v1/completions", content=raw,
                   headers={"Content-Type": "application/json"}, timeout=30)
    error = error_of(r, 400)
    assert fragment in error["message"] and "Input should be" not in error["message"]
