"""Authentication, back-pressure, disconnects, draining on SIGTERM, readiness."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

LONG = {"prompt": "Count: one two three", "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def wait_for(predicate, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_api_key_required(strict_server):
    r = httpx.post(strict_server.url + "/v1/completions", json={"model": "strict", "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=strict_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert strict_server.openai().models.list().data[0].id == "strict"
    assert httpx.get(strict_server.url + "/health").status_code == 200  # no key needed


def test_full_queue_answers_429_with_retry_after(strict_server):
    with strict_server.client() as client:
        body = {"model": "strict", "stream": True, **LONG}
        with client.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept alive: a dropped iterator closes the stream
            next(lines)  # it runs: the single sequence slot is taken

            def queue_one():  # its own client: httpx clients are not shared across threads here
                with strict_server.client() as other:
                    other.post("/v1/completions", json={"model": "strict", **LONG})

            queued = threading.Thread(target=queue_one)
            queued.start()
            assert wait_for(lambda: strict_server.metric("balcony:num_requests_waiting") == 1)
            r = client.post("/v1/completions", json={"model": "strict", "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        queued.join(timeout=120)


def test_unmeetable_budget_rejected_under_reject_policy(strict_server):
    with strict_server.client() as client:
        r = client.post("/v1/completions", json={"model": "strict", "prompt": "hi", "max_tokens": 50},
                        headers={"X-Latency-Budget-Ms": "0.001"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_unmeetable"


def test_disconnect_aborts_and_frees_blocks(strict_server):
    aborted_before = strict_server.metric("balcony:request_success_total", finished_reason="abort")
    with strict_server.client() as client:
        with client.stream("POST", "/v1/completions", json={"model": "strict", "stream": True, **LONG}) as r:
            next(r.iter_lines())
            # The first chunk can leave before the first step has allocated the request's blocks.
            assert wait_for(lambda: strict_server.metric("balcony:kv_cache_usage_perc") > 0)
    assert wait_for(lambda: strict_server.metric("balcony:kv_cache_usage_perc") == 0)
    assert wait_for(lambda: strict_server.metric("balcony:num_requests_running") == 0)
    assert strict_server.metric("balcony:request_success_total", finished_reason="abort") == aborted_before + 1


def test_sigterm_drains_in_flight_requests(start):
    server = start("--shutdown-timeout", "60")  # the default model: a 120-token answer takes seconds
    body = {"model": "smollm2-135m", "stream": True, "stream_options": {"include_usage": True}, **LONG,
            "max_tokens": 120}
    with server.client() as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(lines)  # the request is running
            server.process.send_signal(signal.SIGTERM)
            assert wait_for(lambda: httpx.get(server.url + "/ready").status_code == 503, timeout=10)
            refused = httpx.post(server.url + "/v1/completions", json={"model": "smollm2-135m", "prompt": "hi"},
                                 timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            rest = [line for line in lines if line]
    chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]"
    assert chunks[-1]["usage"]["completion_tokens"] == 120  # finished in full, not cut off
    assert server.process.wait(timeout=60) == 0


def test_disconnect_while_queued_removes_the_request(strict_server):
    """A streaming client that leaves while its request waits is dropped before it ever runs."""
    aborted_before = strict_server.metric("balcony:request_success_total", finished_reason="abort")
    with strict_server.client() as client, strict_server.client() as other:
        with client.stream("POST", "/v1/completions", json={"model": "strict", "stream": True, **LONG}) as running:
            lines = running.iter_lines()
            next(lines)  # the only sequence slot is taken
            with other.stream("POST", "/v1/completions", json={"model": "strict", "stream": True, **LONG}) as queued:
                assert queued.status_code == 200
                assert wait_for(lambda: strict_server.metric("balcony:num_requests_waiting") == 1)
            # The queued client has gone: its request leaves the queue while the first still runs.
            assert wait_for(lambda: strict_server.metric("balcony:num_requests_waiting") == 0)
            assert strict_server.metric("balcony:num_requests_running") == 1
    assert wait_for(lambda: strict_server.metric("balcony:num_requests_running") == 0)
    assert strict_server.metric("balcony:request_success_total", finished_reason="abort") == aborted_before + 2
