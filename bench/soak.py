"""Soak test of `balcony serve`: a long mixed workload, after which the server must be where it began.

    python bench/soak.py [--duration-s 600] [--warmup-s 60] [--workers 6] [--seed 0] [--sample-s 5]
                         [--serve-args "--max-num-seqs 32"] [--json-out bench/results/soak_cpu.json]
                         [--out docs/benchmarks.md]

Starts `balcony serve` (default model and settings, plus ``--serve-args``) on a free loopback port,
waits for /ready, then drives a seeded mix from ``--workers`` client tasks through the official
`openai` AsyncOpenAI client (no retries): completions and chat, streamed (with usage) and not,
``n`` of 1-3, a list of two prompts, forced exits and latency budgets (headers), ``max_tokens`` of
1-16 and 48-128, ``response_format`` json_schema, stop strings, logprobs, seeds; plus, by design,
streams the client closes after 1-5 chunks, requests whose SDK timeout (1-4 s) fires, and streams
given up after a deadline of 0.2-3 s, often before the response headers (all three ignore
end-of-sequence with hundreds of tokens to go, so the server must abort them). One more task sends
an invalid request every ``--invalid-interval-s`` with raw httpx (bad JSON, wrong Content-Type,
unknown field, max_tokens over the model's length, unknown model, bad exit or budget header): each
must get its 4xx in OpenAI's error envelope.

A warm-up phase (``--warmup-s``) runs the same mix first; then the client waits until the server is
idle and takes the baseline (/metrics, VmRSS); the soak phase runs ``--duration-s``; the client
waits for its requests to end and polls /metrics until running, waiting and KV-cache usage are 0.
VmRSS (/proc/<pid>/status) is sampled every ``--sample-s`` throughout. Checks:

- no 5xx: none on the client (status, in-band stream error, dropped connection), no ERROR line in
  the server's log (the server keeps no per-status counter);
- invalid requests answered with the expected 4xx and envelope; valid ones never fail;
- no leaked blocks: kv_cache_usage_perc, num_requests_running and num_requests_waiting back to 0
  within ``--idle-limit-s`` of the last response;
- memory: VmRSS at the end against the baseline after warm-up, growth under ``--rss-growth-limit``;
- counters exact, over the soak window (metrics after minus baseline) and over the whole run (the
  counters start at 0: the server's own warm-up bypasses them). What server/async_engine.py counts,
  per engine request (one per prompt and choice), labelled with the exit the request's group got:
  at finish, request_success{finished_reason=stop|length}, prompt_tokens (the prompt, once per
  choice), generation_tokens, one observation each of e2e, queue time and prediction error, and
  budget_requests{outcome=hit|miss} (a budget was sent) or {none}; when its client goes away
  first, request_success{finished_reason=abort} and nothing else. The client derives each from
  what it sent and received (finish reasons, usage, the X-Balcony-Exit header; aborted requests
  carry a forced exit or their response headers); hit and miss are compared as their sum.

Prints a summary; writes it between the `soak` markers of ``--out`` ('-' to print only), raw JSON
to ``--json-out``. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from live_server import start_server, stop_server
from server.routing_headers import BUDGET_HEADER, EXIT_HEADER

SECTION = "soak"
AFTER = "<!-- load-test:end -->"  # where the section goes the first time
HEADING = "## Soak (issue 14)"
PROMPTS = ["The history of the printing press begins", "def quicksort(items):",
           "In a distant galaxy, a small robot", "The three laws of thermodynamics state that",
           "Once upon a time there was a", "Photosynthesis is the process by which plants turn light into"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers.",
             "Describe a person as JSON.", "How do I reverse a list in Python?"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
KINDS = {  # workload kind: weight
    "completion": 16, "completion_stream": 16, "chat": 16, "chat_stream": 16,
    "disconnect": 12, "timeout": 8, "stream_timeout": 6,
}
ABORTED = ("disconnected", "timeout")  # outcomes whose engine requests the server aborts
COUNTED = ("balcony:request_success_total", "balcony:generation_tokens_total", "balcony:prompt_tokens_total",
           "balcony:e2e_request_latency_seconds_count", "balcony:request_queue_time_seconds_count",
           "balcony:router_prediction_error_seconds_count", "balcony:budget_requests_total")
PER_FINISH = COUNTED[3:6]  # one observation per finished engine request
GAUGES = ("balcony:kv_cache_usage_perc", "balcony:num_requests_running", "balcony:num_requests_waiting")


@dataclass
class Spec:
    """One request the mix sends."""

    kind: str
    chat: bool
    stream: bool
    body: dict  # keyword arguments of the SDK's create()
    headers: dict[str, str]
    choices: int  # engine requests behind it: prompts x n
    timeout: float  # the SDK's timeout (httpx's, per read), seconds
    close_after: int | None = None  # close the stream after this many chunks with choices
    deadline: float | None = None  # give up on the whole request after this many seconds


@dataclass
class Record:
    """What the client saw of one request."""

    kind: str
    outcome: str = ""  # ok, disconnected, timeout (by design or not), 4xx, 5xx, stream_error, ...
    status: int | None = None
    exit: str | None = None  # X-Balcony-Exit (a forced exit's value if no response came)
    choices: int = 0
    budget: bool = False
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int = 0  # as the server counts them: usage.prompt_tokens x n
    completion_tokens: int = 0
    detail: str = ""


# ---- pure functions: metrics, expectations, checks ------------------------------------------

def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, without the ``_created`` stamps."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def diff(after: dict, before: dict) -> dict:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def gauges(samples: dict) -> dict[str, float]:
    return {name: samples.get((name, ()), float("nan")) for name in GAUGES}


def server_counters(samples: dict) -> Counter:
    """The compared counters, budget hit and miss merged into one outcome, zeros dropped."""
    out: Counter = Counter()
    for (name, labels), value in samples.items():
        if name not in COUNTED or not value:
            continue
        if name == "balcony:budget_requests_total":
            labels = tuple((k, "hit|miss" if k == "outcome" and v in ("hit", "miss") else v) for k, v in labels)
        out[(name, labels)] += int(value) if float(value).is_integer() else value
    return out


def expected_counters(records: list[Record]) -> Counter:
    """What the server should have counted for these requests (see the module's docstring)."""
    out: Counter = Counter()
    for r in records:
        by_exit = (("exit", r.exit),)
        if r.outcome == "ok":
            for reason in r.finish_reasons:
                out[("balcony:request_success_total", (("exit", r.exit), ("finished_reason", reason)))] += 1
                for name in PER_FINISH:
                    out[(name, by_exit)] += 1
                outcome = "hit|miss" if r.budget else "none"
                out[("balcony:budget_requests_total", (("exit", r.exit), ("outcome", outcome)))] += 1
            out[("balcony:generation_tokens_total", by_exit)] += r.completion_tokens
            out[("balcony:prompt_tokens_total", by_exit)] += r.prompt_tokens
        elif r.outcome in ABORTED:
            out[("balcony:request_success_total", (("exit", r.exit), ("finished_reason", "abort")))] += r.choices
    return +out


def compare(expected: Counter, server: Counter) -> list[dict]:
    """One row per counter and label set either side has: expected, server, equal."""
    rows = []
    for name, labels in sorted(set(expected) | set(server), key=str):
        e, s = expected.get((name, labels), 0), server.get((name, labels), 0)
        rows.append({"metric": name, "labels": dict(labels), "client": e, "server": s, "equal": e == s})
    return rows


def error_envelope_ok(status: int, expected_status: int, body: bytes) -> bool:
    """The expected 4xx, with OpenAI's {"error": {"message", "type", "param", "code"}}."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (status == expected_status and isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)
            and isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str))


def vm_kib(status_text: str, key: str = "VmRSS") -> int:
    """A ``kB`` line of /proc/<pid>/status."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {key} line")


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident memory: all of it, anonymous (heap) and file-backed (mapped files)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {"rss": vm_kib(status), "anon": vm_kib(status, "RssAnon"), "file": vm_kib(status, "RssFile"),
            "hwm": vm_kib(status, "VmHWM")}


def log_errors(log_text: str) -> list[str]:
    """Lines of the server's log at ERROR or worse, and tracebacks."""
    return [line for line in log_text.splitlines() if " ERROR " in line or " CRITICAL " in line
            or line.startswith(("ERROR:", "CRITICAL:", "Traceback"))]  # ours, then uvicorn's own format


@dataclass
class Check:
    name: str
    goal: str
    measured: str
    passed: bool


def evaluate(outcomes: Counter, invalid: Counter, server_errors: int, idle_s: float | None, idle_gauges: dict,
             rss_base_kib: int, rss_end_kib: int, mismatches: dict[str, int], idle_limit_s: float,
             growth_limit: float) -> list[Check]:
    """``outcomes``: valid requests' outcome -> count (aborts by design as 'disconnected'/'timeout'
    of their kinds, other failures as 'unexpected: ...'); ``invalid``: 'ok' or the wrong answer ->
    count; ``mismatches``: window name -> counters that differ."""
    fives = sum(n for o, n in outcomes.items() if o in ("5xx", "stream_error", "connection_error"))
    fives += sum(n for o, n in invalid.items() if o == "5xx")
    unexpected = sum(n for o, n in outcomes.items() if o.startswith("unexpected"))
    wrong = sum(n for o, n in invalid.items() if o != "ok")
    growth = rss_end_kib / rss_base_kib - 1
    idle_text = (f"{idle_s:.1f} s" if idle_s is not None else "not idle") + " (" + ", ".join(
        f"{k.removeprefix('balcony:')} {v:g}" for k, v in idle_gauges.items()) + ")"
    checks = [
        Check("no 5xx", "0 (client: status, stream error events, dropped connections; server log: ERROR lines)",
              f"{fives} on the client, {server_errors} ERROR lines in the server log",
              fives == 0 and server_errors == 0),
        Check("invalid requests get their 4xx in OpenAI's envelope", "all",
              f"{invalid.get('ok', 0)} of {sum(invalid.values())}", wrong == 0 and sum(invalid.values()) > 0),
        Check("valid requests never fail", "0 failures", f"{unexpected}", unexpected == 0),
        Check("no leaked blocks: KV usage, running, waiting back to 0", f"within {idle_limit_s:g} s of idling",
              idle_text, idle_s is not None and idle_s <= idle_limit_s),
        Check("memory growth (VmRSS end / after warm-up)", f"under {100 * growth_limit:g}%",
              f"{100 * growth:+.1f}% ({rss_base_kib / 1024:.0f} -> {rss_end_kib / 1024:.0f} MiB)",
              growth < growth_limit),
    ]
    for window, n in mismatches.items():
        checks.append(Check(f"counters exact ({window})", "every compared counter equals the client's count",
                            f"{n} differ", n == 0))
    return checks


# ---- the workload ---------------------------------------------------------------------------

def routing_headers(rng: random.Random, exits: list[str]) -> dict[str, str]:
    pick = rng.choices(["none", "generous", "medium", "tight", "exit", "exit+budget"], [35, 15, 15, 10, 15, 10])[0]
    budget = {"generous": "60000", "medium": "3000", "tight": "300", "exit+budget": "5000"}.get(pick)
    headers = {BUDGET_HEADER: budget} if budget else {}
    if pick.startswith("exit"):
        headers[EXIT_HEADER] = rng.choice(exits)
    return headers


def build_spec(rng: random.Random, kind: str, model: str, exits: list[str]) -> Spec:
    aborting = kind in ("disconnect", "timeout", "stream_timeout")
    chat = kind.startswith("chat") or (aborting and rng.random() < 0.5)
    stream = kind.endswith("stream") or kind in ("disconnect", "stream_timeout")
    body: dict = {"model": model}
    extra: dict = {}
    prompts = 1
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    elif not aborting and rng.random() < 0.15:
        body["prompt"] = rng.sample(PROMPTS, 2)
        prompts = 2
    else:
        body["prompt"] = rng.choice(PROMPTS)
    headers = routing_headers(rng, exits)
    timeout, close_after, deadline = 900.0, None, None
    if aborting:  # hundreds of tokens to go, so the server can only abort them
        body.update(max_tokens=rng.randint(200, 300), n=rng.choice([1, 2]), temperature=0)
        extra["ignore_eos"] = True
        if kind == "disconnect":
            close_after = rng.randint(1, 5)
        else:
            headers[EXIT_HEADER] = rng.choice(exits)  # known label for the abort the server counts
            if kind == "timeout":  # the SDK's own timeout: no response within it
                timeout = rng.uniform(1.0, 4.0)
            else:  # a deadline on the whole stream: httpx times single reads, which tokens keep short
                deadline = rng.uniform(0.2, 3.0)
    else:
        large = rng.random() < 0.35
        body.update(max_tokens=rng.randint(48, 128) if large else rng.randint(1, 16),
                    n=rng.choices([1, 2, 3], [6, 3, 1])[0])
        if rng.random() < 0.5:
            body.update(temperature=0.8, seed=rng.randrange(10**6))
        else:
            body["temperature"] = 0
        if rng.random() < 0.3:
            body["stop"] = ["."] if chat else ["\n", "."]
        if rng.random() < 0.3:
            body.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
        if rng.random() < 0.2:
            fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
            (body if chat else extra)["response_format"] = fmt  # an extension on completions
            body["max_tokens"] = max(body["max_tokens"], 64)
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if extra:
        body["extra_body"] = extra
    return Spec(kind, chat, stream, body, headers, prompts * body["n"], timeout, close_after, deadline)


async def send(client, spec: Spec) -> Record:
    """One request through the SDK (no retries); the outcome and what the server should count."""
    import openai

    rec = Record(spec.kind, exit=spec.headers.get(EXIT_HEADER), choices=spec.choices,
                 budget=BUDGET_HEADER in spec.headers)
    api = client.chat.completions if spec.chat else client.completions
    reasons: dict[int, str] = {}
    usage = parsed = None
    try:
        async with asyncio.timeout(spec.deadline):
            raw = await api.with_raw_response.create(**spec.body, extra_headers=spec.headers, timeout=spec.timeout)
            rec.status, rec.exit = raw.status_code, raw.headers.get(EXIT_HEADER)
            parsed = raw.parse()
            if not spec.stream:
                reasons = {c.index: c.finish_reason for c in parsed.choices}
                usage = parsed.usage
            else:
                seen = 0
                async for chunk in parsed:
                    for c in chunk.choices:
                        if c.finish_reason:
                            reasons[c.index] = c.finish_reason
                    seen += bool(chunk.choices)
                    usage = chunk.usage or usage
                    if spec.close_after is not None and seen >= spec.close_after:
                        await parsed.close()
                        rec.outcome = "disconnected"
                        return rec
    except (openai.APITimeoutError, TimeoutError):
        if spec.stream and parsed is not None:
            await parsed.close()
        rec.outcome, rec.detail = "timeout", "mid-stream" if parsed is not None else "before the response headers"
        return rec
    except openai.APIStatusError as exc:
        rec.status, rec.outcome = exc.status_code, "5xx" if exc.status_code >= 500 else f"{exc.status_code}"
        rec.detail = str(exc)[:300]
        return rec
    except openai.APIConnectionError as exc:
        rec.outcome, rec.detail = "connection_error", repr(exc)[:300]
        return rec
    except openai.APIError as exc:  # an error event inside a 200 stream
        rec.outcome, rec.detail = "stream_error", str(exc)[:300]
        return rec
    if usage is None or len(reasons) != spec.choices:
        rec.outcome, rec.detail = "malformed", f"{len(reasons)} finish reasons, usage {usage}"
        return rec
    rec.outcome = "ok"
    rec.finish_reasons = [reasons[i] for i in sorted(reasons)]
    rec.prompt_tokens = usage.prompt_tokens * spec.body["n"]
    rec.completion_tokens = usage.completion_tokens
    return rec


def invalid_requests(model: str) -> list[tuple[str, dict, int]]:
    """(name, httpx request arguments, expected status)."""
    ok = {"model": model, "prompt": "Hello", "max_tokens": 4}
    js = {"Content-Type": "application/json"}
    return [
        ("bad JSON", {"content": b'{"model": "' + model.encode() + b'", "prompt": ', "headers": js}, 400),
        ("wrong Content-Type", {"content": json.dumps(ok).encode(), "headers": {"Content-Type": "text/plain"}}, 415),
        ("unknown field", {"json": {**ok, "frobnicate": 1}}, 400),
        ("unknown field (chat)", {"json": {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                           "max_tokens": 4, "frobnicate": 1}}, 400),
        ("max_tokens too large", {"json": {**ok, "max_tokens": 10**6}}, 400),
        ("unknown model", {"json": {**ok, "model": "no-such-model"}}, 404),
        ("bad exit header", {"json": ok, "headers": {EXIT_HEADER: "7"}}, 400),
        ("bad budget header", {"json": ok, "headers": {BUDGET_HEADER: "-5"}}, 400),
    ]


async def send_invalid(http: httpx.AsyncClient, rng: random.Random, cases) -> Record:
    name, request, expected = rng.choice(cases)
    path = "/v1/chat/completions" if "messages" in request.get("json", {}) else "/v1/completions"
    rec = Record(f"invalid: {name}")
    try:
        r = await http.post(path, **request)
    except httpx.HTTPError as exc:
        rec.outcome, rec.detail = "connection_error", repr(exc)[:300]
        return rec
    rec.status = r.status_code
    rec.outcome = "ok" if error_envelope_ok(r.status_code, expected, r.content) else (
        "5xx" if r.status_code >= 500 else f"wrong: {r.status_code}")
    rec.detail = "" if rec.outcome == "ok" else r.text[:300]
    return rec


async def run_phase(client, http, model: str, exits: list[str], args, seconds: float, seed: int) -> list[Record]:
    """``args.workers`` tasks sending the mix, one sending invalid requests, until ``seconds`` pass
    (each then finishes the request it is on)."""
    end = time.monotonic() + seconds
    records: list[Record] = []

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
            records.append(await send(client, build_spec(rng, kind, model, exits)))

    async def invalid_worker() -> None:
        rng, cases = random.Random(seed * 1000 + 999), invalid_requests(model)
        while time.monotonic() < end:
            records.append(await send_invalid(http, rng, cases))
            await asyncio.sleep(args.invalid_interval_s)

    await asyncio.gather(*(worker(i) for i in range(args.workers)), invalid_worker())
    return records


# ---- the run ----------------------------------------------------------------------------------

def classify(records: list[Record]) -> tuple[Counter, Counter]:
    """(valid requests' outcomes for the checks, invalid requests' outcomes)."""
    valid, invalid = Counter(), Counter()
    for r in records:
        if r.kind.startswith("invalid"):
            invalid[r.outcome] += 1
        elif r.outcome == "ok" or (r.outcome == "disconnected" and r.kind == "disconnect") or (
                r.outcome == "timeout" and r.kind.endswith("timeout")):
            valid[r.outcome] += 1
        elif r.outcome in ("5xx", "stream_error", "connection_error"):
            valid[r.outcome] += 1
        else:
            valid[f"unexpected: {r.outcome}"] += 1
    return valid, invalid


async def scrape(http: httpx.AsyncClient) -> dict:
    r = await http.get("/metrics", timeout=60)
    r.raise_for_status()
    return parse_metrics(r.text)


async def wait_idle(http: httpx.AsyncClient, limit_s: float) -> tuple[float | None, dict, dict]:
    """Poll /metrics until KV usage, running and waiting are 0: (seconds taken or None, gauges, samples)."""
    start = time.monotonic()
    while True:
        samples = await scrape(http)
        now = gauges(samples)
        if all(v == 0 for v in now.values()):
            return time.monotonic() - start, now, samples
        if time.monotonic() - start > limit_s:
            return None, now, samples
        await asyncio.sleep(0.25)


async def sample_rss(pid: int, every_s: float, out: list[dict], phase: list[str]) -> None:
    start = time.monotonic()
    while True:
        out.append({"t": round(time.monotonic() - start, 1), "phase": phase[0], "load1": os.getloadavg()[0],
                    **{f"{k}_kib": v for k, v in memory_kib(pid).items() if k != "hwm"}})
        await asyncio.sleep(every_s)


async def soak(url: str, pid: int, args) -> dict:
    import openai

    info = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]
    model, exits = info["id"], [e["exit"] for e in info["balcony"]["exits"]]
    limits = httpx.Limits(max_connections=args.workers + 8)
    samples: list[dict] = []
    phase = ["warm-up"]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                  http_client=httpx.AsyncClient(limits=limits)) as client, \
            httpx.AsyncClient(base_url=url, timeout=120) as http:
        sampler = asyncio.create_task(sample_rss(pid, args.sample_s, samples, phase))
        warm = await run_phase(client, http, model, exits, args, args.warmup_s, args.seed + 1)
        idle_before = await wait_idle(http, args.idle_limit_s + 600)
        base = idle_before[2]
        mem_base = memory_kib(pid)
        phase[0], started = "soak", time.monotonic()
        records = await run_phase(client, http, model, exits, args, args.duration_s, args.seed)
        load_end, soaked = time.monotonic() - started, os.getloadavg()
        idle_s, idle_gauges, end = await wait_idle(http, args.idle_limit_s)
        if idle_s is None:  # still report the counters once it settles
            end = (await wait_idle(http, 600))[2]
        phase[0] = "idle"
        mem_end = memory_kib(pid)
        sampler.cancel()
    return {"model": model, "exits": exits, "warm": warm, "records": records, "base": base, "end": end,
            "idle_s": idle_s, "idle_gauges": idle_gauges, "mem_base": mem_base, "mem_end": mem_end,
            "samples": samples, "load_s": load_end, "load_at_stop": soaked}


def kind_table(records: list[Record]) -> list[str]:
    outcomes = sorted({r.outcome for r in records})
    by_kind: dict[str, Counter] = {}
    for r in records:
        by_kind.setdefault(r.kind, Counter())[r.outcome] += 1
    lines = [f"| request kind | sent | {' | '.join(outcomes)} |", "|---" * (len(outcomes) + 2) + "|"]
    for kind in sorted(by_kind):
        c = by_kind[kind]
        lines.append(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in outcomes) + " |")
    total = Counter(r.outcome for r in records)
    lines.append(f"| all | {len(records)} | " + " | ".join(str(total[o]) for o in outcomes) + " |")
    return lines


def counter_table(rows: list[dict]) -> list[str]:
    per: dict[str, list[dict]] = {}
    for row in rows:
        per.setdefault(row["metric"], []).append(row)
    lines = ["| counter | label sets | client | server | equal |", "|---|---|---|---|---|"]
    for metric, group in per.items():
        c, s = sum(r["client"] for r in group), sum(r["server"] for r in group)
        lines.append(f"| {metric.removeprefix('balcony:')} | {len(group)} | {c:g} | {s:g} | "
                     f"{sum(r['equal'] for r in group)}/{len(group)} |")
    return lines


def summarise(run: dict, args, command: str, log_text: str, load_before) -> tuple[str, dict, list[Check]]:
    records, warm = run["records"], run["warm"]
    valid, invalid = classify(records)
    window = compare(expected_counters(records), server_counters(diff(run["end"], run["base"])))
    whole = compare(expected_counters(warm + records), server_counters(run["end"]))
    errors = log_errors(log_text)
    base, last = run["mem_base"], run["mem_end"]
    checks = evaluate(valid, invalid, len(errors), run["idle_s"], run["idle_gauges"], base["rss"],
                      last["rss"], {"soak window": sum(not r["equal"] for r in window),
                                       "whole run": sum(not r["equal"] for r in whole)},
                      args.idle_limit_s, args.rss_growth_limit)
    samples = run["samples"]
    rss_max = max(s["rss_kib"] for s in samples)
    loads = [s["load1"] for s in samples if s["phase"] == "soak"] or [0.0]
    mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    ok = [r for r in records if r.outcome == "ok" and not r.kind.startswith("invalid")]
    lines = [
        f"Default model, `{shlex.join(['balcony', 'serve', *shlex.split(args.serve_args)])}`; exits "
        f"{', '.join(run['exits'])}. "
        f"{args.duration_s:g} s soak (the load ran {run['load_s']:.0f} s, until the last request ended) after a "
        f"{args.warmup_s:g} s warm-up of the same mix, excluded from the figures below but not from the whole-run "
        f"counters; {args.workers} client tasks (openai {_version('openai')}, no retries) plus one sending an "
        f"invalid request every {args.invalid_interval_s:g} s; seed {args.seed}. {platform.machine()}, "
        f"{os.cpu_count()} cores, shared with other jobs: load average (1 min) before {load_before[0]:.2f}, "
        f"during the soak mean {sum(loads) / len(loads):.2f} / max {max(loads):.2f}, at its end "
        f"{run['load_at_stop'][0]:.2f}.", "",
        "| check | goal | measured | result |", "|---|---|---|---|",
        *(f"| {c.name} | {c.goal} | {c.measured} | {'PASS' if c.passed else 'FAIL'} |" for c in checks), "",
        f"Requests of the soak window, by kind and client-side outcome ({len(ok)} valid ones completed, "
        f"{sum(len(r.finish_reasons) for r in ok)} choices, {sum(r.completion_tokens for r in ok)} output tokens; "
        "`disconnect`, `timeout` and `stream_timeout` end as disconnected or timeout by design; an invalid "
        "request's `ok` means the expected 4xx in OpenAI's envelope):", "", *kind_table(records), "",
        f"Server memory (VmRSS, sampled every {args.sample_s:g} s, {len(samples)} samples): after warm-up "
        f"{mib(base['rss'])}, at the end {mib(last['rss'])} (anonymous {mib(base['anon'])} -> {mib(last['anon'])}, "
        f"file-backed {mib(base['file'])} -> {mib(last['file'])}), largest sample {mib(rss_max)}, peak since start "
        f"(VmHWM, loading included) {mib(last['hwm'])}.", "",
        "Counters, soak window (server: /metrics at the end minus the baseline after warm-up; client: derived "
        "from what it sent and received):", "", *counter_table(window), "",
        "Whole run (warm-up included; the server's counters from 0):", "", *counter_table(whole),
    ]
    bad = [r for r in window + whole if not r["equal"]]
    if bad:
        lines += ["", "Counters that differ: " + "; ".join(
            f"{r['metric'].removeprefix('balcony:')}{r['labels']} client {r['client']:g}, server {r['server']:g}"
            for r in bad[:20])]
    lines += ["", "Definitions. The server keeps no counter per HTTP status, so 5xx are counted on the client and "
              "as ERROR lines in the server's log. Counters count engine requests (one per prompt and choice): at "
              "finish `request_success{finished_reason=stop|length}`, `prompt_tokens` (the prompt once per choice), "
              "`generation_tokens`, one e2e, queue-time and prediction-error observation, `budget_requests` "
              "(hit or miss, compared as their sum, when a budget was sent; none otherwise); when the client goes "
              "away first, only `request_success{finished_reason=abort}`. The client derives each from its finish "
              "reasons, usage and X-Balcony-Exit headers (aborted requests carry a forced exit or their response "
              "headers), per exit label. Requests refused with a 4xx count nowhere on the server. Idle: the last "
              "response received, /metrics is polled every 0.25 s."]
    if errors:
        lines += ["", "Server log errors: " + "; ".join(f"`{e[:200]}`" for e in errors[:5])]
    def by_kind(rs: list[Record]) -> dict:
        return {k: dict(Counter(r.outcome for r in rs if r.kind == k)) for k in sorted({r.kind for r in rs})}

    payload = {
        "command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args) | {"out": str(args.out), "json_out": str(args.json_out)},
        "model": run["model"], "exits": run["exits"], "checks": [asdict(c) for c in checks],
        "outcomes_soak": dict(valid), "invalid_soak": dict(invalid),
        "kinds_soak": by_kind(records), "kinds_warmup": by_kind(warm),
        "timeouts_soak": dict(Counter(f"{r.kind}: {r.detail}" for r in records if r.outcome == "timeout")),
        "failures": [asdict(r) for r in warm + records if r.outcome not in ("ok", "disconnected", "timeout")][:50],
        "idle_s": run["idle_s"], "idle_gauges": run["idle_gauges"],
        "memory_kib": {"after_warmup": base, "end": last, "max_sample_rss": rss_max},
        "rss_samples": samples, "load_before": load_before, "counters_soak": window, "counters_whole": whole,
        "server_log_errors": errors[:50],
    }
    return "\n".join(lines), payload, checks


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _git_state() -> dict:
    """The commit and the files changed in the working tree the server starts from (read only)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    return {"head": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain").splitlines()}


def write_doc(path: Path, body: str, command: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_throughput import write_section

    begin, end = f"<!-- {SECTION}:begin -->", f"<!-- {SECTION}:end -->"
    text = path.read_text()
    if begin not in text and AFTER in text:
        cut = text.index(AFTER) + len(AFTER)
        path.write_text(f"{text[:cut]}\n\n{HEADING}\n\n{begin}\n{end}{text[cut:]}")
    write_section(path, SECTION, body, command)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=600.0, help="length of the soak phase")
    p.add_argument("--warmup-s", type=float, default=60.0, help="the same mix first, outside the figures")
    p.add_argument("--workers", type=int, default=6, help="client tasks sending the mix")
    p.add_argument("--invalid-interval-s", type=float, default=1.0, help="pause between invalid requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-s", type=float, default=5.0, help="VmRSS sampling period")
    p.add_argument("--idle-limit-s", type=float, default=10.0,
                   help="KV usage, running and waiting must be 0 this soon after the last response")
    p.add_argument("--rss-growth-limit", type=float, default=0.05, help="allowed VmRSS growth, a fraction")
    p.add_argument("--serve-args", default="", help="extra `balcony serve` arguments, one string")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /ready")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="'-' to print only")
    p.add_argument("--json-out", type=Path, default=Path("bench/results/soak_cpu.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/soak.py", *(sys.argv[1:] if argv is None else argv)])
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"balcony-soak-{os.getpid()}.log"
    load_before, git = os.getloadavg(), _git_state()
    process, url = start_server(shlex.split(args.serve_args), log_path, args.ready_timeout)
    try:
        run = asyncio.run(soak(url, process.pid, args))
    finally:
        stop_server(process)
    body, payload, checks = summarise(run, args, command, log_path.read_text(), load_before)
    payload |= {"server_log": str(log_path), "git_at_start": git}
    print(body)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(payload, indent=1) + "\n")
    if str(args.out) != "-":
        write_doc(args.out, body, command)
    failed = [c.name for c in checks if not c.passed]
    print(f"\n{'FAILED: ' + '; '.join(failed) if failed else 'all checks passed'} (server log: {log_path})",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
