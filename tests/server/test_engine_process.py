"""`balcony serve --engine-process`: the step loop in a child process, checked against the same
server with the step loop in a thread (the default_server), through the official openai client."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

PROMPT = "The capital of France is"


def test_the_engines_refusals_survive_the_pipe():
    """Errors raised in the engine process are pickled to the HTTP process, fields and all."""
    import pickle

    from balcony_runtime.errors import InvalidGrammar, RequestError
    from balcony_runtime.routing.router import BudgetUnmeetable
    from server.async_engine import QueueFull
    from server.engine_core import _picklable

    budget = pickle.loads(pickle.dumps(BudgetUnmeetable(40.0, 95.5, 2.5)))
    assert (budget.budget_ms, budget.best_ms, budget.retry_after_s) == (40.0, 95.5, 2.5) and "40 ms" in str(budget)
    for error in (QueueFull("9 requests are already waiting"), RequestError("too long"), InvalidGrammar("bad")):
        copy = pickle.loads(pickle.dumps(_picklable(error)))
        assert type(copy) is type(error) and str(copy) == str(error)

    class Unpicklable(RequestError):
        def __init__(self, a, b):
            super().__init__(f"{a} {b}")

    copy = pickle.loads(pickle.dumps(_picklable(Unpicklable(1, 2))))
    assert type(copy) is RequestError and str(copy) == "1 2"


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts: it runs nothing)."""
    try:
        return b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
    except FileNotFoundError:
        return True


def engine_pid(server_pid: int) -> int:
    """The engine's process: the server's child started by multiprocessing's spawn."""
    children = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError(f"no engine process among {children}")


@pytest.fixture(scope="module")
def process_server(tmp_path_factory, default_model):
    from tests.server.conftest import start_server

    server = start_server(tmp_path_factory.mktemp("srv"), "--engine-process")
    yield server
    server.stop()


def test_greedy_text_and_usage_equal_the_threaded_servers(process_server, default_server):
    ours, reference = process_server.openai(), default_server.openai()
    for prompt, exit_layer in [(PROMPT, None), ("Once upon a time", "15"), ("def add(a, b):", "8")]:
        headers = {"X-Balcony-Exit": exit_layer} if exit_layer else {}
        a = ours.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_headers=headers)
        b = reference.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=12, temperature=0,
                                         extra_headers=headers)
        assert a.choices[0].text == b.choices[0].text and a.usage == b.usage
        assert a.balcony["exit"] == b.balcony["exit"]


def test_streams_n_choices_and_chat(process_server):
    client = process_server.openai()
    whole = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    many = client.completions.create(model="smollm2-135m", prompt=[PROMPT, "Hello"], n=2, max_tokens=5,
                                     temperature=1.0, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and all(c.finish_reason == "length" for c in many.choices)
    chat = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    shaped = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "A number"}], max_tokens=20, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert isinstance(json.loads(shaped.choices[0].message.content)["n"], int)


def test_schemas_compiled_beside_the_step_loop_keep_their_order_and_shape(process_server):
    """New schemas compile in a worker thread of the engine process while a stream runs; each
    request still gets JSON of its own schema, and the stream is unaffected."""
    from concurrent.futures import ThreadPoolExecutor

    client = process_server.openai()
    reference = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})

    def shaped(i: int) -> dict:
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "integer"}}, "required": [f"field_{i}"]}
        out = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": f"Number {i}"}], max_tokens=24,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        return json.loads(out.choices[0].message.content)

    def plain() -> str:
        return client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        streaming = pool.submit(plain)
        objects = list(pool.map(shaped, range(3)))
    assert [list(o) for o in objects] == [["field_0"], ["field_1"], ["field_2"]]
    assert all(isinstance(next(iter(o.values())), int) for o in objects)
    assert streaming.result() == reference.choices[0].text


def test_errors_from_the_engine_process_are_the_apis(process_server):
    client = process_server.openai()
    with pytest.raises(openai.BadRequestError) as too_long:  # refused by the engine, in its process
        client.completions.create(model="smollm2-135m", prompt="word " * 9000, max_tokens=4)
    assert "maximum" in str(too_long.value)
    with pytest.raises(openai.BadRequestError):  # refused here: an exit the server does not have
        client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=4,
                                  extra_headers={"X-Balcony-Exit": "7"})
    with pytest.raises(openai.BadRequestError):  # a schema that does not compile
        client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})


def test_a_client_that_leaves_is_aborted_and_the_gauges_follow(process_server):
    aborted = process_server.metric("balcony:request_success_total", finished_reason="abort")
    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", process_server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    for _ in range(100):
        if process_server.metric("balcony:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert process_server.metric("balcony:num_requests_running") == 0
    assert process_server.metric("balcony:kv_cache_usage_perc") == 0
    assert process_server.metric("balcony:request_success_total", finished_reason="abort") == aborted + 1
    assert process_server.metric("balcony:time_to_first_token_seconds_count") >= 1


def test_a_dead_engine_fails_its_streams_and_the_server_exits_1(start):
    server = start("--engine-process")
    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        os.kill(engine_pid(server.process.pid), signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert "engine process exited" in error["message"]
    assert server.process.wait(timeout=60) == 1
    assert "the engine process exited" in server.log()


def test_a_stopped_server_stops_its_engine_cleanly(start):
    server = start("--engine-process")
    assert server.openai().completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=3).usage
    engine = engine_pid(server.process.pid)
    assert server.stop() == 0
    assert "engine process exited" not in server.log()
    for _ in range(50):  # the engine process is gone too
        if gone(engine):
            break
        time.sleep(0.1)
    assert gone(engine)


def test_the_engine_process_leaves_when_its_parent_is_killed_while_it_loads():
    """While loading and calibrating the engine reads no pipe; a watcher thread ends it as soon as
    its parent is gone (here: a process that sleeps where the engine would load, parent SIGKILLed)."""
    import subprocess
    import sys

    child = ("import os, sys, time; from server.engine_core import _exit_with_parent; "
             "_exit_with_parent(int(sys.argv[1])); print('watching', flush=True); time.sleep(60)")
    middle = subprocess.Popen(
        [sys.executable, "-c", f"import os, subprocess, sys, time; "
                               f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); "
                               "print(p.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    pid = int(middle.stdout.readline())
    middle.kill()  # at once: the child may not even have imported the watcher yet (it was told the pid)
    middle.wait()
    for _ in range(400):  # its imports (torch) take seconds, then the watcher sees the new parent
        if gone(pid):
            break
        time.sleep(0.05)
    alive = not gone(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive
