"""Decode throughput of the engine per exit, against transformers' generate at batch 1.

Shared by `balcony bench` (a user measuring their own machine) and bench/decode_throughput.py
(which writes the project's docs/benchmarks.md), so both report the same measurement.
Decode rate = tokens generated after the prefill step divided by the time of those steps.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import torch

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.loader import LoadedModel
from balcony_runtime.sampling_params import SamplingParams

PROMPTS = (
    "The history of the printing press begins",
    "def quicksort(items):",
    "In a distant galaxy, a small robot",
    "The three laws of thermodynamics state that",
    "Once upon a time there was a",
    "import numpy as np\nimport torch\n",
    "The recipe calls for two cups of flour,",
    "Photosynthesis is the process by which",
)


@dataclass(frozen=True)
class ExitRate:
    exit_layer: int
    batch1_tok_s: float
    batched_tok_s: float
    batched_step_s: float  # mean decode step at the batched size
    ideal_share: float  # weights read by this exit's step over the full model's


def engine_decode_rate(engine: LLMEngine, batch: int, exit_layer, tokens: int) -> tuple[float, float]:
    """(tokens/s over decode steps, mean decode step seconds) for ``batch`` concurrent requests."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    ids = {engine.add_request(PROMPTS[i % len(PROMPTS)] + f" ({i})", params, exit_layer=exit_layer)
           for i in range(batch)}
    # The prefill of every prompt (they fit one step's token budget), until its first tokens are
    # read: the step that samples them with synchronous steps, the one after with overlapped steps.
    while ids:
        ids -= {o.request_id for o in engine.step() if o.new_token_ids}
    generated, steps, start = 0, 0, time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    elapsed = time.perf_counter() - start
    return generated / elapsed, elapsed / max(1, steps)


def hf_decode_rate(loaded: LoadedModel, tokens: int) -> float:
    """transformers' LlamaForCausalLM.generate on the same weights, batch 1, greedy: decode tokens/s."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.dtype).eval().to(loaded.model.norm.device)
    ids = loaded.tokenizer(PROMPTS[0], return_tensors="pt").input_ids.to(loaded.model.norm.device)

    def timed(n: int) -> float:
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    timed(4)  # warm-up
    return (tokens - 1) / max(1e-9, timed(tokens) - timed(1))


def ideal_share(model, exit_layer: int) -> float:
    """Weights an exit's decode step reads, over the full model's: layers plus the LM head."""
    per_layer = model.layers[0].weight_elements()
    head = model.lm_head.numel()
    layers = exit_layer + 1 if exit_layer < model.full_depth else model.full_depth
    return (layers * per_layer + head) / (model.full_depth * per_layer + head)


def measure_exits(loaded: LoadedModel, tokens: int, batch: int, enforce_eager: bool = False) -> list[ExitRate]:
    """Every exit and full depth, batch 1 and ``batch`` concurrent requests, on a fresh engine."""
    if tokens < 2 or batch < 1:
        raise ValueError(f"need tokens >= 2 and batch >= 1, got tokens={tokens}, batch={batch}")
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=max(batch, 2), enforce_eager=enforce_eager))
    engine_decode_rate(engine, 2, "full", 4)  # warm-up
    rates = []
    for exit_layer in (*loaded.model.exits, loaded.model.full_depth):
        one, _ = engine_decode_rate(engine, 1, exit_layer, tokens)
        many, step = engine_decode_rate(engine, batch, exit_layer, tokens)
        rates.append(ExitRate(exit_layer, one, many, step, ideal_share(loaded.model, exit_layer)))
    return rates


def machine_line(loaded: LoadedModel, tokens: int) -> str:
    where = (torch.cuda.get_device_name(loaded.model.norm.device) if loaded.model.norm.device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} threads")
    return f"{loaded.identity}, {tokens} tokens per request, greedy; {where}, torch {torch.__version__}."


def markdown_rows(dtype: str, rates: list[ExitRate], hf_tok_s: float | None, full_depth: int) -> list[str]:
    """Rows of the table whose header is :func:`markdown_header`."""
    full_step = next(r.batched_step_s for r in rates if r.exit_layer == full_depth)

    def versus(rate: float) -> str:
        return f"{rate / hf_tok_s:.2f}x" if hf_tok_s else "-"

    rows = [
        f"| {dtype} | {'full' if r.exit_layer == full_depth else r.exit_layer} | {r.batch1_tok_s:.1f} | "
        f"{versus(r.batch1_tok_s)} | {r.batched_tok_s:.1f} | {versus(r.batched_tok_s)} | "
        f"{r.batched_step_s * 1e3:.1f} | {r.batched_step_s / full_step:.2f} | {r.ideal_share:.2f} |"
        for r in rates
    ]
    if hf_tok_s:
        rows.append(f"| {dtype} | HF generate | {hf_tok_s:.1f} | 1.00x | | | | | |")
    return rows


def markdown_header(batch: int) -> list[str]:
    return [
        f"| dtype | exit | ours batch 1 tok/s | vs HF batch 1 | ours batch {batch} tok/s | vs HF batch 1 | "
        f"step ms (batch {batch}) | share of full step | ideal share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
