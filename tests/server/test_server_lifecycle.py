"""Authentication, back-pressure, disconnects, draining on SIGTERM, readiness, start-up phases.

Metrics and readiness change on the server's own threads: tests poll them with a deadline
(``wait_for``) instead of reading them once after a request returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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
            # The iterator is held: a discarded one, collected, closes the response, which is the
            # disconnect this test makes only when the `with` block ends.
            lines = r.iter_lines()
            first = next(lines)
            assert r.status_code == 200 and first.startswith("data: "), (r.status_code, first)
            assert wait_for(lambda: strict_server.metric("balcony:kv_cache_usage_perc") > 0)
            assert strict_server.metric("balcony:request_success_total", finished_reason="abort") == aborted_before
    assert wait_for(lambda: strict_server.metric("balcony:kv_cache_usage_perc") == 0)
    assert wait_for(lambda: strict_server.metric("balcony:num_requests_running") == 0)
    assert wait_for(lambda: strict_server.metric("balcony:request_success_total", finished_reason="abort")
                    == aborted_before + 1)


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
            assert strict_server.metric("balcony:num_requests_running") == 1  # the first still streams
    assert wait_for(lambda: strict_server.metric("balcony:num_requests_running") == 0)
    assert wait_for(lambda: strict_server.metric("balcony:request_success_total", finished_reason="abort")
                    == aborted_before + 2)


# ---- start-up and stopping, watched from launch -------------------------------------------------

PHASES = {"starting", "download", "conversion", "load", "warm-up", "calibration"}


def launch(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """A `balcony serve` process as the shared fixtures start it, not waited for: (process, url, log)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "smollm2-135m", "--port", str(port),
           "--adapters", "none", "--num-kv-blocks", "2048", "--dtype", "float32", *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, f"http://127.0.0.1:{port}", log_path


def wait_for_log(process: subprocess.Popen, log_path: Path, text: str, timeout: float = 240) -> bool:
    return wait_for(lambda: text in log_path.read_text() or process.poll() is not None, timeout=timeout) \
        and text in log_path.read_text()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.parametrize("moment", ["starting:", "load:"])
def test_sigterm_during_start_up_exits_at_once_with_status_0(tmp_path, default_model, moment):
    """'starting:' is logged just before the app's imports (torch), 'load:' when the loading thread
    starts reading the model: either way nothing is served yet, so the process leaves at once,
    with one line and status 0 (it used to wait for loading and calibration, then exit 1)."""
    process, _, log_path = launch(tmp_path)
    try:
        assert wait_for_log(process, log_path, moment), log_path.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log_path.read_text()
    finally:
        stop(process)
    log = log_path.read_text()
    lines = [line for line in log.splitlines() if "SIGTERM" in line]
    assert len(lines) == 1 and "during start-up" in lines[0], log
    assert "Traceback" not in log and "failed to load" not in log and "model ready" not in log, log


def test_start_up_logs_each_phase_and_a_second_sigterm_exits_at_once(tmp_path, default_model):
    """One server watched from launch: /ready answers 503 while it starts, a line per phase, then
    ready; a SIGTERM drains the request in flight, a second one exits at once with status 0."""
    process, url, log_path = launch(tmp_path, "--shutdown-timeout", "120")
    not_ready = []
    try:
        def ready() -> bool:
            try:
                r = httpx.get(url + "/ready", timeout=5)
            except httpx.HTTPError:
                return process.poll() is not None
            if r.status_code == 503:
                not_ready.append(r.json())
            return r.status_code == 200 or process.poll() is not None

        assert wait_for(ready, timeout=240, interval=0.2) and process.poll() is None, log_path.read_text()
        log = log_path.read_text()
        # Each message, without the time, level and logger name in front of it.
        messages = [line.split(": ", 1)[1] for line in log.splitlines() if " balcony." in line]
        order = [next((i for i, m in enumerate(messages) if m.startswith(start)), None)
                 for start in ("starting:", "load: done", "warm-up:", "calibration:", "start-up phases:",
                               "model ready in")]
        assert None not in order and order == sorted(order), (order, log)
        assert not_ready and all(body["phase"] in PHASES for body in not_ready), not_ready

        body = {"model": "smollm2-135m", "stream": True, **LONG, "max_tokens": 1000}
        with httpx.Client(base_url=url, timeout=120) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)  # it runs, and would for many seconds
                process.send_signal(signal.SIGTERM)
                assert wait_for(lambda: httpx.get(url + "/ready").status_code == 503, timeout=10)
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=15) == 0, log_path.read_text()
                with pytest.raises(httpx.HTTPError):
                    list(lines)  # cut off: the process left without finishing it
    finally:
        stop(process)
    log = log_path.read_text()
    assert "SIGTERM: draining 1 requests" in log and "second SIGTERM: exiting now" in log, log
    assert "Traceback" not in log, log


def test_a_model_that_fails_to_load_ends_the_server_with_status_1(tmp_path):
    """The load runs in its own thread; its error must reach the app (it once stayed "loading" for
    ever: the callback that carried the error looked up a name the except block had unbound)."""
    missing = tmp_path / "no-such-model"
    process, url, log_path = launch(tmp_path, "--model", str(missing))
    try:
        assert process.wait(timeout=120) == 1, log_path.read_text()
    finally:
        stop(process)
    log = log_path.read_text()
    assert "the model failed to load" in log and str(missing) in log, log
    assert "NameError" not in log, log


def test_in_own_thread_hands_back_results_and_errors():
    from server.app import in_own_thread

    def fail(kind):
        raise kind("boom")

    async def main():
        assert await in_own_thread(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ValueError, match="boom"):
            await in_own_thread(fail, ValueError)
        with pytest.raises(RuntimeError, match="StopIteration: boom"):  # a future refuses StopIteration itself
            await asyncio.wait_for(in_own_thread(fail, StopIteration), timeout=30)

    asyncio.run(main())
