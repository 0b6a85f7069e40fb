"""What a CPU weight format costs in quality, per exit: perplexity and top-1 agreement against the
same model in fp32, on held-out text.

    python bench/weight_format_quality.py DATA [--formats fp16,int8] [--max-sequences 16] [--seq-len 256]
        [--adapters default] [--out bench/results/weight_format_quality.json]

DATA is any source `balcony eval` reads (files, folders, JSONL); every document is held out. Each
format's model runs the same dense forward as `balcony eval` (backbone, balconies, head) with its
packed matrices; the reference is the unpacked fp32 model. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from balcony_runtime.loader import load_model
from balcony_runtime.training.data import DataConfig, heldout_sequences
from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, final_normed, lm_logits


@torch.no_grad()
def exit_logits(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """fp32 logits [B * S, V] of every exit and of full depth for ids [B, S]."""
    states = backbone_pass(model, ids, set(model.exits))
    out = {k: lm_logits(model, balcony_normed(model, k, states)) for k in model.exits}
    out[model.full_depth] = lm_logits(model, final_normed(model, *states.final))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--formats", default="fp16,int8")
    parser.add_argument("--max-sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--adapters", default="default")
    parser.add_argument("--out", default="bench/results/weight_format_quality.json")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]

    reference = load_model(adapters=args.adapters, dtype="float32", device="cpu")
    packed = {f: load_model(adapters=args.adapters, dtype="float32", device="cpu", quantization=f) for f in formats}
    data = DataConfig(tuple(args.data), seq_len=args.seq_len, heldout_fraction=1.0)
    sequences = heldout_sequences(data, reference.tokenizer, args.max_sequences)  # [N, S]
    depths = [*reference.model.exits, reference.model.full_depth]
    nll = {name: {k: 0.0 for k in depths} for name in ["float32", *formats]}
    agree = {f: {k: 0 for k in depths} for f in formats}
    tokens = 0
    start = time.perf_counter()
    for i, seq in enumerate(sequences):
        ids = seq[None]  # [1, S]
        targets = seq[1:]  # [S - 1]
        ref = exit_logits(reference.model, ids)
        tokens += len(targets)
        for k in depths:
            nll["float32"][k] += F.cross_entropy(ref[k][:-1], targets, reduction="sum").item()
        for f in formats:
            ours = exit_logits(packed[f].model, ids)
            for k in depths:
                nll[f][k] += F.cross_entropy(ours[k][:-1], targets, reduction="sum").item()
                agree[f][k] += (ours[k][:-1].argmax(-1) == ref[k][:-1].argmax(-1)).sum().item()
        print(f"\r  {i + 1}/{len(sequences)} sequences", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ppl = {name: {k: math.exp(v / tokens) for k, v in by_exit.items()} for name, by_exit in nll.items()}
    name = lambda k: "full" if k == reference.model.full_depth else str(k)  # noqa: E731
    lines = [f"{len(sequences)} held-out sequences x {args.seq_len} tokens ({tokens} scored) from "
             f"{', '.join(args.data)}; adapters {args.adapters}; {time.perf_counter() - start:.0f} s", "",
             "| format | exit | perplexity | fp32 perplexity | ratio to fp32 | top-1 agreement with fp32 |",
             "|---|---|---|---|---|---|"]
    for f in formats:
        for k in depths:
            lines.append(f"| {f} | {name(k)} | {ppl[f][k]:.3f} | {ppl['float32'][k]:.3f} | "
                         f"{ppl[f][k] / ppl['float32'][k]:.4f} | {agree[f][k] / tokens:.4f} |")
    print("\n".join(lines))
    result = {"command": " ".join(sys.argv), "tokens": tokens, "perplexity": {n: {name(k): v for k, v in p.items()}
              for n, p in ppl.items()},
              "top1_agreement": {f: {name(k): agree[f][k] / tokens for k in depths} for f in formats}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
