"""The server through the official openai client and raw httpx: the product as users meet it."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

PROMPT = "The capital of France is"


def test_completion_matches_offline_greedy(default_server, default_model):
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.sampling_params import SamplingParams

    offline = LLMEngine(default_model, EngineConfig(num_kv_blocks=256)).generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0))[0]
    client = default_server.openai()
    out = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == offline.text
    assert out.usage.prompt_tokens == len(default_model.tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == len(offline.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_completion_equals_unstreamed(default_server):
    client = default_server.openai()
    whole = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_ends_with_done_and_first_chunk_names_exit(default_server):
    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", default_server.url + "/v1/completions", json=body, timeout=60,
                      headers={"X-Balcony-Exit": "15"}) as r:
        assert r.headers["X-Balcony-Exit"] == "15"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["balcony"]["exit"] == "15" and first["balcony"]["forced"] is True


def test_n_and_several_prompts_and_token_prompts(default_server, default_model):
    client = default_server.openai()
    ids = default_model.tokenizer.encode(PROMPT)
    out = client.completions.create(model="smollm2-135m", prompt=[PROMPT, "Hello"], n=2, max_tokens=5,
                                    temperature=1.0, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    by_ids = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    lists = client.completions.create(model="smollm2-135m", prompt=[ids, ids[:3]], max_tokens=3, temperature=0)
    assert len(lists.choices) == 2


def test_seed_reproduces_and_stop_strings_cut(default_server):
    client = default_server.openai()
    kwargs = dict(model="smollm2-135m", prompt="Once upon a time", max_tokens=16, temperature=1.0)
    a = client.completions.create(seed=42, **kwargs).choices[0].text
    b = client.completions.create(seed=42, **kwargs).choices[0].text
    assert a == b
    free = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=16, temperature=0).choices[0]
    stop = free.text[6:9]
    cut = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == free.text[: free.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_and_echo_for_scoring(default_server, default_model, default_hf):
    import torch

    client = default_server.openai()
    out = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                    temperature=0)
    lp = out.choices[0].logprobs
    ids = default_model.tokenizer.encode(PROMPT)
    assert out.choices[0].text == PROMPT
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    ref = torch.log_softmax(default_hf(torch.tensor([ids])).logits[0], -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-3)
    assert lp.text_offset == sorted(lp.text_offset)
    gen = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=3, logprobs=2, temperature=0)
    glp = gen.choices[0].logprobs
    assert len(glp.tokens) == 3 and all(len(t) == 2 for t in glp.top_logprobs)
    assert all(v <= 0 for v in glp.token_logprobs)


def test_chat_streamed_and_not(default_server):
    client = default_server.openai()
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    parts = list(client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                                temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content


def test_models_lists_exits(default_server):
    models = default_server.openai().models.list()
    (model,) = models.data
    assert model.id == "smollm2-135m"
    assert [e["exit"] for e in model.model_extra["balcony"]["exits"]] == ["8", "15", "22", "full"]


def test_budget_routing(default_server):
    client = default_server.openai()

    def ask(**headers):
        raw = client.completions.with_raw_response.create(
            model="smollm2-135m", prompt=PROMPT, max_tokens=8, temperature=0, extra_headers=headers)
        return raw.headers["X-Balcony-Exit"], raw.parse().model_extra["balcony"]

    exit_name, info = ask(**{"X-Latency-Budget-Ms": "1000000"})
    assert exit_name == "full" and info["budget_ms"] == 1e6 and info["measured_ms"] > 0
    exit_name, info = ask(**{"X-Latency-Budget-Ms": "1"})
    assert exit_name == "8" and info["predicted_ms"] > 1  # best effort: the shallowest, a predicted miss
    _, full = ask(**{"X-Balcony-Exit": "full"})
    _, shallow = ask(**{"X-Balcony-Exit": "8"})
    assert shallow["predicted_ms"] < full["predicted_ms"]
    # A budget between the two: the router's own predictions move with every measured step, so
    # assert its contract rather than one exit: whatever it chose was predicted to fit the budget
    # (or is the shallowest exit, a predicted miss).
    between = (full["predicted_ms"] + shallow["predicted_ms"]) / 2
    exit_name, info = ask(**{"X-Latency-Budget-Ms": str(between)})
    assert info["predicted_fit"] is True or (exit_name == "8" and info["predicted_fit"] is False)
    if info["predicted_fit"]:
        assert info["predicted_ms"] <= between
    _, plain = ask()
    assert plain["exit"] == "full" and plain["budget_ms"] is None
    assert default_server.metric("balcony:budget_requests_total", outcome="miss") >= 1
    assert default_server.metric("balcony:budget_requests_total", outcome="none") >= 1


@pytest.mark.parametrize(
    "body, headers, status, fragment",
    [
        ({"prompt": "hi", "suffix": "x"}, {}, 400, "suffix"),
        ({"prompt": "hi", "best_of": 3}, {}, 400, "best_of"),
        ({"prompt": "hi", "bogus_field": 1}, {}, 400, "bogus_field"),
        ({"prompt": "hi", "temperature": -1}, {}, 400, "temperature"),
        ({"prompt": "hi", "max_tokens": 100000}, {}, 400, "maximum length"),
        ({"prompt": [999999]}, {}, 400, "token ids"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, {}, 400, "[-100, 100]"),
        ({"prompt": "hi", "logit_bias": {"hello": 1}}, {}, 400, "token ids"),
        ({"prompt": "hi", "logit_bias": {"999999": 1}}, {}, 400, "logit_bias token ids"),
        ({"prompt": "hi"}, {"X-Balcony-Exit": "7"}, 400, "X-Balcony-Exit"),
        ({"prompt": "hi"}, {"X-Latency-Budget-Ms": "soon"}, 400, "X-Latency-Budget-Ms"),
        ({"prompt": "hi", "model": "gpt-4"}, {}, 404, "does not exist"),
    ],
)
def test_errors_in_openai_envelope(default_server, body, headers, status, fragment):
    payload = {"model": "smollm2-135m", **body}
    r = httpx.post(default_server.url + "/v1/completions", json=payload, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]


def test_logit_bias_forces_and_bans_tokens(default_server, default_model):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused")
    forced = default_model.tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100})
    assert out.choices[0].text == default_model.tokenizer.decode([forced] * 4)
    plain = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=1, temperature=0)
    first = default_model.tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say yes."}], max_tokens=3, temperature=0,
        logit_bias={str(first): -100})
    assert banned.choices[0].message.content  # chat takes it too
    out = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=1, temperature=0,
                                    logit_bias={str(first): -100})
    assert out.choices[0].text != plain.choices[0].text


def test_malformed_json_is_400(default_server):
    r = httpx.post(default_server.url + "/v1/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"}, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and "not valid JSON" in error["message"] and error["param"] is None


def test_openai_client_raises_typed_errors(default_server):
    client = default_server.openai()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=1, extra_body={"suffix": "z"})


def test_choices_that_finish_before_their_reader_starts_are_not_lost(default_server):
    """n choices are queued one by one; with max_tokens 1 the first can finish before the last is
    queued. Every choice must still come back, streamed or not."""
    body = {"model": "smollm2-135m", "prompt": ["a", "b"], "n": 4, "max_tokens": 1, "temperature": 0}
    for _ in range(8):
        r = httpx.post(default_server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert sorted(c["index"] for c in r.json()["choices"]) == list(range(8))
        with httpx.stream("POST", default_server.url + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        finished = [c for line in lines[:-1] for c in json.loads(line.removeprefix("data: "))["choices"]
                    if c["finish_reason"]]
        assert sorted(c["index"] for c in finished) == list(range(8))


def test_served_exits_limit_routing_forcing_and_the_model_card(start):
    server = start("--exits", "22,full")
    client = server.openai()
    (model,) = client.models.list().data
    assert [e["exit"] for e in model.model_extra["balcony"]["exits"]] == ["22", "full"]
    raw = client.completions.with_raw_response.create(
        model="smollm2-135m", prompt=PROMPT, max_tokens=4, temperature=0, extra_headers={"X-Latency-Budget-Ms": "1"})
    assert raw.headers["X-Balcony-Exit"] == "22"  # the shallowest served exit, a predicted miss
    with server.client() as http:
        r = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "hi", "max_tokens": 2},
                      headers={"X-Balcony-Exit": "8"})
    assert r.status_code == 400 and "22, full" in r.json()["error"]["message"]


def test_bad_exits_option_fails_at_start(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--exits", "8,deep"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--exits" in done.stderr


def test_n_choices_share_the_prompt_and_equal_separate_seeded_requests(default_server):
    """Choice i of n uses seed + i and reads the prompt's blocks that choice 0 computed; the text is
    what a request of its own with that seed gets, and the prompt is counted once as computed."""
    client = default_server.openai()
    prompt = "A list of the ten longest rivers in the world, with the countries each one flows through: "
    kwargs = dict(model="smollm2-135m", max_tokens=8, temperature=1.0)
    together = client.completions.create(prompt=prompt, n=3, seed=11, **kwargs)
    alone = [client.completions.create(prompt=prompt, seed=11 + i, **kwargs).choices[0].text for i in range(3)]
    assert [c.text for c in together.choices] == alone


def test_repeated_prompt_reports_cached_tokens(default_server):
    client = default_server.openai()
    system = "You are a terse assistant who answers questions about rivers in one short sentence. " * 4
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "How long is the Nile?"}]
    first = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and first.usage.prompt_tokens - 16 <= cached < first.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
