"""Load test of `balcony serve`: Poisson arrivals at fixed concurrency, a mix of latency budgets.

    python bench/load_test.py [--concurrency 16] [--requests 64] [--rate 4] [--max-tokens 32]
                              [--iso-factor 2] [--dtype auto] [--url http://127.0.0.1:8000]
                              [--out docs/benchmarks.md] [--json-out load_test.json] [--quick]

Starts its own server (`python -m server.cli serve` on a free loopback port) unless --url names one,
then runs, in order:

1. isolated: ``--iso-requests`` requests forced to the shallowest exit (X-Balcony-Exit), one at a
   time on the idle server; the median client-measured e2e is the isolated latency of that exit,
   and a budget class ``<iso-factor>x-exit<N>`` of ``--iso-factor`` times it joins ``--budgets``
   (``--iso-factor 0``: no such class).
2. mix: ``--requests`` streamed completions arriving as a Poisson process (``--rate`` per second),
   at most ``--concurrency`` in flight, each with one of the budget classes (sent as
   X-Latency-Budget-Ms). TTFT, inter-token latency and end-to-end latency are measured here, on
   the client, from the moment each request is sent.
3. mix without budgets: the same jobs (arrival times, prompts, concurrency) with no budget header:
   what budgeted traffic costs the requests that have none (the ``none`` class in both runs).
4. full: ``--full-requests`` requests with no budget (full depth), closed loop at
   ``--concurrency`` streams: the server's throughput.
5. engine: the same requests through LLMEngine in this process (no HTTP), closed loop at the same
   concurrency, while the server idles: the HTTP path's overhead is 1 - full / engine.
6. engine mix: after the server has stopped, a calibrated LLMEngine runs the mix of 2 (same
   arrivals, budgets and concurrency cap) through ``add_request(..., budget_ms=...)``: the budget
   path without HTTP, hit or miss from the engine's ``budget_met``.
7. transformers: the first ``--hf-requests`` of the full-depth requests through `generate`, one by
   one (batch 1).

Every request ignores end-of-sequence, so each generates exactly ``--max-tokens`` tokens and every
path does the same work. Prints markdown tables and writes them between the `load-test` markers of
the output file; ``--json-out`` also writes every mix request (class, budget, exit, e2e, prediction,
hit) for bench/plot_load_test.py. ``--quick`` is a smoke-test size (a few requests per phase,
printed only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median

import httpx

from live_server import start_server, stop_server

PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(items):",
    "In a distant galaxy, a small robot",
    "The three laws of thermodynamics state that",
    "Once upon a time there was a",
    "import numpy as np\nimport torch\n",
    "The recipe calls for two cups of flour, one egg and a pinch of salt. First,",
    "Photosynthesis is the process by which plants turn light into",
]
DEFAULT_BUDGETS = "none,generous=60000,medium=3500,tight=1500"


@dataclass
class Job:
    index: int
    prompt: str
    budget_class: str
    budget_ms: float | None
    arrival_s: float  # offset from the phase's start at which it is sent (0: as soon as a slot frees)
    forced_exit: str | None = None  # sent as X-Balcony-Exit


@dataclass
class Result:
    job: Job
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    tokens: int = 0
    exit: str = ""
    predicted_ms: float | None = None  # the router's prediction for the exit it chose
    predicted_fit: bool | None = None  # the router's verdict on that exit (None: not reported)
    server_ms: float | None = None  # the server's own measured latency
    budget_met: bool | None = None  # the engine's own verdict (engine-only phase; None over HTTP)
    start: float = 0.0
    end: float = 0.0

    @property
    def router_feasible(self) -> bool:
        """The router predicted, at admission, that the exit it chose meets the budget (it picks the
        deepest exit that does). An older server reports no ``predicted_fit``: then its predicted
        latency within the budget."""
        if self.predicted_fit is not None:
            return self.predicted_fit
        return self.predicted_ms is not None and self.predicted_ms <= self.job.budget_ms

    @property
    def hit(self) -> bool:
        if self.budget_met is not None:
            return self.budget_met
        return 1000 * self.e2e_s <= self.job.budget_ms


def parse_budgets(text: str) -> list[tuple[str, float | None]]:
    classes = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        classes.append((name.strip(), float(value) if value else None))
    return classes


def make_jobs(n: int, rate: float, budgets, seed: int = 0) -> list[Job]:
    """Fixed prompts round-robin, budget classes round-robin, Poisson arrivals (rate 0: closed loop)."""
    rng = random.Random(seed)
    jobs, t = [], 0.0
    for i in range(n):
        name, budget = budgets[i % len(budgets)]
        jobs.append(Job(i, PROMPTS[i % len(PROMPTS)], name, budget, t))
        if rate > 0:
            t += rng.expovariate(rate)
    return jobs


# ---- HTTP -------------------------------------------------------------------------------------

async def send(client: httpx.AsyncClient, model: str, job: Job, max_tokens: int) -> Result:
    result = Result(job)
    body = {"model": model, "prompt": job.prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {} if job.budget_ms is None else {"X-Latency-Budget-Ms": str(job.budget_ms)}
    if job.forced_exit is not None:
        headers["X-Balcony-Exit"] = job.forced_exit
    result.start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            result.exit = r.headers.get("X-Balcony-Exit", "")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                if line == "data: [DONE]":
                    result.ok = True
                    break
                chunk = json.loads(line[6:])
                if "balcony" in chunk:
                    info = chunk["balcony"]
                    result.predicted_ms = info["predicted_ms"]
                    if "predicted_fit" in info:
                        result.predicted_fit = info["predicted_fit"]
                    result.server_ms = info.get("measured_ms") or result.server_ms
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    if result.ttft_s == 0.0:
                        result.ttft_s = now - result.start
                    else:
                        result.itls_s.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    result.e2e_s = result.end - result.start
    return result


async def run_http(url: str, model: str, jobs: list[Job], concurrency: int, max_tokens: int,
                   duration_s: float) -> tuple[list[Result], float, int]:
    """(results, wall seconds from first send to last finish, jobs not sent before the duration cap)."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    skipped = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def one(job: Job) -> Result | None:
            nonlocal skipped
            await asyncio.sleep(max(0.0, start + job.arrival_s - time.perf_counter()))
            async with slots:
                if time.perf_counter() - start > duration_s:
                    skipped += 1
                    return None
                return await send(client, model, job, max_tokens)

        results = [r for r in await asyncio.gather(*(one(j) for j in jobs)) if r is not None]
    wall = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
    return results, wall, skipped


def measure_isolated(url: str, model: str, exit_name: str, n: int, max_tokens: int,
                     duration_s: float) -> list[Result]:
    """``n`` requests forced to ``exit_name``, the mix's prompts in turn, one at a time (no other load)."""
    jobs = [Job(i, PROMPTS[i % len(PROMPTS)], f"exit{exit_name}", None, 0.0, forced_exit=exit_name)
            for i in range(n)]
    results, _, _ = asyncio.run(run_http(url, model, jobs, 1, max_tokens, duration_s))
    return results


def shallowest_exit(model_info: dict) -> str:
    """The shallowest exit the server serves (from /v1/models), '8' if it does not say."""
    exits = (model_info.get("balcony") or {}).get("exits") or []
    return str(exits[0]["exit"]) if exits else "8"


def start_load_test_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    return start_server(["--dtype", args.dtype, "--quantization", args.quantization, "--adapters", args.adapters,
                         "--num-kv-blocks", str(args.num_kv_blocks), "--starvation-ratio", str(args.starvation_ratio),
                         "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"], log_path, args.ready_timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU-seconds every process on the machine has used since boot (all cores, /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


class Meter:
    """Over a phase: wall time, this process's CPU, the server's CPU and everyone else's."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid

    def _read(self) -> tuple[float, float, float, float]:
        server = cpu_seconds(self.server_pid) if self.server_pid else 0.0
        return time.perf_counter(), time.process_time(), server, machine_busy_seconds()

    def __enter__(self) -> "Meter":
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        wall, self.own, self.server, busy = (b - a for a, b in zip(self._start, self._read()))
        self.wall = wall
        self.others_share = max(0.0, busy - self.own - self.server) / (wall * os.cpu_count())


# ---- engine only and transformers --------------------------------------------------------------

def in_thread(fn, *args):
    """Run ``fn`` in a worker thread, as the server runs its step loop. On this 2-core machine, with
    other processes busy, torch's 2 intra-op threads driven from the main thread ran the same engine
    loop 3-6x slower than from a worker thread, so every path is measured the way the server runs."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join()
    return out[0]


def run_engine(loaded, jobs: list[Job], concurrency: int, max_tokens: int, args) -> tuple[int, float]:
    """(output tokens, wall seconds): LLMEngine, closed loop at ``concurrency``, full depth."""
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.sampling_params import SamplingParams

    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.generate([j.prompt for j in jobs[:concurrency]], warm)  # same warm-up as the server gets
    pending, in_flight, tokens = list(jobs), set(), 0
    start = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            in_flight.add(engine.add_request(pending.pop(0).prompt, params))
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                in_flight.discard(out.request_id)
    return tokens, time.perf_counter() - start


def run_engine_mix(loaded, jobs: list[Job], concurrency: int, max_tokens: int, duration_s: float,
                   args) -> tuple[list[Result], float, int]:
    """The HTTP mix's jobs through a calibrated LLMEngine, budgets and all: (results, wall seconds
    from first add to last finish, jobs not added before the duration cap). Each job is added at
    its arrival time, once fewer than ``concurrency`` are in flight (as the HTTP client sends it);
    its latency runs from that moment, as the client's does."""
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.errors import RequestError
    from balcony_runtime.sampling_params import SamplingParams

    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks,
                                            starvation_ratio=args.starvation_ratio))
    engine.calibrate()  # as the server does at start-up
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.generate([j.prompt for j in jobs[:concurrency]], warm)  # same warm-up as the server gets
    full = engine.model.full_depth
    pending = sorted(jobs, key=lambda j: j.arrival_s)
    live: dict[str, Result] = {}
    last_token: dict[str, float] = {}
    results, skipped = [], 0
    start = time.monotonic()
    while pending or live:
        now = time.monotonic()
        while pending and len(live) < concurrency and start + pending[0].arrival_s <= now:
            job = pending.pop(0)
            if now - start > duration_s:
                skipped += 1
                continue
            try:
                rid = engine.add_request(job.prompt, params, request_id=f"mix-{job.index}",
                                         budget_ms=job.budget_ms, arrival_time=now)
            except RequestError as exc:  # e.g. refused under --budget-policy reject, as HTTP answers 429
                results.append(Result(job, error=f"{type(exc).__name__}: {exc}", start=now, end=now))
                continue
            live[rid] = Result(job, start=now)
        if not live:
            if pending:
                time.sleep(max(0.0, start + pending[0].arrival_s - time.monotonic()))
            continue
        outputs = engine.step()
        now = time.monotonic()
        for out in outputs:
            result = live.get(out.request_id)
            if result is None:
                continue
            if out.new_token_ids:
                result.tokens += len(out.new_token_ids)
                if result.ttft_s == 0.0:
                    result.ttft_s = now - result.start
                else:
                    result.itls_s.append(now - last_token[out.request_id])
                last_token[out.request_id] = now
            if out.finished:
                result.ok = out.finish_reason != "abort"
                result.e2e_s = out.latency_s if out.latency_s is not None else now - result.start
                result.end = result.start + result.e2e_s
                result.exit = "full" if out.exit_layer == full else str(out.exit_layer)
                result.budget_met = out.budget_met
                if out.route is not None:
                    result.predicted_ms = out.route.predicted_ms
                    result.predicted_fit = out.route.predicted_fit
                results.append(live.pop(out.request_id))
    wall = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
    return results, wall, skipped


def run_transformers(loaded, jobs: list[Job], max_tokens: int) -> tuple[int, float]:
    """(output tokens, wall seconds): `generate`, one request at a time, greedy, prefill included."""
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.dtype).eval()
    encode = lambda p: loaded.tokenizer(p, return_tensors="pt").input_ids  # noqa: E731
    with torch.no_grad():
        hf.generate(encode(jobs[0].prompt), max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        tokens, start = 0, time.perf_counter()
        for job in jobs:
            ids = encode(job.prompt)
            out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start


# ---- report ------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms3(values: list[float]) -> str:
    return " / ".join(f"{1000 * pct(values, q):.0f}" for q in (50, 90, 99))


def exits_of(results: list[Result]) -> str:
    counts = Counter(r.exit for r in results)
    order = sorted(counts, key=lambda e: (e == "full", int(e) if e.isdigit() else 0))
    return ", ".join(f"{e}: {counts[e]}" for e in order)


def latency_rows(groups: list[tuple[str, list[Result]]]) -> list[str]:
    lines = ["| requests | n | exits chosen | TTFT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 | "
             "e2e ms p50 / p90 / p99 | budget hit | router-feasible | hit among feasible | "
             "hit among infeasible | router ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in groups:
        ok = [r for r in rs if r.ok]
        budgeted = [r for r in ok if r.job.budget_ms is not None]
        feasible = [r for r in budgeted if r.router_feasible]
        infeasible = [r for r in budgeted if not r.router_feasible]

        def rate(sub):
            return f"{sum(r.hit for r in sub)}/{len(sub)} ({100 * sum(r.hit for r in sub) / len(sub):.0f}%)" \
                if sub else "-"

        lines.append(
            f"| {name} | {len(ok)}{f' ({len(rs) - len(ok)} failed)' if len(ok) < len(rs) else ''} | {exits_of(ok)} | "
            f"{ms3([r.ttft_s for r in ok])} | {ms3([x for r in ok for x in r.itls_s])} | {ms3([r.e2e_s for r in ok])} | "
            f"{rate(budgeted)} | {len(feasible)}/{len(budgeted) or '-'} | {rate(feasible)} | {rate(infeasible)} | "
            f"{pct([1000 * r.e2e_s / r.predicted_ms for r in ok if r.predicted_ms], 50):.2f} |"
        )
    return lines


def hit_rate(results: list[Result]) -> tuple[int, int]:
    budgeted = [r for r in results if r.ok and r.job.budget_ms is not None]
    return sum(r.hit for r in budgeted), len(budgeted)


def router_ratio(results: list[Result]) -> float:
    """Median of measured e2e / predicted e2e over the budgeted requests."""
    return pct([1000 * r.e2e_s / r.predicted_ms for r in results
                if r.ok and r.job.budget_ms is not None and r.predicted_ms], 50)


def class_throughput(results: list[Result], wall: float, classes: set[str]) -> tuple[int, float, float]:
    """(requests, mean of per-request tokens / e2e, the classes' tokens / the phase's wall time)."""
    ok = [r for r in results if r.ok and r.job.budget_class in classes and r.e2e_s > 0]
    if not ok or wall <= 0:
        return len(ok), float("nan"), float("nan")
    return len(ok), mean(r.tokens / r.e2e_s for r in ok), sum(r.tokens for r in ok) / wall


def records(results: list[Result], budgets: dict[str, float | None]) -> list[dict]:
    """One JSON-ready dict per request, in job order."""
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(1000 * seconds, 1)

    return [{
        "index": r.job.index, "class": r.job.budget_class, "budget_ms": r.job.budget_ms,
        "class_budget_ms": budgets.get(r.job.budget_class), "arrival_s": round(r.job.arrival_s, 3),
        "ok": r.ok, "error": r.error or None, "exit": r.exit, "tokens": r.tokens,
        "e2e_ms": ms(r.e2e_s), "ttft_ms": ms(r.ttft_s),
        "predicted_ms": None if r.predicted_ms is None else round(r.predicted_ms, 1),
        "predicted_fit": r.predicted_fit,
        "hit": r.hit if r.ok and r.job.budget_ms is not None else None,
    } for r in sorted(results, key=lambda r: r.job.index)]


QUICK = dict(requests=12, full_requests=8, hf_requests=2, repeats=1, iso_requests=3, duration=60.0, out=Path("-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="target a running server instead of starting one "
                        "(then the engine and transformers phases load the model with --dtype/--adapters)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    parser.add_argument("--requests", type=int, default=96, help="requests in the budget-mix phase")
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate of the mix phase, per second")
    parser.add_argument("--full-requests", type=int, default=48, help="requests in the full-depth phases")
    parser.add_argument("--hf-requests", type=int, default=8, help="of those, how many transformers serves")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds after which a phase sends no more")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="budget classes, name=milliseconds or a bare name for none (default %(default)s)")
    parser.add_argument("--iso-factor", type=float, default=2.0,
                        help="add a budget class of this many times the isolated latency of the shallowest "
                        "exit, measured first (0: none; default %(default)s)")
    parser.add_argument("--iso-requests", type=int, default=6,
                        help="requests timed for that isolated latency, one at a time (default %(default)s)")
    parser.add_argument("--iso-exit", default=None, help="the exit timed (default: the shallowest served)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "fp16", "bf16", "fp16+bf16", "int8"],
                        help="the weight format, as `balcony serve --quantization` (the engine-only phases load "
                             "the same, so they compare like with like)")
    parser.add_argument("--adapters", default="default", help="as `balcony serve --adapters`")
    parser.add_argument("--num-kv-blocks", type=int, default=4096)
    parser.add_argument("--starvation-ratio", type=float, default=2.0,
                        help="as `balcony serve --starvation-ratio` (the engine-only mix uses the same)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--ready-timeout", type=float, default=900.0,
                        help="seconds to wait for the server to load and calibrate (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the full-depth HTTP and engine phases")
    parser.add_argument("--skip-baselines", action="store_true", help="HTTP phases only")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="'-' to print only")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also write every mix request (with and without budgets) as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                        + " (options given explicitly win)")
    pre, _ = parser.parse_known_args()
    if pre.quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()

    load_before = os.getloadavg()
    budgets = parse_budgets(args.budgets)
    full_jobs = make_jobs(args.full_requests, 0, [("none", None)])
    process = loaded = None
    if args.url is None:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"balcony-load-test-{os.getpid()}.log"
        process, url = start_load_test_server(args, log_path)
    else:
        url = args.url.rstrip("/")
    pid = process.pid if process else None
    http_runs, engine_runs = [], []  # (results or None, tokens, wall, Meter)
    iso, iso_exit, iso_ms = [], None, None
    try:
        model_info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        model = model_info["id"]
        warm = make_jobs(args.concurrency, 0, [("none", None)])
        asyncio.run(run_http(url, model, warm, args.concurrency, 4, args.duration))
        if args.iso_factor > 0:
            iso_exit = args.iso_exit or shallowest_exit(model_info)
            iso = measure_isolated(url, model, iso_exit, args.iso_requests, args.max_tokens, args.duration)
            if not any(r.ok for r in iso):
                raise SystemExit(f"no request forced to exit {iso_exit} succeeded: {iso[0].error if iso else ''}")
            iso_ms = 1000 * median(r.e2e_s for r in iso if r.ok)
            budgets.append((f"{args.iso_factor:g}x-exit{iso_exit}", float(round(args.iso_factor * iso_ms))))
        budgets_text = ",".join(name if ms is None else f"{name}={ms:g}" for name, ms in budgets)
        mix_jobs = make_jobs(args.requests, args.rate, budgets)
        free_jobs = [dataclasses.replace(job, budget_ms=None) for job in mix_jobs]
        with Meter(pid) as mix_meter:
            mix, mix_wall, mix_skipped = asyncio.run(
                run_http(url, model, mix_jobs, args.concurrency, args.max_tokens, args.duration))
        with Meter(pid) as free_meter:
            free, free_wall, free_skipped = asyncio.run(
                run_http(url, model, free_jobs, args.concurrency, args.max_tokens, args.duration))
        if not args.skip_baselines:
            from balcony_runtime.loader import load_model

            loaded = load_model(adapters=None if args.adapters == "none" else args.adapters, dtype=args.dtype,
                                device="cpu", quantization=args.quantization)
        full_skipped = 0
        for _ in range(args.repeats):  # interleaved, so a burst of other jobs hits both paths alike
            with Meter(pid) as meter:
                full, wall, skipped = asyncio.run(
                    run_http(url, model, full_jobs, args.concurrency, args.max_tokens, args.duration))
            full_skipped += skipped
            http_runs.append((full, sum(r.tokens for r in full if r.ok), wall, meter))
            if loaded is not None:  # the server is idle meanwhile
                with Meter(pid) as meter:
                    tokens, wall = in_thread(run_engine, loaded, full_jobs, args.concurrency, args.max_tokens, args)
                engine_runs.append((None, tokens, wall, meter))
    finally:
        if process is not None:
            stop_server(process)
    load_mid = os.getloadavg()

    engine_mix, engine_mix_skipped = None, 0
    if loaded is not None:  # the server has stopped: the engine has the machine to itself
        with Meter(None) as engine_mix_meter:
            engine_mix, engine_mix_wall, engine_mix_skipped = in_thread(
                run_engine_mix, loaded, mix_jobs, args.concurrency, args.max_tokens, args.duration, args)

    best_http = max(http_runs, key=lambda run: run[1] / run[2])
    full, full_tokens, full_wall, full_meter = best_http
    rows = [(f"HTTP, budget mix, Poisson {args.rate:g}/s, at most {args.concurrency} in flight", len(mix),
             sum(r.tokens for r in mix if r.ok), mix_wall, mix_meter, []),
            ("HTTP, the same mix without budgets", len(free), sum(r.tokens for r in free if r.ok), free_wall,
             free_meter, [])]
    if engine_mix is not None:
        rows.append(("engine only (no HTTP), the same budget mix, calibrated", len(engine_mix),
                     sum(r.tokens for r in engine_mix if r.ok), engine_mix_wall, engine_mix_meter, []))
    rows.append((f"HTTP, full depth, {args.concurrency} concurrent streams (best of {len(http_runs)})",
                 len([r for r in full if r.ok]), full_tokens, full_wall, full_meter, http_runs))
    engine_tps = hf_tps = None
    if engine_runs:
        _, tokens, wall, meter = max(engine_runs, key=lambda run: run[1] / run[2])
        engine_tps = tokens / wall
        rows.append((f"engine only (no HTTP), full depth, {args.concurrency} concurrent (best of {len(engine_runs)})",
                     len(full_jobs), tokens, wall, meter, engine_runs))
    if loaded is not None:
        hf_jobs = full_jobs[: args.hf_requests]
        with Meter(None) as hf_meter:
            tokens, wall = in_thread(run_transformers, loaded, hf_jobs, args.max_tokens)
        hf_tps = tokens / wall
        rows.append(("transformers `generate`, one request at a time", len(hf_jobs), tokens, wall, hf_meter, []))
        from balcony_runtime.weight_format import candidate_label

        dtype_name = candidate_label(loaded.model.dtype, loaded.model.quantization)
    else:
        dtype_name = args.dtype
    load_after = os.getloadavg()

    import torch

    lines = [
        f"Default model, dtype {dtype_name}, adapters `{args.adapters}`; {args.max_tokens} output tokens per request "
        f"(end-of-sequence ignored), greedy; {len(PROMPTS)} fixed prompts of 5-17 tokens; "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. Server, load generator and the "
        f"engine-only phases share the machine (the server idles during the full-depth engine-only phase and has "
        f"stopped before the engine-only mix). Load average (1 min) "
        f"before / after the HTTP phases / at the end: {load_before[0]:.2f} / {load_mid[0]:.2f} / {load_after[0]:.2f}. "
        "\"Other jobs\" is the CPU time used during each phase by processes other than this script and its server "
        "(from /proc/stat), as a share of the machine's cores: other sessions share this machine, and where that "
        "share is large the row's figures are depressed.",
        "",
    ]
    if iso_ms is not None:
        iso_ok = [r for r in iso if r.ok]
        lines += [f"Isolated latency of exit {iso_exit}: {iso_ms:.0f} ms, the median client-measured e2e of "
                  f"{len(iso_ok)} requests forced to it (X-Balcony-Exit: {iso_exit}), one at a time on the idle "
                  f"server before the mix (all: {', '.join(f'{1000 * r.e2e_s:.0f}' for r in iso_ok)} ms); "
                  f"the class {budgets[-1][0]} has {args.iso_factor:g}x that, {budgets[-1][1]:g} ms.", ""]
    lines += [
        "| path | requests | requests/s | output tokens/s | vs transformers | all runs, tokens/s | "
        "CPU ms per output token (script / server) | other jobs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, n, tokens, wall, meter, runs in rows:
        ratio = f"{tokens / wall / hf_tps:.2f}x" if hf_tps else "-"
        all_runs = ", ".join(f"{t / w:.1f}" for _, t, w, _ in runs) or "-"
        cpu = f"{1000 * meter.own / tokens:.1f} / {1000 * meter.server / tokens:.1f}"
        lines.append(f"| {name} | {n} | {n / wall:.2f} | {tokens / wall:.1f} | {ratio} | {all_runs} | {cpu} | "
                     f"{100 * meter.others_share:.0f}% |")
    if mix_skipped or free_skipped or full_skipped or engine_mix_skipped:
        lines.append(f"\nNot sent before the {args.duration:g} s cap: {mix_skipped} (mix), {free_skipped} "
                     f"(mix without budgets), {full_skipped} (full), {engine_mix_skipped} (engine mix).")
    classes = [c for c, _ in budgets]
    lines += ["", f"Latency, measured on the client (streamed; budget classes {budgets_text}); "
              "router ratio: median of measured e2e / the router's predicted e2e:", ""]
    lines += latency_rows([*((c, [r for r in mix if r.job.budget_class == c]) for c in classes),
                           ("mix, all", mix),
                           *((f"no budgets sent: {c}", [r for r in free if r.job.budget_class == c]) for c in classes),
                           ("mix without budgets, all", free),
                           ("full depth, closed loop (best run)", full)])
    free_classes = {c for c, b in budgets if b is None}
    with_budgets = class_throughput(mix, mix_wall, free_classes)
    without_budgets = class_throughput(free, free_wall, free_classes)
    if free_classes:
        names = ", ".join(sorted(free_classes))
        lines += ["", f"Requests without a budget in both runs (class {names}): their throughput while the other "
                  "classes send budgets, and while nobody does:", "",
                  "| run | requests | decode tokens/s per request (tokens / e2e, mean) | "
                  "class output tokens / phase wall time |", "|---|---|---|---|",
                  f"| mix with budgets | {with_budgets[0]} | {with_budgets[1]:.2f} | {with_budgets[2]:.2f} |",
                  f"| mix without budgets | {without_budgets[0]} | {without_budgets[1]:.2f} | "
                  f"{without_budgets[2]:.2f} |",
                  f"| with / without | | {with_budgets[1] / without_budgets[1]:.2f} | "
                  f"{with_budgets[2] / without_budgets[2]:.2f} |"]
    if engine_mix is not None:
        lines += ["", "The same budget mix through LLMEngine (no HTTP; calibrated as the server is; same arrivals, "
                  "budgets and concurrency cap; latency from add_request to the last token, hit from the engine's "
                  "`budget_met`):", ""]
        lines += latency_rows([*((c, [r for r in engine_mix if r.job.budget_class == c]) for c in classes),
                               ("engine mix, all", engine_mix)])
    http_full = full_tokens / full_wall
    goals = ["", "| goal | measured | met |", "|---|---|---|"]
    if engine_tps:
        overhead = 1 - http_full / engine_tps
        goals.append(f"| HTTP overhead under 10% at {args.concurrency} streams | {100 * overhead:.1f}% "
                     f"({http_full:.1f} vs {engine_tps:.1f} tok/s) | {'yes' if overhead < 0.10 else 'no'} |")
    if hf_tps:
        ratio = http_full / hf_tps
        goals.append(f"| {args.concurrency} full-depth streams >= 6x transformers one by one | {ratio:.2f}x "
                     f"({http_full:.1f} vs {hf_tps:.1f} tok/s) | {'yes' if ratio >= 6 else 'no'} |")
    if iso_ms is not None:
        name = budgets[-1][0]
        hits, n = hit_rate([r for r in mix if r.job.budget_class == name])
        if n:
            goals.append(f"| >= 95% of the {name} class ({budgets[-1][1]:g} ms) meet their budget | "
                         f"{100 * hits / n:.1f}% ({hits}/{n}) | {'yes' if hits >= 0.95 * n else 'no'} |")
    feasible = [r for r in mix if r.ok and r.job.budget_ms is not None and r.router_feasible]
    if feasible:
        share = sum(r.hit for r in feasible) / len(feasible)
        goals.append(f"| >= 99% of requests whose budget some exit can meet meet it | {100 * share:.1f}% "
                     f"({sum(r.hit for r in feasible)}/{len(feasible)}) | {'yes' if share >= 0.99 else 'no'} |")
    ratio = router_ratio(mix)
    if ratio == ratio:  # not NaN: some budgeted request reported a prediction
        goals.append(f"| router ratio (median measured / predicted e2e, budgeted requests) within 0.8-1.1 | "
                     f"{ratio:.2f} | {'yes' if 0.8 <= ratio <= 1.1 else 'no'} |")
    if free_classes and with_budgets[0] and without_budgets[0]:
        ratio = with_budgets[1] / without_budgets[1]
        goals.append(f"| no-budget throughput with budgets / without >= 0.85 (per request) | {ratio:.2f} "
                     f"({with_budgets[1]:.2f} vs {without_budgets[1]:.2f} tok/s each; class tokens / wall: "
                     f"{with_budgets[2] / without_budgets[2]:.2f}) | {'yes' if ratio >= 0.85 else 'no'} |")
    lines += goals
    lines += [
        "",
        "Definitions. TTFT: from sending the request to the first streamed token; ITL: gaps between a request's "
        "streamed tokens, pooled; e2e: sending to `data: [DONE]`. Budget hit: client-measured e2e <= the budget "
        "(engine-only mix: the engine's `budget_met`, the same test on its own clock). "
        "Router-feasible: the router predicted, at admission, that the exit it chose meets the budget (the first "
        "chunk's `balcony.predicted_fit`; against a server too old to report it, its `predicted_ms` within the "
        "budget); since the router picks the deepest exit predicted to fit and the shallowest when none does, this "
        "is \"the router predicted that some exit meets the budget\". "
        "It is the definition the server can act on, needs no second run, and judges the router's promises; its "
        "weakness is that a pessimistic router shrinks the feasible set, so the \"hit among infeasible\" column "
        "shows how many requests the router called infeasible met their budget anyway. Router ratio: median of "
        "measured e2e / the router's `predicted_ms` (the goal row counts budgeted requests only). "
        "Mix without budgets: the mix's jobs (arrival times, prompts, concurrency) sent with no budget header; "
        "for the requests that have no budget in both runs, it says what the other classes' budgets cost them. "
        "Throughput: successful requests' output "
        "tokens over the wall time from the first send to the last finish. CPU per output token: this script's and "
        "the server's CPU time over the phase (the engine and transformers rows include building the engine or "
        "loading the model, calibration, and a warm-up). The engine-only and transformers paths run in a worker "
        "thread, as the server's step loop does.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.json_out is not None:
        classes_ms = dict(budgets)
        payload = {
            "command": "python bench/load_test.py " + " ".join(sys.argv[1:]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "max_tokens": args.max_tokens, "concurrency": args.concurrency, "rate": args.rate,
            "budgets": classes_ms, "isolated": None if iso_ms is None else {
                "exit": iso_exit, "median_ms": round(iso_ms, 1), "factor": args.iso_factor,
                "e2e_ms": [round(1000 * r.e2e_s, 1) for r in iso if r.ok]},
            "mix": records(mix, classes_ms),
            "mix_no_budgets": records(free, classes_ms),
            "engine_mix": None if engine_mix is None else records(engine_mix, classes_ms),
        }
        args.json_out.write_text(json.dumps(payload, indent=1) + "\n")
    if str(args.out) != "-":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from decode_throughput import write_section

        command = "python bench/load_test.py " + " ".join(sys.argv[1:])
        write_section(args.out, "load-test", table, command.strip())


if __name__ == "__main__":
    main()
