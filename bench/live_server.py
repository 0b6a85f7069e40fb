"""Start a real `balcony serve` subprocess on a free loopback port for a benchmark, and stop it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(serve_args: list[str], log_path: Path, ready_timeout: float) -> tuple[subprocess.Popen, str]:
    """``balcony serve`` with ``serve_args``; returns once /ready answers 200 (the process and its URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    return launch_until_ready(cmd, port, "/ready", log_path, ready_timeout, "server")


def launch_until_ready(cmd: list[str], port: int, ready_path: str, log_path: Path, ready_timeout: float,
                       name: str) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` (a server listening on ``port``), output to ``log_path``; return (process, URL)
    once ``ready_path`` answers 200. SystemExit, with the log's tail, if it dies or never gets ready."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while time.monotonic() < started + ready_timeout:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                print(f"{name} ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"{name} not ready after {ready_timeout:g} s (see {log_path})")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
