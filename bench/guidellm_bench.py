"""vLLM's load generator guidellm, run unchanged against `balcony serve`: concurrent streams.

    python bench/guidellm_bench.py [--guidellm /tmp/guidellm-venv/bin/guidellm] [--streams 1,16]
                                   [--duration-s 45] [--prompt-tokens 128] [--output-tokens 64]
                                   [--exit N|full] [--budget-ms MS] [--processor DIR]
                                   [--json-out bench/results/guidellm_cpu.json] [--out docs/benchmarks.md]

guidellm lives in its own virtual environment so that its dependencies leave ours alone:

    python3.11 -m venv /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip install guidellm==0.8.1

Starts `balcony serve` (default model, default settings, plus ``--serve-args``) on a free loopback
port, waits for /ready, then runs one `guidellm run` with its concurrent profile at each of
``--streams`` (``--override profile.streams``), synthetic prompts of ``--prompt-tokens`` tokens
and ``--output-tokens`` output tokens (guidellm sends ``max_completion_tokens`` and
``ignore_eos``), and a ``max_duration`` constraint of ``--duration-s`` per stream count. guidellm
needs a tokenizer to build the prompts: the default model's local directory (or ``--processor``),
with HF_HUB_OFFLINE=1. ``--exit`` and ``--budget-ms`` become X-Balcony-Exit and
X-Latency-Budget-Ms headers on every request, through the backend's ``extras``.

guidellm's own JSON report goes to ``--json-out``; the table (one row per stream count) goes
between the `guidellm` markers of ``--out`` ('-' to print only), with the exact guidellm command,
its version, the machine, its load average and who used the CPU during the run. Exit status 1 if
guidellm failed or any request errored.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from live_server import start_server, stop_server
from llama_cpp import bench_cache, hf_model_dir, say
from load_test import cpu_seconds, machine_busy_seconds
from server.routing_headers import BUDGET_HEADER, EXIT_HEADER

SECTION = "guidellm"
AFTER = "<!-- load-test:end -->"  # where the section goes the first time
HEADING = "## guidellm, unchanged (issue 15)"
DEFAULT_GUIDELLM = Path("/tmp/guidellm-venv/bin/guidellm")


@dataclass
class Row:
    streams: int
    completed: int  # requests that finished inside the window
    errored: int  # requests that failed (guidellm's "errored")
    incomplete: int  # in flight when the window closed, cancelled by guidellm: not failures
    output_tok_s: float  # guidellm's output tokens per second over the window, all requests
    ttft_p50_ms: float | None  # of completed requests
    tpot_p50_ms: float | None
    latency_p50_s: float | None
    prompt_tokens_p50: float | None  # prompt tokens as the server counted them (chat template included)
    errors: dict[str, int] = field(default_factory=dict)  # error message -> count
    window: tuple[float, float] = (0.0, 0.0)  # the benchmark's start and end, time.time()
    cores: tuple[float, float, float] | None = None  # server, guidellm, others over the window


@dataclass(frozen=True)
class Sample:
    at: float  # time.time(), the clock of guidellm's report
    server_s: float  # the server's CPU-seconds so far
    guidellm_s: float  # guidellm's, its worker processes' included
    busy_s: float  # the whole machine's


def window_cores(samples: list[Sample], start: float, end: float) -> tuple[float, float, float] | None:
    """Cores used by the server, guidellm and everything else between ``start`` and ``end``
    (the samples nearest inside the window); None if fewer than two samples fall in it."""
    inside = [s for s in samples if start <= s.at <= end]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    wall = b.at - a.at
    server, guidellm = b.server_s - a.server_s, b.guidellm_s - a.guidellm_s
    return server / wall, guidellm / wall, max(0.0, b.busy_s - a.busy_s - server - guidellm) / wall


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidellm", type=Path, default=DEFAULT_GUIDELLM, help="the guidellm executable")
    parser.add_argument("--streams", default="1,16", help="concurrent streams, one benchmark each, comma-separated")
    parser.add_argument("--duration-s", type=float, default=45.0, help="guidellm's max_duration per stream count")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--request-format", default="/v1/chat/completions",
                        choices=["/v1/chat/completions", "/v1/completions"])
    parser.add_argument("--exit", default=None, help=f"sent as {EXIT_HEADER} (a layer count or 'full')")
    parser.add_argument("--budget-ms", type=float, default=None, help=f"sent as {BUDGET_HEADER}")
    parser.add_argument("--processor", type=Path, default=None,
                        help="tokenizer directory for guidellm's synthetic prompts (default: the default model's)")
    parser.add_argument("--serve-args", default="", help="extra `balcony serve` arguments (one string)")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--json-out", type=Path, default=Path("bench/results/guidellm_cpu.json"),
                        help="guidellm's JSON report")
    parser.add_argument("--out", default="docs/benchmarks.md", help="'-' to print only")
    args = parser.parse_args(argv)
    args.stream_list = [int(s) for s in args.streams.split(",") if s.strip()]
    if not args.stream_list or min(args.stream_list) < 1 or args.duration_s <= 0:
        parser.error("--streams needs positive counts and --duration-s a positive time")
    return args


def request_headers(args) -> dict[str, str]:
    headers = {}
    if args.exit is not None:
        headers[EXIT_HEADER] = args.exit
    if args.budget_ms is not None:
        headers[BUDGET_HEADER] = f"{args.budget_ms:g}"
    return headers


def guidellm_command(args, url: str, processor: Path, report: Path) -> list[str]:
    """`guidellm run` as guidellm 0.8.1's CLI takes it (kind=... options, JSON where nested)."""
    backend = {"kind": "openai_http", "target": url, "request_format": args.request_format}
    if headers := request_headers(args):
        backend["extras"] = {"headers": headers}
    return [str(args.guidellm), "run",
            "--backend", json.dumps(backend),
            "--profile", "kind=concurrent",
            "--override", "profile.streams", ",".join(str(n) for n in args.stream_list),
            "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={processor}",
            "--constraint", f"kind=max_duration,seconds={args.duration_s:g}",
            "--output", f"kind=json,path={report}",
            "--disable-console-interactive"]


def guidellm_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().removeprefix("guidellm version:").strip()


def _p50(metrics: dict, name: str) -> float:
    return metrics[name]["successful"]["median"]


def summarise(report: dict) -> list[Row]:
    """One row per benchmark of a guidellm 0.8.1 JSON report."""
    rows = []
    for bench in report["benchmarks"]:
        m, totals = bench["metrics"], bench["metrics"]["request_totals"]
        done = totals["successful"] > 0
        errors = Counter(r["info"].get("error") or "(no message)" for r in bench["requests"]["errored"])
        rows.append(Row(
            streams=bench["config"]["strategy"]["streams"], completed=totals["successful"],
            errored=totals["errored"], incomplete=totals["incomplete"],
            output_tok_s=m["output_tokens_per_second"]["total"]["mean"],
            ttft_p50_ms=_p50(m, "time_to_first_token_ms") if done else None,
            tpot_p50_ms=_p50(m, "time_per_output_token_ms") if done else None,
            latency_p50_s=_p50(m, "request_latency") if done else None,
            prompt_tokens_p50=_p50(m, "prompt_token_count") if done else None,
            errors=dict(errors), window=(bench["start_time"], bench["end_time"])))
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| streams | completed | failed (errored) | incomplete | output tok/s | TTFT p50 ms | TPOT p50 ms "
             "| request latency p50 s | CPU cores: server / guidellm / others |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cores = "-" if r.cores is None else " / ".join(f"{c:.2f}" for c in r.cores)
        lines.append(f"| {r.streams} | {r.completed} | {r.errored} | {r.incomplete} | {r.output_tok_s:.1f} "
                     f"| {_num(r.ttft_p50_ms, '.0f')} | {_num(r.tpot_p50_ms, '.1f')} | {_num(r.latency_p50_s, '.2f')} "
                     f"| {cores} |")
    return "\n".join(lines)


def error_lines(rows: list[Row]) -> list[str]:
    lines = [f"- {r.streams} streams, {count}x: `{message[:300]}`"
             for r in rows for message, count in sorted(r.errors.items(), key=lambda kv: -kv[1])]
    return lines or ["Errors: none."]


def _loads(values: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def describe(args, rows: list[Row], version: str, command: list[str], run: dict) -> str:
    """The doc section's text: setup, table, errors, definitions, the exact guidellm command."""
    served = f"`balcony serve {args.serve_args}`" if args.serve_args else "`balcony serve` (default model and settings)"
    headers = ", ".join(f"`{k}: {v}`" for k, v in request_headers(args).items())
    depth = headers or "no exit or budget header (full depth)"
    prompt = next((r.prompt_tokens_p50 for r in rows if r.prompt_tokens_p50 is not None), None)
    counted = f" ({prompt:.0f} as the server counts them, chat template included)" if prompt else ""
    return "\n".join([
        f"guidellm {version}, unchanged, against {served} over `{args.request_format}`, streamed; {depth}. "
        f"Synthetic prompts of {args.prompt_tokens} tokens{counted} and {args.output_tokens} output tokens "
        f"(guidellm sends `ignore_eos`), concurrent profile, {args.duration_s:g} s per stream count. "
        f"{run['machine']}. Load average (1 / 5 / 15 min) before: {_loads(run['load_before'])}; "
        f"after: {_loads(run['load_after'])}. guidellm used {run['guidellm_cpu_s']:.0f} CPU-s over its "
        f"{run['wall_s']:.0f} s run, start-up and prompt generation included: load generator, server and "
        "other sessions share the cores (last column, over each benchmark's window).",
        "",
        markdown_table(rows),
        "",
        *error_lines(rows),
        "",
        "Completed, failed and incomplete are guidellm's `request_totals` (successful, errored, incomplete): "
        "incomplete requests were still streaming when the window closed and guidellm cancelled them. "
        "Output tok/s is guidellm's figure (output tokens of all requests over the window); TTFT, TPOT "
        "(time per output token) and request latency are medians over completed requests.",
        "",
        f"guidellm command (HF_HUB_OFFLINE=1): `{shlex.join(command)}`",
    ])


def write_doc(path: Path, body: str, command: str) -> None:
    """The section between our markers; the first time, its heading and markers after the load test's."""
    from decode_throughput import write_section

    begin, end = f"<!-- {SECTION}:begin -->", f"<!-- {SECTION}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin not in text and AFTER in text:
        cut = text.index(AFTER) + len(AFTER)
        path.write_text(f"{text[:cut]}\n\n{HEADING}\n\n{begin}\n{end}{text[cut:]}")
    write_section(path, SECTION, body, command)


def tree_cpu_seconds(root: int) -> float:
    """CPU time of ``root`` and its live descendants, with what their reaped children used (/proc)."""
    parents, used = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        used[pid] = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(frontier)
    return sum(used.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def run_guidellm(command: list[str], log_path: Path, server_pid: int, timeout_s: float) -> tuple[int, list[Sample]]:
    """Run guidellm (HF_HUB_OFFLINE=1), sampling who uses the CPU once a second; (exit status, samples)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    say(f"guidellm: {shlex.join(command)} (log: {log_path})")
    samples: list[Sample] = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            guidellm = tree_cpu_seconds(process.pid)  # before poll(): once reaped, its time is no longer in /proc
            samples.append(Sample(time.time(), cpu_seconds(server_pid), guidellm, machine_busy_seconds()))
            if process.poll() is not None:
                break
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                break
            time.sleep(1.0)
    return process.returncode, samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.guidellm.exists():
        raise SystemExit(f"{args.guidellm} not found: python3.11 -m venv /tmp/guidellm-venv && "
                         "/tmp/guidellm-venv/bin/pip install guidellm==0.8.1")
    from cpu_side_by_side import cpu_model

    version = guidellm_version(args.guidellm)
    processor = args.processor or hf_model_dir()
    log_dir = bench_cache() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    server, url = start_server(shlex.split(args.serve_args), log_dir / "guidellm_server.log", args.ready_timeout)
    try:
        command = guidellm_command(args, url, processor, args.json_out)
        started, started_at = time.monotonic(), time.time()
        rc, samples = run_guidellm(command, log_dir / "guidellm.log", server.pid,
                                   args.duration_s * len(args.stream_list) + 600)
        wall_s = time.monotonic() - started
    finally:
        stop_server(server)
    if rc != 0 or not args.json_out.exists() or args.json_out.stat().st_mtime < started_at:
        tail = (log_dir / "guidellm.log").read_text()[-3000:]
        raise SystemExit(f"guidellm exited with {rc}:\n{tail}\n(server log: {log_dir / 'guidellm_server.log'})")
    rows = summarise(json.loads(args.json_out.read_text()))
    for row in rows:
        row.cores = window_cores(samples, *row.window)
    run = {"machine": f"Machine: {cpu_model()}, {os.cpu_count()} cores", "load_before": load_before,
           "load_after": os.getloadavg(), "guidellm_cpu_s": samples[-1].guidellm_s, "wall_s": wall_s}
    body = describe(args, rows, version, command, run)
    print(body)
    if args.out != "-":
        bench_command = shlex.join(["python", "bench/guidellm_bench.py", *(sys.argv[1:] if argv is None else argv)])
        write_doc(Path(args.out), body, bench_command)
        say(f"wrote the {SECTION} section of {args.out}")
    return 1 if any(r.errored for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
