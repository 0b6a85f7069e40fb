"""A real `balcony serve` process on a free port, for tests that speak HTTP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    port: int
    log_path: str
    api_key: str | None = None
    model: str = "smollm2-135m"
    headers: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples whose labels include ``labels`` (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(tmp_path, *args: str, model: str = "smollm2-135m", api_key: str | None = None,
                 timeout: float = 240) -> LiveServer:
    port = free_port()
    log_path = str(tmp_path / f"server-{port}.log")
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port),
           "--adapters", "none", "--num-kv-blocks", "2048", "--dtype", "float32", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(process, port, log_path, api_key, model)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


@pytest.fixture(scope="session")
def default_server(tmp_path_factory, default_model):
    """The default model (fresh balconies), no API key."""
    server = start_server(tmp_path_factory.mktemp("srv"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory, default_model):
    """An API key, one running sequence, a queue of one, unmeetable budgets rejected."""
    server = start_server(tmp_path_factory.mktemp("srv"), "--max-num-seqs", "1", "--max-queued-requests", "1",
                          "--budget-policy", "reject", "--served-model-name", "strict", api_key="sekrit")
    server.model = "strict"
    yield server
    server.stop()


@pytest.fixture
def start(tmp_path):
    """Start an extra server for one test (stopped at the end)."""
    servers = []

    def _start(*args, **kwargs) -> LiveServer:
        servers.append(start_server(tmp_path, *args, **kwargs))
        return servers[-1]

    yield _start
    for s in servers:
        s.stop()


# A short chat template that declares tools as Qwen2.5's does (hermes <tool_call> calls): short
# enough for the tiny model's 256 positions.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
Tools:<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
Call one as <tool_call>{"name": <name>, "arguments": <arguments>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="session")
def hermes_server(tmp_path_factory, tiny_model_dir):
    """The tiny random model with a chat template that declares tools in hermes format."""
    import shutil

    path = tmp_path_factory.mktemp("hermes") / "tiny-hermes"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    server = start_server(tmp_path_factory.mktemp("srv"), model=str(path))
    yield server
    server.stop()
