"""One GPU check (issue 13, item 7): everything that needs a GPU, in one call from a bare machine.

    python bench/gpu_check.py --shape DIR --out docs/gpu_h200.md [--json results.json] [--quick]
    python bench/gpu_prepare.py        # here, first: the wheels and DIR that travel, and the device call
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke --shape DIR    # tiny, on CPU: tests this script

``--shape DIR`` holds a LLaMA config.json and its tokenizer files (the default model's travel in a
few MB; its weights do not fit a device call, so the check builds random weights of that shape,
seeded: parity and speed do not depend on what the weights learned). Sections, each on its own
(a failure is reported and the next one runs), the report rewritten after each:

1. kernels: bench/gpu_kernels.py (every Triton kernel against its torch reference at real sizes,
   timed against the measured copy bandwidth and cuBLAS).
2. model parity through the engine: one mixed batch (full depth and every exit, a chunked prefill,
   then decode steps) in fp32 and bf16. Every prompt and generated token's logprob is compared
   with an independent reference: transformers' LlamaForCausalLM for full depth, the dense training
   forward with the torch ops (no paged cache, no Triton) for every exit.
3. decode throughput at 1, 16, 64 and 256 rows, full depth and every exit, against transformers'
   generate at batch 1 on the same GPU.
4. the mixed-depth decode step against homogeneous ones.
5. host time per decode step: wall time against the GPU's kernel time (torch.profiler), and the
   stubbed host-only measure of `balcony bench --host-only`.
6. `balcony serve` on the device: start-up, the official openai client (chat, a forced exit, a
   latency budget), a closed loop of streamed completions at full depth and at the shallowest exit, /metrics;
   then the same server with `--engine-process` (the step loop in its own process) and the same
   closed loop at full depth, so the two can be compared where cores are free.

Exit status 1 when a correctness check failed or a section raised; 0 otherwise (speed goals are
reported, not enforced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from balcony_runtime.decode_benchmark import engine_decode_rate, hf_decode_rate, ideal_share  # noqa: E402
from balcony_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from balcony_runtime.host_step_benchmark import every_depth  # noqa: E402
from balcony_runtime.loader import LoadedModel, load_model  # noqa: E402
from balcony_runtime.sampling_params import SamplingParams  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")
# Largest |our logprob - reference logprob| over every compared token, per dtype.
LOGPROB_TOLERANCE = {"float32": 2e-3, "bfloat16": 0.25}


class Report:
    """Markdown sections plus raw figures, rewritten to disk after every section."""

    def __init__(self, out: Path | None, json_out: Path | None):
        self.out, self.json_out = out, json_out
        self.lines: list[str] = []
        self.figures: dict = {}
        self.failures: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines.extend(lines)

    def flush(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text("\n".join(self.lines) + "\n")
        if self.json_out:
            self.json_out.parent.mkdir(parents=True, exist_ok=True)
            self.json_out.write_text(json.dumps({"figures": self.figures, "failures": self.failures}, indent=1))

    @contextmanager
    def section(self, title: str):
        self.add("", f"## {title}", "")
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:  # one broken section must not hide the others' results
            self.failures.append(f"{title}: {type(exc).__name__}: {exc}")
            self.add("```", traceback.format_exc().rstrip()[-3000:], "```", f"**Section failed**: {exc}")
        self.add("", f"_section time {time.perf_counter() - start:.1f} s_")
        self.flush()


# ---- the model ------------------------------------------------------------------------------

def build_random_model(shape: Path, target: Path, smoke: bool, seed: int = 0) -> Path:
    """A LLaMA of ``shape``'s config (tiny in smoke mode) with seeded random weights and its tokenizer.

    Norm weights are drawn away from 1 and the embedding is wider than transformers' default init,
    so a norm applied to the wrong tensor changes the result and the next-token distribution is not
    flat (a flat one hides errors in the logprobs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(shape)
    if smoke:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 4, 64, 96
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
        config.max_position_embeddings = 512
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.get_input_embeddings().weight.normal_(0, 0.08)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (shape / name).exists():
            shutil.copy(shape / name, target / name)
    return target


def load(model_dir: Path, exits: tuple[int, ...], dtype: str, device: str, backend: str) -> LoadedModel:
    loaded = load_model(str(model_dir), adapters=None, exits=exits, dtype=dtype, device=device,
                        kernel_backend=backend, quantization="none")
    g = torch.Generator().manual_seed(1)  # balconies that differ from the layer they were copied from
    with torch.no_grad():
        for balcony in loaded.model.balconies.values():
            for p in balcony.parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.05 * max(0.1, p.float().std().item())).to(p))
    return loaded


def engine_of(loaded: LoadedModel, max_num_seqs: int, batched_tokens: int = 2048, eager: bool = False,
              overlap: bool | None = None) -> LLMEngine:
    """An engine as `balcony serve` builds one (CUDA graphs for decode on a GPU unless ``eager``;
    steps overlapped on a GPU unless ``overlap`` is False)."""
    return LLMEngine(loaded, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=batched_tokens,
                                          kv_cache_memory_gb=4.0, enforce_eager=eager, overlap_steps=overlap))


def greedy_ids(loaded: LoadedModel, prompts: list[list[int]], exits: list[int], new_tokens: list[int],
               overlap: bool) -> list[list[int]]:
    """Greedy tokens of every prompt at its exit, in one engine, without logprobs (rows that ask for
    them make an overlapped engine read each step before the next)."""
    engine = engine_of(loaded, len(prompts), batched_tokens=32, overlap=overlap)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in new_tokens]
    outs = engine.generate(prompts, params, exits)
    return [o.token_ids for o in outs]


# ---- 2. parity ------------------------------------------------------------------------------

def run_mixed_batch(loaded: LoadedModel, prompts: list[list[int]], exits: list[int], new_tokens: int, eager: bool):
    """Greedy generation of every prompt at its exit in one engine, prefill chunked (32 tokens per
    step). Returns per request (prompt logprobs [P-1], generated ids, generated logprobs, rank-1 flags)."""
    engine = engine_of(loaded, len(prompts), batched_tokens=32, eager=eager)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    ids = [engine.add_request(p, params, exit_layer=e) for p, e in zip(prompts, exits)]
    got = {rid: {"prompt": None, "ids": [], "logprobs": []} for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            entry = got[out.request_id]
            if out.prompt_logprobs is not None and entry["prompt"] is None:
                entry["prompt"] = [t.logprob for t in out.prompt_logprobs]
            entry["ids"] += out.new_token_ids
            entry["logprobs"] += [t.logprob for t in out.new_logprobs]
    return [got[rid] for rid in ids]


@torch.no_grad()
def reference_logprobs(loaded: LoadedModel, hf, tokens: list[int], exit_layer: int) -> torch.Tensor:
    """Log-softmax [S, V] fp32 over ``tokens`` at ``exit_layer``: transformers at full depth, else
    the dense training forward through the torch ops."""
    from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, lm_logits
    from kernels.dispatch import TORCH_OPS

    model = loaded.model
    ids = torch.tensor([tokens], device=model.norm.device)  # [1, S]
    if exit_layer == model.full_depth:
        logits = hf(ids).logits[0].float()
    else:
        ops, model.ops = model.ops, TORCH_OPS
        try:
            states = backbone_pass(model, ids, keep={exit_layer})
            logits = lm_logits(model, balcony_normed(model, exit_layer, states))
        finally:
            model.ops = ops
    return torch.log_softmax(logits, dim=-1)


def parity(report: Report, model_dir: Path, exits: tuple[int, ...], device: str, backend: str,
           dtypes: list[str], modes: list[str]) -> None:
    from transformers import LlamaForCausalLM

    report.add("One batch with a row at full depth and one at each exit, each prompt prefilled in chunks",
               "of 32 tokens, then greedy decode steps. Every prompt token's and generated token's logprob",
               "from the engine against the reference (transformers for full depth, the dense torch forward",
               "for exits); |diff| is the largest absolute logprob difference, top-1 the share of generated",
               "tokens that are the reference's argmax.", "",
               "| mode | dtype | exit | tokens compared | max abs logprob diff | top-1 agreement | tolerance | ok |",
               "|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(7)
    for dtype in dtypes:
        loaded = load(model_dir, exits, dtype, device, backend)
        model = loaded.model
        depths = every_depth(loaded)
        vocab = model.arch.vocab_size
        lengths = [77, 45, 20, 64, 5][: len(depths)]
        prompts = [torch.randint(100, vocab, (n,), generator=g).tolist() for n in lengths]
        hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=model.dtype).to(model.norm.device).eval()
        for mode, prompt, depth, res in [(mode, p, d, r) for mode in modes for p, d, r in
                                         zip(prompts, depths, run_mixed_batch(loaded, prompts, depths, 8, mode == "eager"))]:
            seq = prompt + res["ids"]
            ref = reference_logprobs(loaded, hf, seq, depth)  # [S, V]
            targets = torch.tensor(seq[1:], device=ref.device)
            ref_chosen = ref[:-1].gather(1, targets[:, None])[:, 0]  # [S-1]: logprob of each next token
            ours = torch.tensor(res["prompt"] + res["logprobs"], device=ref.device)
            diff = (ours - ref_chosen).abs().max().item()
            gen = slice(len(prompt) - 1, len(seq) - 1)
            top1 = (ref[gen].argmax(-1) == targets[gen]).float().mean().item()
            ok = diff < LOGPROB_TOLERANCE[dtype]
            name = "full" if depth == model.full_depth else str(depth)
            report.add(f"| {mode} | {dtype} | {name} | {len(ours)} | {diff:.2e} | {top1:.2f} | "
                       f"{LOGPROB_TOLERANCE[dtype]:g} | {'yes' if ok else '**NO**'} |")
            report.figures.setdefault("parity", []).append(
                {"mode": mode, "dtype": dtype, "exit": name, "max_abs_diff": diff, "top1": top1, "ok": ok})
            if not ok:
                report.failures.append(f"parity {mode} {dtype} exit {name}: {diff:.3g}")
        # Overlapped steps (step N+1 launched before step N's tokens are read) against synchronous
        # ones: the same greedy tokens, with rows of every exit finishing at different steps.
        lengths = [24, 9, 17, 3, 12][: len(depths)]
        synchronous = greedy_ids(loaded, prompts, depths, lengths, overlap=False)
        overlapped = greedy_ids(loaded, prompts, depths, lengths, overlap=True)
        same = synchronous == overlapped
        report.add(f"| overlapped steps | {dtype} | all | {sum(map(len, overlapped))} | greedy tokens "
                   f"{'equal' if same else 'DIFFER'} to synchronous steps | - | - | {'yes' if same else '**NO**'} |")
        report.figures.setdefault("overlap_parity", []).append({"dtype": dtype, "tokens": sum(map(len, overlapped)),
                                                                "ok": same})
        if not same:
            report.failures.append(f"overlapped steps {dtype}: greedy tokens differ from synchronous steps")
        del hf, loaded
        if device == "cuda":
            torch.cuda.empty_cache()


# ---- 3. decode throughput -------------------------------------------------------------------

@torch.no_grad()
def hf_forward_loop_rate(loaded: LoadedModel, tokens: int) -> float:
    """transformers' forward in a plain greedy loop with its KV cache, batch 1 (no generate()
    machinery): decode tokens/s, a second view of the baseline."""
    from transformers import LlamaForCausalLM

    device = loaded.model.norm.device
    hf = LlamaForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.dtype).eval().to(device)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=device)

    def run(n: int) -> float:
        out = hf(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            out = hf(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        token.item()
        return time.perf_counter() - start

    run(4)
    return tokens / run(tokens)


def throughput(report: Report, loaded: LoadedModel, batches: list[int], tokens: int, modes: list[str]) -> None:
    model = loaded.model
    depths = [*model.exits, model.full_depth]
    hf = hf_decode_rate(loaded, tokens)
    hf_loop = hf_forward_loop_rate(loaded, tokens)
    report.add(f"Decode tokens/s after the prefill step, {tokens} tokens per request, greedy; transformers'",
               f"generate (batch 1, same weights, same GPU): **{hf:.1f} tok/s** (its forward in a plain greedy",
               f"loop with its KV cache, no generate(): {hf_loop:.1f} tok/s). `graphs`: decode steps",
               "replayed from CUDA graphs (the default on a GPU); `eager`: `--enforce-eager`.", "",
               "| mode | exit | ideal share | " + " | ".join(f"{b} rows tok/s (x HF b1)" for b in batches)
               + " | step ms at " + str(max(batches)) + " rows |",
               "|---|---|---|" + "---|" * len(batches) + "---|")
    figures = {"hf_batch1_tok_s": hf, "hf_forward_loop_tok_s": hf_loop, "rows": {}}
    for mode in modes:
        start = time.perf_counter()
        engine = engine_of(loaded, max(batches), eager=mode == "eager")
        built = time.perf_counter() - start
        figures[f"{mode}_engine_s"], figures[f"{mode}_graphs"] = built, engine.graphs_recorded
        engine_decode_rate(engine, 2, "full", 4)  # warm-up (Triton compiles, cuBLAS handles)
        for depth in depths:
            cells, step = [], 0.0
            for b in batches:
                rate, step = engine_decode_rate(engine, b, depth, tokens)
                figures["rows"].setdefault(mode, {}).setdefault(str(depth), {})[b] = {"tok_s": rate, "step_ms": 1e3 * step}
                cells.append(f"{rate:.0f} ({rate / hf:.1f}x)")
            name = "full" if depth == model.full_depth else str(depth)
            report.add(f"| {mode} | {name} | {ideal_share(model, depth):.2f} | " + " | ".join(cells)
                       + f" | {1e3 * step:.2f} |")
        del engine
    report.add("", "Engine construction (KV cache, graph recording): " + "; ".join(
        f"{m} {figures[f'{m}_engine_s']:.1f} s ({figures[f'{m}_graphs']} graphs)" for m in modes) + ".")
    report.figures["throughput"] = figures


# ---- 4. mixed-depth step --------------------------------------------------------------------

def mixed_step(report: Report, loaded: LoadedModel, batches: list[int], context: int, modes: list[str]) -> None:
    from mixed_batch import compositions, median_decode_step

    report.add(f"Median engine step (schedule, forward, sampling) of 9 decode steps, {context} tokens cached",
               "per row.", "", "| mode | rows | composition | step ms | / all full |", "|---|---|---|---|---|")
    for mode in modes:
        engine = engine_of(loaded, max(batches), eager=mode == "eager")
        median_decode_step(engine, [engine.exits[-1]] * 4, context, 3)  # warm-up
        for b in batches:
            rows = {name: median_decode_step(engine, exits, context, 9)
                    for name, exits in compositions(engine.exits, b).items()}
            full = rows["all full"]
            for name, s in rows.items():
                report.add(f"| {mode} | {b} | {name} | {1e3 * s:.2f} | {s / full:.2f} |")
                report.figures.setdefault("mixed_step", []).append(
                    {"mode": mode, "rows": b, "composition": name, "step_ms": 1e3 * s})
        del engine


# ---- 5. host time per step ------------------------------------------------------------------

def device_time_per_step(engine: LLMEngine, steps: int) -> tuple[float, float]:
    """(wall ms, GPU kernel ms) per decode step over ``steps`` steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return 1e3 * wall / steps, kernel_us / 1e3 / steps


def host_time(report: Report, loaded: LoadedModel, batches: list[int], cuda: bool,
              host_sizes: tuple[tuple[int, int], ...], modes: list[str]) -> None:
    from balcony_runtime.host_step_benchmark import measure_host_step

    if cuda:
        report.add("Wall time of a full-depth decode step (context 256) against the time the GPU spent in",
                   "kernels during it (torch.profiler, 8 steps; the profiler adds some host time). Their",
                   "ratio is how host-bound the step is: 1.0 means the GPU never waits. `graphs` and `eager`",
                   "overlap steps (step N+1 launched before step N's tokens are read, the default on a GPU);",
                   "`synchronous`: graphs with `--no-overlap-steps`.", "",
                   "| mode | rows | wall ms/step | GPU kernel ms/step | wall / kernel |", "|---|---|---|---|---|")
    # "synchronous": graphs, each step's tokens read before the next is scheduled (--no-overlap-steps).
    for mode in [*modes, "synchronous"] if cuda else []:
        engine = engine_of(loaded, max(batches), eager=mode == "eager", overlap=False if mode == "synchronous" else None)
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        for b in batches:
            ids = [engine.add_request(list(range(1000 + r, 1256 + r)), params, "full") for r in range(b)]
            while any(engine.request_needs_prefill(rid) for rid in ids):
                engine.step()
            for _ in range(3):
                engine.step()
            wall, kernel = device_time_per_step(engine, 8)
            for rid in ids:
                engine.abort(rid)
            report.add(f"| {mode} | {b} | {wall:.2f} | {kernel:.2f} | {wall / max(kernel, 1e-9):.1f} |")
            report.figures.setdefault("host_bound", []).append(
                {"mode": mode, "rows": b, "wall_ms": wall, "kernel_ms": kernel})
        del engine
    report.add("")
    report.add("Host-only (`balcony bench --host-only`: the forward replaced by a stub; schedule, prepare,",
               "sample, detokenize and postprocess real), this machine's CPU: rows at full depth; rows at",
               "every depth in turn (`--mixed`); and those through the decode graphs with each replay a",
               "no-op (`--mixed --graphs`: on this device, the GPU path's host work with its real copies):", "",
               "| rows | context | full depth: host CPU ms/step | wall ms/step | mixed: CPU ms | mixed, graphs: CPU ms |",
               "|---|---|---|---|---|---|")
    depths = every_depth(loaded)
    for rows, context in host_sizes:
        h = measure_host_step(loaded, rows, context, steps=20)
        mixed = measure_host_step(loaded, rows, context, steps=20, exit_layer=depths)
        graphed = measure_host_step(loaded, rows, context, steps=20, exit_layer=depths, graphs=True)
        report.add(f"| {rows} | {context} | {h.step_cpu_ms:.2f} | {h.step_ms:.2f} | {mixed.step_cpu_ms:.2f} | "
                   f"{graphed.step_cpu_ms:.2f} |")
        report.figures.setdefault("host_only", []).append({"rows": rows, "context": context,
                                                           "cpu_ms": h.step_cpu_ms, "wall_ms": h.step_ms,
                                                           "mixed_cpu_ms": mixed.step_cpu_ms,
                                                           "mixed_graphs_cpu_ms": graphed.step_cpu_ms})


# ---- 6. the server over HTTP ----------------------------------------------------------------

async def _stream(client, url: str, model: str, prompt: str, tokens: int, headers: dict) -> dict:
    """One streamed completion: client-side TTFT, end-to-end seconds, tokens, the exit served."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start, first, count = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        exit_served = resp.headers.get("x-balcony-exit")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                count += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "e2e": end - start, "tokens": count, "exit": exit_served}


async def _closed_loop(url: str, model: str, streams: int, requests: int, tokens: int, headers: dict) -> dict:
    import httpx

    jobs = iter(range(requests))
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=300) as client:
        async def worker():
            for i in jobs:
                results.append(await _stream(client, url, model, f"Request {i}: the history of", tokens, headers))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - start
    out_tokens = sum(r["tokens"] for r in results)
    tpot = [(r["e2e"] - r["ttft"]) / max(1, r["tokens"] - 1) for r in results]
    return {"tok_s": out_tokens / wall, "ttft_p50": statistics.median(r["ttft"] for r in results),
            "tpot_p50": statistics.median(tpot), "e2e_p50": statistics.median(r["e2e"] for r in results),
            "exits": sorted({str(r["exit"]) for r in results}), "tokens": out_tokens, "requests": len(results)}


def server(report: Report, model_dir: Path, dtype: str, smoke: bool, work: Path) -> None:
    import httpx
    from live_server import start_server, stop_server

    args = ["--model", str(model_dir), "--adapters", "none", "--dtype", dtype, "--max-num-seqs", "64",
            "--num-kv-blocks", "4096" if smoke else "65536"]
    log = work / "server.log"
    started = time.perf_counter()
    # The step loop in a thread (on a GPU the engine's own process is the default): the comparison below.
    threaded = [*args, "--engine-process", "off"]
    process, url = start_server(threaded, log, ready_timeout=600)
    ready_s = time.perf_counter() - started
    try:
        models = httpx.get(url + "/v1/models", timeout=30).json()
        report.add(f"`balcony serve {' '.join(threaded)}` (random weights of the shape above): ready in {ready_s:.1f} s "
                   f"(first start: calibration included). Log lines of the start-up:", "", "```",
                   *[line for line in log.read_text().splitlines() if "load:" in line or "ready" in line][-6:],
                   "```", "")
        model_name = models["data"][0]["id"]
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        chat = client.chat.completions.with_raw_response.create(
            model=model_name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
        shallow = str(min(e["layers"] for e in models["data"][0]["balcony"]["exits"]))
        forced = client.completions.with_raw_response.create(
            model=model_name, prompt="Hello", max_tokens=8, extra_headers={"X-Balcony-Exit": shallow})
        budget = client.completions.with_raw_response.create(
            model=model_name, prompt="Hello", max_tokens=32, extra_headers={"X-Latency-Budget-Ms": "20"})
        report.add("The official `openai` client: chat at full depth served exit "
                   f"{chat.headers.get('x-balcony-exit')} ({chat.parse().usage.completion_tokens} tokens); a completion "
                   f"forced to exit {shallow} served {forced.headers.get('x-balcony-exit')}; one with a 20 ms budget for 32 "
                   f"tokens was routed to exit {budget.headers.get('x-balcony-exit')}.", "")
        streams, requests, tokens = (4, 8, 4) if smoke else (64, 256, 64)
        report.add(f"Closed loop over HTTP: {streams} streams, {requests} streamed completions of {tokens} tokens "
                   "(end-of-sequence ignored), client-side figures:", "",
                   "| served at | output tok/s | TTFT p50 ms | time per output token p50 ms | e2e p50 ms | exits seen |",
                   "|---|---|---|---|---|---|")
        for label, headers in (("full depth", {}), (f"exit {shallow} (X-Balcony-Exit)", {"X-Balcony-Exit": shallow})):
            r = asyncio.run(_closed_loop(url, model_name, streams, requests, tokens, headers))
            report.add(f"| {label} | {r['tok_s']:.0f} | {1e3 * r['ttft_p50']:.1f} | {1e3 * r['tpot_p50']:.2f} | "
                       f"{1e3 * r['e2e_p50']:.1f} | {', '.join(r['exits'])} |")
            report.figures.setdefault("server", []).append({"served": label, **r})
        metrics = httpx.get(url + "/metrics", timeout=30).text
        names = sorted({line.split("{")[0].split(" ")[0] for line in metrics.splitlines()
                        if line.startswith("balcony:")})
        report.add("", f"/metrics exports {len(names)} balcony series, e.g. {', '.join(names[:6])}.")
    finally:
        stop_server(process)
    # The same closed loop with the engine and its step loop in a process of their own.
    process, url = start_server([*args, "--engine-process"], work / "server-engine-process.log", ready_timeout=600)
    try:
        model_name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        r = asyncio.run(_closed_loop(url, model_name, streams, requests, tokens, {}))
        report.add("", "With `--engine-process` (the engine's step loop in its own process), full depth:", "",
                   "| served at | output tok/s | TTFT p50 ms | time per output token p50 ms | e2e p50 ms | exits seen |",
                   "|---|---|---|---|---|---|",
                   f"| full depth, engine process | {r['tok_s']:.0f} | {1e3 * r['ttft_p50']:.1f} | "
                   f"{1e3 * r['tpot_p50']:.2f} | {1e3 * r['e2e_p50']:.1f} | {', '.join(r['exits'])} |")
        report.figures.setdefault("server", []).append({"served": "full depth, engine process", **r})
    finally:
        stop_server(process)


# ---- 1. kernels -----------------------------------------------------------------------------

def kernels(report: Report, smoke: bool, quick: bool, out_dir: Path) -> None:
    target = out_dir / "gpu_kernels.md"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_kernels.py"), "--out", str(target)]
    cmd += ["--smoke"] if smoke else (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    report.add(f"`{' '.join(['python', 'bench/gpu_kernels.py', *cmd[2:]])}` exited {proc.returncode}.", "")
    if target.exists():
        report.add(*[line.replace("# ", "### ", 1) if line.startswith("# ") else line
                     for line in target.read_text().splitlines()])
    else:
        report.add("```", (proc.stdout + proc.stderr)[-3000:], "```")
    if proc.returncode != 0:
        report.failures.append(f"kernels: bench/gpu_kernels.py exited {proc.returncode}")


# ---- main -----------------------------------------------------------------------------------

def machine(report: Report, device: str) -> None:
    import triton
    import transformers

    where = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})"
    report.add("# GPU check", "",
               f"{where}; torch {torch.__version__}, triton {triton.__version__}, transformers "
               f"{transformers.__version__}, Python {platform.python_version()}, {os.cpu_count()} host CPUs.",
               f"Command: `{' '.join(['python', 'bench/gpu_check.py', *sys.argv[1:]])}`.")
    report.figures["machine"] = {"device": where, "torch": torch.__version__, "triton": triton.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=Path, required=True, help="a dir with config.json and tokenizer files")
    parser.add_argument("--out", type=Path, help="markdown report (rewritten after every section)")
    parser.add_argument("--json", type=Path, help="raw figures as JSON")
    parser.add_argument("--exits", default="8,15,22", help="balcony exits (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="bench/gpu_kernels.py --quick")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, any device: tests this script")
    parser.add_argument("--only", default="kernels,parity,throughput,mixed,host,server",
                        help="sections to run (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per request in the throughput runs")
    parser.add_argument("--modes", default="graphs,eager", help="decode step modes to time (default %(default)s)")
    parser.add_argument("--kernel-backend", choices=("auto", "torch", "triton"),
                        help="default: auto on CUDA; triton (interpreted) in a CPU smoke run")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device here; run with --smoke (and TRITON_INTERPRET=1) to test the script")
        return 0
    device = "cuda" if cuda else "cpu"
    # On CPU a smoke run still goes through the (interpreted) kernels unless told otherwise.
    backend = args.kernel_backend or ("auto" if cuda else "triton")
    exits = (1, 2, 3) if args.smoke else tuple(int(e) for e in args.exits.split(","))
    batches = [1, 4] if args.smoke else [1, 16, 64, 256]
    tokens = 4 if args.smoke else args.tokens
    only = set(args.only.split(","))
    modes = args.modes.split(",")
    report = Report(args.out, args.json)
    machine(report, device)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir = build_random_model(args.shape, work / "model", args.smoke)
    if "kernels" in only:
        with report.section("1. Kernels against their torch references"):
            kernels(report, args.smoke, args.quick, work)
    if "parity" in only:
        with report.section("2. Model parity through the engine (mixed depths, chunked prefill, decode)"):
            parity(report, model_dir, exits, device, backend, ["float32"] if args.smoke else ["float32", "bfloat16"], modes)
    dtype = "float32" if args.smoke else "bfloat16"
    loaded = None
    if only & {"throughput", "mixed", "host"}:
        loaded = load(model_dir, exits, dtype, device, backend)
    if "throughput" in only:
        with report.section(f"3. Decode throughput ({dtype})"):
            throughput(report, loaded, batches, tokens, modes)
    if "mixed" in only:
        with report.section(f"4. Mixed-depth decode step ({dtype})"):
            mixed_step(report, loaded, batches, 16 if args.smoke else 256, modes)
    if "host" in only:
        with report.section("5. Host time per decode step"):
            host_time(report, loaded, batches, cuda, ((4, 16),) if args.smoke else ((64, 256), (256, 1024), (256, 4096)), modes)
    if "server" in only:
        with report.section("6. The server on this device, over HTTP"):
            server(report, model_dir, dtype, args.smoke, work)
    report.add("", "## Result", "", "All checks passed." if not report.failures
               else "Failed:\n" + "\n".join(f"- {f}" for f in report.failures))
    report.flush()
    shutil.rmtree(work, ignore_errors=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
