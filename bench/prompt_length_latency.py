"""Latency against prompt length: measured through the engine, and as the router predicts it.

    python bench/prompt_length_latency.py [--threads 1] [--lengths 128 512 2048 4096] [--out docs/...]

Calibrates the latency model the way `balcony serve` does at start-up, then serves one request at a
time (greedy, ``--max-tokens`` tokens, end-of-sequence ignored) with prompts of each length, at full
depth and at the shallowest exit, and prints measured end-to-end seconds beside two predictions:
the calibrated model, and the same model with its attention term (cost per (token, key) pair and
layer) set to zero, i.e. prefill linear in prompt length. transformers' own forward over
the whole prompt is timed once per length for scale.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.loader import load_model
    from balcony_runtime.routing.latency_model import LatencyModel, LoadSnapshot
    from balcony_runtime.routing.step_cost import FEATURES
    from balcony_runtime.sampling_params import SamplingParams

    loaded = load_model(args.model, dtype=args.dtype)
    engine = LLMEngine(loaded, EngineConfig())
    start = time.perf_counter()
    model = engine.calibrate().model
    calibration_s = time.perf_counter() - start
    flat_cost = copy.deepcopy(model.step_cost)
    attention = FEATURES.index("attention_layers")
    flat_cost.coefficients = tuple(0.0 if i == attention else c for i, c in enumerate(flat_cost.coefficients))
    flat = LatencyModel(flat_cost)
    engine.router = None  # measure steps as they come; do not refine the model while measuring it
    idle = LoadSnapshot(now=0.0, running=(), waiting=(), max_num_seqs=engine.config.max_num_seqs,
                        max_num_batched_tokens=engine.config.max_num_batched_tokens)
    hf = LlamaForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.dtype).eval()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rows = []
    for length in args.lengths:
        prompt = [1000 + (i * 7) % 5000 for i in range(length)]
        with torch.no_grad():
            t0 = time.perf_counter()
            hf(torch.tensor([prompt]), logits_to_keep=1)
            hf_s = time.perf_counter() - t0
        for exit_layer in (engine.exits[-1], engine.exits[0]):
            t0 = time.perf_counter()
            engine.generate([prompt], params, exit_layer=exit_layer)
            measured = time.perf_counter() - t0
            predicted = model.predict(exit_layer, length, args.max_tokens, idle).full_pace_s
            linear = flat.predict(exit_layer, length, args.max_tokens, idle).full_pace_s
            rows.append((length, exit_layer, measured, predicted, linear, hf_s))
            print(rows[-1], flush=True)
    lines = [
        f"`python bench/prompt_length_latency.py --threads {args.threads}` ({loaded.model.dtype}, "
        f"{args.threads} thread(s), one request at a time, {args.max_tokens} tokens generated; "
        f"calibration took {calibration_s:.1f} s):",
        "",
        "| prompt tokens | exit | measured s | predicted s | ratio | linear-prefill model s | ratio | transformers forward s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, exit_layer, measured, predicted, linear, hf_s in rows:
        lines.append(f"| {length} | {exit_layer} | {measured:.2f} | {predicted:.2f} | {measured / predicted:.2f} "
                     f"| {linear:.2f} | {measured / linear:.2f} | {hf_s:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
