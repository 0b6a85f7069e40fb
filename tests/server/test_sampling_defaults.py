"""--override-generation-config: an operator's sampling values for the requests that leave a field
out; a request that sends the field keeps its own, even the API's default."""

from __future__ import annotations

import pytest

from server.protocol import ChatCompletionRequest, CompletionRequest
from server.sampling_defaults import parse_sampling_defaults, with_sampling_defaults
from tests.server.test_cli import subcommand


def test_the_json_object_becomes_sorted_field_value_pairs():
    assert parse_sampling_defaults('{"top_k": 5, "frequency_penalty": 0.5}') == (("frequency_penalty", 0.5), ("top_k", 5))
    assert parse_sampling_defaults("{}") == ()


@pytest.mark.parametrize("text, fragment", [
    ('{"repetition_penalty": 1.1}', "not 'repetition_penalty'"),  # vLLM's, not the OpenAI API's
    ('{"max_tokens": 64}', "not 'max_tokens'"),  # what a request asks for, not how it decodes
    ('{"temperature": 3}', "temperature: Input should be less than or equal to 2"),  # the API's range
    ('{"top_p": 0}', "top_p: Input should be greater than 0"),
    ('{"frequency_penalty": "high"}', "frequency_penalty: Input should be a valid number"),
    ("frequency_penalty=0.5", "expected a JSON object"),
    ("[0.5]", "expected a JSON object"),
])
def test_what_a_request_could_not_send_is_refused_by_name(text, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        parse_sampling_defaults(text)


def test_the_serve_flag_refuses_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        subcommand("serve").parse_args(["--override-generation-config", '{"temperature": 3}'])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--override-generation-config: temperature" in err and "Traceback" not in err


def test_the_serve_flag_and_its_variable(monkeypatch):
    monkeypatch.delenv("BALCONY_OVERRIDE_GENERATION_CONFIG", raising=False)
    assert subcommand("serve").parse_args([]).sampling_defaults == ()
    monkeypatch.setenv("BALCONY_OVERRIDE_GENERATION_CONFIG", '{"presence_penalty": 0.25}')
    assert subcommand("serve").parse_args([]).sampling_defaults == (("presence_penalty", 0.25),)


def test_a_field_the_client_sent_wins_even_at_the_api_default():
    defaults = parse_sampling_defaults('{"frequency_penalty": 0.5, "temperature": 0.7}')
    body = CompletionRequest(model="m", prompt="Hi", frequency_penalty=0.0)
    served = with_sampling_defaults(body, defaults)
    assert (served.frequency_penalty, served.temperature) == (0.0, 0.7)
    assert (body.frequency_penalty, body.temperature) == (0.0, 1.0)  # the request itself is left alone
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}])
    served_chat = with_sampling_defaults(chat, defaults)
    assert (served_chat.frequency_penalty, served_chat.temperature) == (0.5, 0.7)
    assert with_sampling_defaults(chat, ()) is chat
    # null is the API's way to say "the default": the operator's
    nulled = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "frequency_penalty": None})
    assert with_sampling_defaults(nulled, defaults).frequency_penalty == 0.5


def test_a_live_server_applies_its_defaults_to_requests_that_leave_them_out(start):
    server = start("--override-generation-config", '{"frequency_penalty": 2.0}')
    # The full model's greedy continuation of a list repeats its words; a penalty of 2 per earlier
    # use steers it elsewhere.
    ask = {"model": server.model, "prompt": "one, two, three, one, two, three, one, two,", "max_tokens": 24,
           "temperature": 0}
    with server.client() as client:
        def text(**fields) -> str:
            reply = client.post("/v1/completions", json={**ask, **fields})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        left_out, penalised, unpenalised = text(), text(frequency_penalty=2.0), text(frequency_penalty=0.0)
        def reply(**fields) -> str:
            answer = client.post("/v1/chat/completions", json={
                "model": server.model, "messages": [{"role": "user", "content": "What are the primary colors?"}],
                "max_tokens": 24, "temperature": 0, **fields})
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["message"]["content"]

        chat_left_out, chat_penalised, chat_unpenalised = reply(), reply(frequency_penalty=2.0), reply(frequency_penalty=0)
    assert left_out == penalised != unpenalised
    assert chat_left_out == chat_penalised != chat_unpenalised
    assert "frequency_penalty 2.0" in server.log()
