"""`balcony eval` options (mapped one to one onto EvalConfig) and the command."""

from __future__ import annotations

import argparse
import sys

from balcony_runtime.model_source import DEFAULT_MODEL
from balcony_runtime.training.command import add_data_options, data_config


def add_eval_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p, "held-out share used in training, evaluated here (1: every document) (default %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model source (default %(default)s)")
    p.add_argument("--adapters", default="default",
                   help="balcony adapters directory; 'default' the shipped ones, 'none' fresh balconies")
    p.add_argument("--output-dir", default="runs/eval", help="where eval.json, eval.md and eval.png go")
    p.add_argument("--max-sequences", type=int, default=64, help="held-out sequences to evaluate")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward")
    p.add_argument("--chunk-size", type=int, default=512, help="positions per chunk of full-vocabulary logits")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast (faster, less exact)")
    p.add_argument("--methods", default="balcony,naive_k,naive_k+1,layer_drop",
                   help="comma-separated subset of %(default)s (baselines do not change with training)")
    p.add_argument("--title", default="", help="plot title")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def cmd_eval(args) -> int:
    import torch

    from balcony_runtime.errors import BalconyError
    from balcony_runtime.evaluation.run import EvalConfig, run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = EvalConfig(
            data=data_config(args), output_dir=args.output_dir, model=args.model,
            adapters=None if args.adapters in ("none", "") else args.adapters, device=args.device,
            max_sequences=args.max_sequences, batch_size=args.batch_size, chunk_size=args.chunk_size,
            autocast=args.autocast, title=args.title,
            methods=tuple(m for m in args.methods.split(",") if m),
        )
        run_eval(config)
    except (BalconyError, ValueError) as exc:
        print(f"balcony eval: {exc}", file=sys.stderr)
        return 2
    return 0
