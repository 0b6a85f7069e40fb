"""The serving path's host ceiling: `balcony serve`'s HTTP front, async engine and step loop with the
model's forward stubbed, driven by N streaming clients.

    python bench/serving_host.py                          # 64 and 256 streams of 64 tokens
    python bench/serving_host.py --streams 16 --tokens 32 --context 128
    python bench/serving_host.py --device-ms 4             # each step also waits 4 ms, lock released
    python bench/serving_host.py --loop uvloop             # the server on uvloop instead of asyncio's loop
    python bench/serving_host.py --engine-process          # the step loop in its own process (balcony serve --engine-process)
    python bench/serving_host.py --mixed                   # stream i asks for full depth and each exit in turn (X-Balcony-Exit)

A server process runs the real app (`server.app.create_app`: FastAPI, the async engine's step
thread, Prometheus metrics, SSE chunks) on an engine whose model is the host-only benchmark's stub
(balcony_runtime/host_step_benchmark.py), so everything a GPU server's host does per token runs, and
nothing else. This process opens ``--streams`` streaming completions at once (token-id prompts of
``--context`` tokens, greedy, ``ignore_eos``, ``--tokens`` each) with a raw HTTP client that only
counts SSE events, and reports tokens per second delivered and milliseconds per engine step (every
step decodes one token of every stream). Beside it, the host-only step of the same shape
(:func:`measure_host_step`, no HTTP, in this process): the difference is what the HTTP side costs
the step loop, since the two share one interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TOKEN_POOL = range(256, 768)  # real ids whose text is mostly whole characters (as host_step_benchmark)


def stub_engine_process_build(max_streams: int, max_len: int, phases=None):
    """--engine-process: the stub engine, built in the engine's process (its steps are not timed
    there, so the step columns read "-")."""
    import torch

    from balcony_runtime.heap import settle_for_serving
    from balcony_runtime.host_step_benchmark import stub_engine
    from balcony_runtime.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")
    engine = stub_engine(loaded, max_streams, max_len)
    settle_for_serving()  # as serve.py's builder does
    return engine


def serve(port: int, max_streams: int, context: int, tokens: int, device_ms: float = 0.0,
          loop: str = "asyncio", engine_process: bool = False) -> None:
    """The server process: the real app on a stub-model engine."""
    import uvicorn
    import torch

    from balcony_runtime.heap import settle_for_serving
    from balcony_runtime.host_step_benchmark import stub_engine
    from balcony_runtime.loader import load_model
    from server.app import create_app
    from server.serve_options import ServeConfig

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")
    stats = {"step_s": [], "step_cpu_s": []}  # each engine.step() call of the step loop: wall, CPU seconds

    def build():
        engine = stub_engine(loaded, max_streams, context + tokens + 8)
        if device_ms:  # a GPU's step: the host waits without holding the interpreter lock
            forward = engine.runner.model.forward

            def on_device(*args):
                time.sleep(device_ms / 1000)
                return forward(*args)

            engine.runner.model.forward = on_device
        step = engine.step

        def timed_step():
            start, start_cpu = time.perf_counter(), time.thread_time()
            out = step()
            stats["step_s"].append(time.perf_counter() - start)
            stats["step_cpu_s"].append(time.thread_time() - start_cpu)
            return out

        # Installed before create_app's loader calibrates, so calibration's steps are recorded too:
        # main() reads only the steps between its before and after snapshots.
        engine.step = timed_step
        settle_for_serving()  # as serve.py's builder does
        return engine

    config = ServeConfig(max_queued_requests=4 * max_streams, engine_process=engine_process)
    start_engine = None
    if engine_process:
        from functools import partial

        from server.engine_process import EngineProcess

        if device_ms:
            raise SystemExit("--device-ms is not simulated with --engine-process")

        def start_engine(state):
            return EngineProcess.launch(partial(stub_engine_process_build, max_streams, context + tokens + 8),
                                        config, state.metrics, on_phase=lambda name: None)

    app = create_app(config, build, "stub", start_engine=start_engine)
    app.get("/bench/stats")(lambda: {k: list(v) for k, v in stats.items()})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop=loop)


async def _one_stream(port: int, body: bytes, exit_name: str | None = None) -> tuple[int, float]:
    """One streaming completion over a raw connection: (SSE events before [DONE], seconds).
    ``exit_name``: the depth asked for (X-Balcony-Exit), else the server's choice."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    depth = b"" if exit_name is None else b"X-Balcony-Exit: %s\r\n" % exit_name.encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n%s"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (depth, len(body), body))
    await writer.drain()
    data = await reader.read()  # until the server closes the connection
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"request failed: {data[:300]!r}")
    events = rest.count(b"data: ")
    if b"data: [DONE]" not in rest:
        raise RuntimeError("stream ended without [DONE]")
    return events - 1, time.perf_counter() - start


async def _drive(port: int, streams: int, context: int, tokens: int, seed: int,
                 exits: list[str] | None = None) -> tuple[float, list[int]]:
    """``exits``: stream i asks for exits[i mod len(exits)] (None: every stream the server's choice)."""
    rng = random.Random(seed)
    bodies = [json.dumps({"model": "stub", "prompt": [rng.choice(TOKEN_POOL) for _ in range(context)],
                          "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
              for _ in range(streams)]
    start = time.perf_counter()
    results = await asyncio.gather(*(_one_stream(port, b, exits[i % len(exits)] if exits else None)
                                     for i, b in enumerate(bodies)))
    return time.perf_counter() - start, [n for n, _ in results]


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not get ready")


def _stats(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/bench/stats", timeout=30).json()


def _served_exits(port: int) -> list[str]:
    """The depths the server serves, deepest first (/v1/models)."""
    import httpx

    card = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][0]
    return [e["exit"] for e in sorted(card["balcony"]["exits"], key=lambda e: -e["layers"])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, action="append", help="concurrent streams (repeatable; default 64, 256)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens per stream")
    parser.add_argument("--device-ms", type=float, default=0.0,
                        help="each step also waits this long without the interpreter lock, as for a GPU's step")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"],
                        help="the server's event loop (as balcony serve --event-loop)")
    parser.add_argument("--engine-process", action="store_true",
                        help="the server's step loop in its own process (as balcony serve --engine-process)")
    parser.add_argument("--mixed", action="store_true",
                        help="stream i asks for full depth and each exit in turn (X-Balcony-Exit), a mixed-depth "
                             "batch (default: every stream the server's choice, full depth on the stub)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process's own mode: its port
    parser.add_argument("--max-streams", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.max_streams, args.context, args.tokens, args.device_ms, args.loop, args.engine_process)
        return
    counts = args.streams or [64, 256]
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--max-streams", str(max(counts)),
                               "--context", str(args.context), "--tokens", str(args.tokens),
                               "--device-ms", str(args.device_ms), "--loop", args.loop]
                              + (["--engine-process"] if args.engine_process else []), cwd=ROOT)
    rows = []
    try:
        _wait_ready(port, server)
        exits = _served_exits(port) if args.mixed else None
        asyncio.run(_drive(port, min(counts), args.context, 4, seed=99, exits=exits))  # a first pass: connections, code paths
        for streams in counts:
            before = _stats(port)
            seconds, events = asyncio.run(_drive(port, streams, args.context, args.tokens, seed=streams, exits=exits))
            after = _stats(port)
            if any(n != args.tokens for n in events):
                raise RuntimeError(f"streams delivered {sorted(set(events))} tokens, expected {args.tokens}")
            rows.append((streams, seconds, {k: after[k][len(before[k]):] for k in after}))
    finally:
        server.terminate()
        server.wait(timeout=60)

    import torch

    from balcony_runtime.host_step_benchmark import every_depth, measure_host_step
    from balcony_runtime.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")
    depths = every_depth(loaded) if args.mixed else None
    print(f"stub model (forward replaced, {loaded.identity}'s shapes), prompts of {args.context} tokens, "
          f"{args.tokens} tokens per stream, greedy, one torch thread"
          + (f", stream i at depth {', '.join(map(str, depths))} in turn" if depths else "")
          + f", the {args.loop} event loop"
          + (", the step loop in its own process" if args.engine_process else "")
          + (f", each step also waiting {args.device_ms:g} ms without the interpreter lock" if args.device_ms else "")
          + "\n")
    print("| streams | wall s | tokens/s delivered | engine steps | wall ms per step | in engine.step() | "
          "step() CPU ms, median | host-only step CPU ms |")
    print("|---|---|---|---|---|---|---|---|")
    for streams, seconds, served in rows:
        host = measure_host_step(loaded, streams, args.context + args.tokens // 2, steps=30, exit_layer=depths)
        steps = len(served["step_s"])
        if not steps:  # --engine-process: steps run in the engine's process, untimed
            print(f"| {streams} | {seconds:.2f} | {streams * args.tokens / seconds:,.0f} | - | "
                  f"{1e3 * seconds / args.tokens:.2f} | - | - | {host.step_cpu_ms:.2f} |", flush=True)
            continue
        print(f"| {streams} | {seconds:.2f} | {streams * args.tokens / seconds:,.0f} | {steps} | "
              f"{1e3 * seconds / steps:.2f} | {sum(served['step_s']) / seconds:.0%} | "
              f"{1e3 * statistics.median(served['step_cpu_s']):.2f} | {host.step_cpu_ms:.2f} |", flush=True)

if __name__ == "__main__":
    main()
