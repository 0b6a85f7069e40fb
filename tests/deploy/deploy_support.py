"""Shared helpers for tests/deploy: required tools, and a live `balcony serve` process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]



def console_script() -> tuple[str, str]:
    """(module, function) of the `balcony` console script, as pyproject.toml declares it."""
    import tomllib

    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["balcony"]
    module, _, function = entry.partition(":")
    return module, function


def require_tool(executable: str, install: str) -> str:
    """Path of a command-line tool, or a test failure that says how to install it."""
    path = shutil.which(executable)
    if path is None:
        pytest.fail(f"`{executable}` is not installed; tests/deploy need it: {install}", pytrace=False)
    return path


def require_module(module: str, install: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.fail(f"Python module `{module}` is not installed; tests/deploy need it: {install}", pytrace=False)


def skip_unless_server_exists() -> None:
    """The server is being written in parallel: skip (clearly) until its package exists.

    Once server/__init__.py exists, a server that does not import or start is a failure.
    """
    if not (REPO / "server" / "__init__.py").is_file():
        pytest.skip("the `server` package cannot be imported yet (no server/__init__.py): "
                    "live checks against `balcony serve` wait for the server")


def cli_command(*args: str) -> list[str]:
    """`balcony ARGS` run from this checkout, whether or not the package is installed."""
    module, function = console_script()
    shim = f"import sys; from {module} import {function} as main; sys.argv[0] = 'balcony'; sys.exit(main())"
    return [sys.executable, "-c", shim, *args]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALCONY_") or k == "BALCONY_HOME"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`balcony serve` on a free port, ready when `start()` returns.

    `env` holds BALCONY_* settings as a container would pass them; the flags given here (model,
    adapters, device, host, port) win over them, as they do for any flag.
    """

    def __init__(self, model: str, adapters: str = "none", env: dict[str, str] | None = None,
                 shutdown_timeout: float = 10.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.shutdown_timeout = shutdown_timeout
        self.env = {**subprocess_env(), **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.argv = cli_command(
            "serve", "--model", model, "--adapters", adapters, "--device", "cpu", "--host", "127.0.0.1",
            "--port", str(self.port), "--shutdown-timeout", str(shutdown_timeout), "--num-kv-blocks", "512",
        )
        self.log = tempfile.NamedTemporaryFile(prefix="balcony-serve-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float | None = None) -> "LiveServer":
        import httpx

        timeout = timeout or float(os.environ.get("BALCONY_TEST_READY_TIMEOUT", "300"))
        self.process = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"`balcony serve` exited with {self.process.returncode} before /ready:\n{self.output()}",
                            pytrace=False)
            try:
                if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"`balcony serve` was not ready within {timeout:.0f} s:\n{self.output()}", pytrace=False)

    def output(self, tail: int = 4000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-tail:]

    def stop(self) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.shutdown_timeout + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode if self.process else None
