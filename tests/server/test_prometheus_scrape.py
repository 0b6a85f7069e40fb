"""A real Prometheus scrapes a live server's /metrics; PromQL returns exactly the requests sent.

Prometheus is the Debian package `prometheus` (README's test command installs it: tests/install_system_tools.sh). It runs as a subprocess
with its own config (1 s scrapes of the test server), its own TSDB in tmp and a loopback port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import httpx
import pytest

MAX_TOKENS = 3
# (budget header value or None, stream?): 2 hits, 2 misses, 3 without a budget.
SENT = [("1000000", False), ("1000000", True), ("0.01", False), ("0.01", True),
        (None, False), (None, True), (None, False)]
EXPECTED_BUDGET = {"hit": 2, "miss": 2, "none": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(tmp_path, target_port: int) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not on PATH (bash tests/install_system_tools.sh installs it)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: balcony\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    return process, f"http://127.0.0.1:{port}"


def query(prom_url: str, promql: str) -> dict[tuple, float]:
    """An instant PromQL query: {label values: value} ({} while the API is not up yet)."""
    try:
        r = httpx.get(prom_url + "/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    return {tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(s["value"][1])
            for s in r.json()["data"]["result"]}


def poll(prom_url: str, promql: str, want, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    got = {}
    while time.monotonic() < deadline:
        got = query(prom_url, promql)
        if got == want:
            return got
        time.sleep(0.25)
    return got


def test_prometheus_scrape_counts_requests(start, tiny_model_dir, tmp_path):
    server = start(model=str(tiny_model_dir))  # its own server: every counter starts at zero
    prometheus, prom_url = start_prometheus(tmp_path, server.port)
    try:
        target = (("instance", f"127.0.0.1:{server.port}"), ("job", "balcony"))
        deadline = time.monotonic() + 30
        while query(prom_url, "up").get(target) != 1.0:  # Prometheus is up and scraped the server
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus never scraped the server"
            time.sleep(0.25)

        with server.client() as client:
            for budget, stream in SENT:
                headers = {"X-Latency-Budget-Ms": budget} if budget else {}
                body = {"model": server.model, "prompt": "Hello there", "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True, "stream": stream}
                if stream:
                    with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                        assert r.status_code == 200
                        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
                else:
                    r = client.post("/v1/completions", json=body, headers=headers)
                    assert r.status_code == 200, r.text
                    assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS

        total = poll(prom_url, "sum(balcony:request_success_total)", {(): float(len(SENT))}, 20)
        assert total == {(): float(len(SENT))}
        by_reason = query(prom_url, "sum by (finished_reason)(balcony:request_success_total)")
        assert by_reason == {(("finished_reason", "length"),): float(len(SENT))}
        budget = poll(prom_url, "sum by (outcome)(balcony:budget_requests_total)",
                      {(("outcome", k),): float(v) for k, v in EXPECTED_BUDGET.items()}, 10)
        assert budget == {(("outcome", k),): float(v) for k, v in EXPECTED_BUDGET.items()}
        tokens = query(prom_url, "sum(balcony:generation_tokens_total)")
        assert tokens == {(): float(len(SENT) * MAX_TOKENS)}
        ttft = query(prom_url, "sum(balcony:time_to_first_token_seconds_count)")
        assert ttft == {(): float(len(SENT))}
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
