"""Our server beside llama.cpp's llama-server and transformers on this CPU, under the same load.

    python bench/cpu_side_by_side.py [--servers balcony,llama-f16,llama-q4_1,transformers]
        [--streams 1,16] [--duration-s 60] [--prompt-tokens 128] [--output-tokens 64]
        [--warmup-requests 2] [--balcony-args "--dtype float32"] [--balcony-exits 8,15,22,full]
        [--seed 0] [--ready-timeout 900] [--out bench/results/cpu_side_by_side.json] [--quick]
    python bench/cpu_side_by_side.py --summarise bench/results/cpu_side_by_side.json

For every server in --servers, one at a time (each started fresh and stopped before the next, so
two never share the cores), and for every --streams value: a closed loop of that many clients,
each sending its next streamed /v1/completions request as soon as its previous one ends, for
--duration-s after --warmup-requests per client that are not counted. Every request has its own
prompt of exactly --prompt-tokens tokens (random vocabulary words, so no server gains from a
prefix cache), asks for --output-tokens tokens with greedy decoding and ignore_eos, so every
server does the same work.

Servers:
  balcony      `balcony serve` (bench/live_server.py) with --balcony-args; one run per exit in
               --balcony-exits, pinned with the X-Balcony-Exit header
  llama-f16    llama.cpp's llama-server on an f16 GGUF converted from the model's HF directory
  llama-q4_1   llama-server on the Q4_1 GGUF the default model ships as
  transformers LlamaForCausalLM.generate in this process, fp32, greedy: batches of N prompts for
               N streams (no HTTP, no continuous batching)

llama-server is built once from the llama.cpp tree vendored in the llama-cpp-python sdist, under
$BALCONY_BENCH_CACHE (default ~/.cache/balcony/bench)/llama-cpp, and reused after that
(bench/llama_cpp.py).

Per request: TTFT (send to first text chunk) and time per output token ((last text chunk - first)
/ (tokens - 1)); per run: output tokens/s of the requests that finished inside the window, over
the window. Latency percentiles cover every request sent inside the window. Prints a markdown
table; --out gets every request's record as JSON. --quick: 8 s windows, streams 1,4.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from live_server import start_server, stop_server
from llama_cpp import (
    LlamaCpp, bench_cache, ensure_f16_gguf, ensure_llama_server, ensure_q4_1_gguf, hf_model_dir,
    llama_cpp_version, say, start_llama_server,
)
from load_test import pct
from server.routing_headers import EXIT_HEADER

SERVERS = ("balcony", "llama-f16", "llama-q4_1", "transformers")
CONTEXT_SLACK_TOKENS = 64  # per llama-server slot, beyond prompt + output


class PromptBank:
    """Prompt i is a deterministic function of (seed, i): random vocabulary words, cut to exactly
    ``n_tokens`` tokens by the model's tokenizer, so every server gets the same sequence."""

    def __init__(self, tokenizer, n_tokens: int, seed: int):
        self.tokenizer, self.n_tokens, self.seed = tokenizer, n_tokens, seed
        self.words = self._word_list(tokenizer)
        self.prompts: list[str] = []

    @staticmethod
    def _word_list(tokenizer) -> list[str]:
        # Byte-level BPE marks a leading space with 'Ġ': such tokens spelled by letters are words.
        words = [tok[1:] for tok in tokenizer.get_vocab() if tok.startswith("Ġ") and tok[1:].isalpha()
                 and tok[1:].isascii() and len(tok) > 3]
        return sorted(words)

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _make(self, index: int) -> str:
        for attempt in itertools.count():
            rng = random.Random(f"{self.seed}:{index}:{attempt}")
            draft = " ".join(rng.choice(self.words) for _ in range(self.n_tokens + 8))
            ids = self.tokenizer.encode(draft, add_special_tokens=False)[: self.n_tokens]
            text = self.tokenizer.decode(ids)
            # A cut can merge differently when re-read; then draw again.
            if self._count(text) == self.n_tokens:
                return text
            if attempt > 50:
                raise RuntimeError(f"no prompt of exactly {self.n_tokens} tokens after 50 draws")
        raise AssertionError("unreachable")

    def get(self, index: int) -> str:
        while len(self.prompts) <= index:
            self.prompts.append(self._make(len(self.prompts)))
        return self.prompts[index]

    def prepare(self, count: int) -> None:
        """Tokenise ahead of a run so the client does not do it inside the measured window."""
        self.get(count - 1)


def load_tokenizer(hf_dir: Path, padding_side: str = "right"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir, padding_side=padding_side)


# ---- HTTP load ---------------------------------------------------------------------------------

@dataclass
class Record:
    """One request. Times are seconds from the start of its run's window (negative: warm-up)."""

    server: str
    streams: int
    exit: str | None
    phase: str  # warmup | measure
    prompt_index: int
    start: float
    first: float | None = None  # first text chunk
    last: float | None = None  # last text chunk
    end: float | None = None  # stream closed
    text_chunks: int = 0
    output_tokens: int | None = None  # from usage, else text chunks
    prompt_tokens: int | None = None  # from usage, where sent
    served_exit: str | None = None  # the response's X-Balcony-Exit
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def tpot_s(self) -> float | None:
        if self.first is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.last - self.first) / (self.output_tokens - 1)

    def tokens_before(self, t: float) -> float:
        """Output tokens streamed by time ``t``, tokens spaced evenly between the first and last chunk:
        a request still streaming when the window closes counts for what it sent inside it."""
        if self.first is None or self.last is None or not self.output_tokens or t < self.first:
            return 0.0
        if t >= self.last or self.last == self.first:
            return float(self.output_tokens)
        return 1 + (self.output_tokens - 1) * (t - self.first) / (self.last - self.first)

    def as_json(self) -> dict:
        return {**asdict(self), "ttft_s": self.ttft_s, "tpot_s": self.tpot_s}


@dataclass
class LoadSpec:
    """The same load for every server."""

    streams: int
    duration_s: float
    warmup_requests: int  # per client
    prompt_tokens: int
    output_tokens: int


@dataclass
class Target:
    """Where and how requests go: URL, model name, extra headers; which prompt comes next."""

    server: str
    url: str
    model: str
    exit: str | None
    next_prompt: Callable[[], tuple[int, str]]
    headers: dict = field(default_factory=dict)


def stream_line_data(line: str) -> str | None:
    return line[5:].strip() if line.startswith("data:") else None


def shift_clock(records: list[Record], delta: float) -> None:
    """Re-express warm-up records on the clock of the window that follows them."""
    for rec in records:
        rec.start += delta
        rec.first, rec.last, rec.end = (None if v is None else v + delta for v in (rec.first, rec.last, rec.end))


async def one_request(client: httpx.AsyncClient, target: Target, spec: LoadSpec, phase: str, t0: float) -> Record:
    index, prompt = target.next_prompt()
    body = {"model": target.model, "prompt": prompt, "max_tokens": spec.output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    rec = Record(target.server, spec.streams, target.exit, phase, index, time.perf_counter() - t0)
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=target.headers) as response:
            if response.status_code != 200:
                rec.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return rec
            rec.served_exit = response.headers.get(EXIT_HEADER)
            async for line in response.aiter_lines():
                now = time.perf_counter() - t0
                data = stream_line_data(line)
                if data is None or data == "[DONE]":
                    continue
                absorb_chunk(rec, json.loads(data), now)
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = time.perf_counter() - t0
    if rec.output_tokens is None:  # no usage chunk: one token per text chunk
        rec.output_tokens = rec.text_chunks
    if rec.error is None and rec.output_tokens != spec.output_tokens:
        rec.error = f"{rec.output_tokens} output tokens, expected {spec.output_tokens}"
    return rec


def absorb_chunk(rec: Record, chunk: dict, now: float) -> None:
    if "error" in chunk:
        rec.error = json.dumps(chunk["error"])[:300]
    usage = chunk.get("usage")
    if usage:
        rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            rec.first = now if rec.first is None else rec.first
            rec.last = now
            rec.text_chunks += 1


async def closed_loop(target: Target, spec: LoadSpec) -> list[Record]:
    """Warm-up (every client's first requests, all done before the window opens), then each client
    sends back to back until the window closes; requests in flight then are awaited, not cut."""
    # A fresh connection per request (about 0.1 ms on loopback): llama-server now and then closed a
    # kept-alive connection just as the next request went out on it ("Server disconnected without
    # sending a response"), and every server is measured the same way.
    limits = httpx.Limits(max_connections=spec.streams + 2, max_keepalive_connections=0)
    timeout = httpx.Timeout(900, connect=10)
    async with httpx.AsyncClient(base_url=target.url, timeout=timeout, limits=limits) as client:
        warm_t0 = time.perf_counter()

        async def warm_client() -> list[Record]:
            return [await one_request(client, target, spec, "warmup", warm_t0) for _ in range(spec.warmup_requests)]

        warm = [r for batch in await asyncio.gather(*(warm_client() for _ in range(spec.streams))) for r in batch]
        failed = [r for r in warm if r.error]
        if failed:
            raise RuntimeError(f"{target.server}: warm-up request failed: {failed[0].error}")
        t0 = time.perf_counter()
        shift_clock(warm, warm_t0 - t0)

        async def measured_client() -> list[Record]:
            records = []
            while time.perf_counter() - t0 < spec.duration_s:
                records.append(await one_request(client, target, spec, "measure", t0))
            return records

        measured = [r for batch in await asyncio.gather(*(measured_client() for _ in range(spec.streams)))
                    for r in batch]
    return warm + measured


def http_run(target: Target, spec: LoadSpec) -> list[Record]:
    say(f"{target.server}{'' if target.exit is None else ' exit ' + target.exit}: "
        f"{spec.streams} streams, {spec.duration_s:g} s")
    return asyncio.run(closed_loop(target, spec))


def model_name(url: str) -> str:
    models = httpx.get(url + "/v1/models", timeout=30).json().get("data") or [{}]
    return models[0].get("id", "default")


def prompt_cursor(bank: PromptBank) -> Callable[[], tuple[int, str]]:
    """Hands out prompts 0, 1, 2, ... of the bank: each server process sees the same sequence, and
    never a prompt twice (its runs continue where the previous one stopped)."""
    counter = itertools.count()

    def take() -> tuple[int, str]:
        index = next(counter)
        return index, bank.get(index)

    return take


def prompts_needed(specs: list[LoadSpec], runs: int) -> int:
    """How many prompts a server may use, to tokenise them (about 2 ms each) before it starts:
    1000 output tokens/s is more than any of these servers does on a small CPU, and the bank
    extends itself should one do more."""
    return runs * sum(s.streams * s.warmup_requests + int(s.duration_s * 1000 / s.output_tokens) for s in specs)


# ---- the servers -------------------------------------------------------------------------------

def run_balcony(args, bank: PromptBank, specs: list[LoadSpec], log_dir: Path) -> list[Record]:
    serve_args = shlex.split(args.balcony_args)
    max_streams = max(s.streams for s in specs)
    if "--max-num-seqs" not in serve_args:
        serve_args += ["--max-num-seqs", str(max_streams)]
    exits = [e.strip() for e in args.balcony_exits.split(",") if e.strip()]
    bank.prepare(prompts_needed(specs, len(exits)))
    say(f"balcony: starting `balcony serve {shlex.join(serve_args)}`")
    process, url = start_server(serve_args, log_dir / "balcony.log", args.ready_timeout)
    try:
        name, next_prompt = model_name(url), prompt_cursor(bank)
        records = []
        for exit_name in exits:
            target = Target("balcony", url, name, exit_name, next_prompt, {EXIT_HEADER: exit_name})
            for spec in specs:
                records += http_run(target, spec)
        return records
    finally:
        stop_server(process)



def run_llama(server: str, gguf: Path, binary: Path, args, bank: PromptBank, specs: list[LoadSpec],
              log_dir: Path) -> list[Record]:
    max_streams = max(s.streams for s in specs)
    bank.prepare(prompts_needed(specs, 1))
    per_slot = specs[0].prompt_tokens + specs[0].output_tokens + CONTEXT_SLACK_TOKENS
    process, url = start_llama_server(binary, gguf, max_streams, per_slot, log_dir / f"{server}.log",
                                      args.ready_timeout)
    try:
        target = Target(server, url, model_name(url), None, prompt_cursor(bank))
        return [rec for spec in specs for rec in http_run(target, spec)]
    finally:
        stop_server(process)


class StepClock:
    """A generate() streamer that only timestamps: put() comes once with the prompt, then once per
    decoding step with the whole batch's new tokens, so step 1 is the first token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(args, bank: PromptBank, specs: list[LoadSpec], hf_dir: Path) -> list[Record]:
    """generate() in a worker thread (as the servers step their models; see load_test.in_thread)."""
    import torch
    from transformers import LlamaForCausalLM

    say(f"transformers: loading {hf_dir} (fp32, {torch.get_num_threads()} threads)")
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(hf_dir, padding_side="left")  # no padding here: all prompts are equally long
    take = prompt_cursor(bank)

    def batch(spec: LoadSpec, phase: str, t0: float) -> list[Record]:
        picked = [take() for _ in range(spec.streams)]
        inputs = tokenizer([p for _, p in picked], return_tensors="pt", padding=True, add_special_tokens=False)
        clock, start = StepClock(), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=spec.output_tokens, min_new_tokens=spec.output_tokens,
                                 do_sample=False, streamer=clock, pad_token_id=tokenizer.pad_token_id)
        end, steps = time.perf_counter(), clock.times[1:]
        produced = out.shape[1] - inputs.input_ids.shape[1]
        return [Record("transformers", spec.streams, None, phase, index, start - t0,
                       first=steps[0] - t0 if steps else None, last=steps[-1] - t0 if steps else None,
                       end=end - t0, text_chunks=len(steps), output_tokens=produced,
                       prompt_tokens=inputs.input_ids.shape[1],
                       error=None if produced == spec.output_tokens else f"{produced} output tokens")
                for index, _ in picked]

    def one_spec(spec: LoadSpec) -> list[Record]:
        say(f"transformers: {spec.streams} streams (batches of {spec.streams}), {spec.duration_s:g} s")
        bank.prepare(prompts_needed([spec], 1))
        warm_t0 = time.perf_counter()
        # One batch per warm-up round: a client's requests are sequential, so N clients = N-wide batches.
        warm = [r for _ in range(spec.warmup_requests) for r in batch(spec, "warmup", warm_t0)]
        t0 = time.perf_counter()
        shift_clock(warm, warm_t0 - t0)
        records = []
        while time.perf_counter() - t0 < spec.duration_s:  # the batch running at the end finishes, as
            records += batch(spec, "measure", t0)  # the HTTP requests in flight then do
        return warm + records

    return in_worker_thread(lambda: [rec for spec in specs for rec in one_spec(spec)])


def in_worker_thread(fn: Callable[[], list[Record]]) -> list[Record]:
    """``fn()`` on a worker thread, its exception re-raised here. The servers step their models on a
    worker thread, and on 2 busy cores torch ran the same loop several times slower from the main
    thread (see load_test.in_thread), so transformers gets the same treatment."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


# ---- report ------------------------------------------------------------------------------------

@dataclass
class Row:
    server: str
    exit: str | None
    streams: int
    requests: int  # finished inside the window
    output_tok_s: float  # output tokens streamed inside the window, per second
    tpot_p50_ms: float
    tpot_p90_ms: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    errors: int
    tpot_vs_full: float | None = None


def summarise(records: list[Record], window_s: float) -> list[Row]:
    groups: dict[tuple, list[Record]] = {}
    for rec in records:
        if rec.phase == "measure":
            groups.setdefault((rec.server, rec.exit, rec.streams), []).append(rec)
    rows = []
    for (server, exit_name, streams), recs in groups.items():
        ok = [r for r in recs if r.error is None]
        finished = [r for r in ok if r.end is not None and r.end <= window_s]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
        # Tokens streamed inside the window, partial requests included: counting only the requests
        # that finished in it undercounts a closed loop by up to one request per client.
        streamed = sum(r.tokens_before(window_s) for r in ok)
        rows.append(Row(server, exit_name, streams, len(finished), streamed / window_s,
                        1000 * pct(tpot, 50), 1000 * pct(tpot, 90), 1000 * pct(ttft, 50), 1000 * pct(ttft, 90),
                        len(recs) - len(ok)))
    full = {row.streams: row.tpot_p50_ms for row in rows if row.server == "balcony" and row.exit == "full"}
    for row in rows:
        if row.server == "balcony" and row.streams in full:
            row.tpot_vs_full = row.tpot_p50_ms / full[row.streams]
    return rows


def server_label(row: Row) -> str:
    return row.server if row.exit is None else f"{row.server} exit={row.exit}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| server | streams | requests | output tok/s | TPOT p50 ms | TPOT p90 ms | TTFT p50 ms | TTFT p90 ms "
             "| TPOT / full | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "" if r.tpot_vs_full is None else f"{100 * r.tpot_vs_full:.0f}%"
        lines.append(f"| {server_label(r)} | {r.streams} | {r.requests} | {r.output_tok_s:.1f} | {r.tpot_p50_ms:.1f} "
                     f"| {r.tpot_p90_ms:.1f} | {r.ttft_p50_ms:.0f} | {r.ttft_p90_ms:.0f} | {share} | {r.errors} |")
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line(llama_version: str | None) -> str:
    parts = [f"{cpu_model()}, {os.cpu_count()} cores", f"torch {importlib.metadata.version('torch')}",
             f"transformers {importlib.metadata.version('transformers')}"]
    if llama_version:
        parts.append(f"llama.cpp: {llama_version}")
    return "; ".join(parts)


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ", ".join(SERVERS))
    parser.add_argument("--streams", default="1,16", help="concurrent clients per run, comma-separated")
    parser.add_argument("--duration-s", type=float, default=60.0, help="measured window per run")
    parser.add_argument("--warmup-requests", type=int, default=2, help="per client, before the window")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--balcony-args", default="", help="extra `balcony serve` arguments (one string)")
    parser.add_argument("--balcony-exits", default="full", help="one balcony run per exit, e.g. 8,15,22,full")
    parser.add_argument("--seed", type=int, default=0, help="of the prompts")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for a server to start")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_side_by_side.json")
    parser.add_argument("--quick", action="store_true", help="smoke-test size: 8 s windows, streams 1,4")
    parser.add_argument("--summarise", type=Path, default=None, metavar="JSON",
                        help="print the table of an earlier run's --out file again (nothing is run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.streams = 8.0, "1,4"
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.server_list) - set(SERVERS)
    if unknown:
        parser.error(f"unknown --servers {', '.join(sorted(unknown))} (choose from {', '.join(SERVERS)})")
    args.stream_list = [int(s) for s in args.streams.split(",") if s.strip()]
    if args.output_tokens < 2 or args.prompt_tokens < 1 or min(args.stream_list) < 1:
        parser.error("--output-tokens must be at least 2, --prompt-tokens and --streams at least 1")
    return args


def llama_models(servers: list[str], llama: LlamaCpp, hf_dir: Path) -> dict[str, Path]:
    """GGUF file per llama.cpp server asked for (converted or fetched once, before any run)."""
    models = {}
    if "llama-f16" in servers:
        models["llama-f16"] = ensure_f16_gguf(llama, hf_dir, bench_cache() / "smollm2-135m-f16.gguf")
    if "llama-q4_1" in servers:
        models["llama-q4_1"] = ensure_q4_1_gguf()
    return models


def run_all(args, specs: list[LoadSpec], log_dir: Path) -> tuple[list[Record], dict[str, str], str | None]:
    """(records, failures by server, llama.cpp version or None): servers one after another."""
    hf_dir = hf_model_dir()
    bank = PromptBank(load_tokenizer(hf_dir), args.prompt_tokens, args.seed)
    llama = LlamaCpp(bench_cache() / "llama-cpp")
    wants_llama = any(s.startswith("llama-") for s in args.server_list)
    binary = ensure_llama_server(llama) if wants_llama else None
    ggufs = llama_models(args.server_list, llama, hf_dir)
    records, failures = [], {}
    for server in args.server_list:
        try:
            if server == "balcony":
                records += run_balcony(args, bank, specs, log_dir)
            elif server == "transformers":
                records += run_transformers(args, bank, specs, hf_dir)
            else:
                records += run_llama(server, ggufs[server], binary, args, bank, specs, log_dir)
        except (RuntimeError, SystemExit, OSError, httpx.HTTPError) as exc:  # one server failing should not lose the others
            failures[server] = str(exc)[-2000:]
            say(f"{server}: FAILED: {failures[server]}")
    return records, failures, llama_cpp_version(llama) if wants_llama else None


def resummarise(path: Path) -> int:
    """The table of a saved run, recomputed from its per-request records."""
    payload = json.loads(path.read_text())
    fields = set(Record.__dataclass_fields__)
    records = [Record(**{k: v for k, v in r.items() if k in fields}) for r in payload["records"]]
    print(f"Machine: {payload['machine']}\n\nCommand: `{payload['command']}`\n")
    print(markdown_table(summarise(records, float(payload["args"]["duration_s"]))))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise is not None:
        return resummarise(args.summarise)
    specs = [LoadSpec(n, args.duration_s, args.warmup_requests, args.prompt_tokens, args.output_tokens)
             for n in args.stream_list]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = bench_cache() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(sys.orig_argv if argv is None else ["cpu_side_by_side.py", *argv])
    records, failures, llama_version = run_all(args, specs, log_dir)
    rows = summarise(records, args.duration_s)
    machine = machine_line(llama_version)
    print(f"Machine: {machine}\n\nCommand: `{command}`\n")
    print(markdown_table(rows))
    for server, reason in failures.items():
        print(f"\n{server} failed: {reason.splitlines()[0] if reason else ''}")
    payload = {"machine": machine, "command": command, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in vars(args).items()},
               "rows": [asdict(r) for r in rows], "failures": failures, "logs": str(log_dir),
               "records": [r.as_json() for r in records]}
    args.out.write_text(json.dumps(payload, indent=1))
    say(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
