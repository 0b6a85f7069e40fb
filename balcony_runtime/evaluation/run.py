"""`balcony eval`: load a model and its adapters, evaluate on held-out text, write table, JSON, plot."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from balcony_runtime.evaluation.metrics import METHODS, evaluate_exits
from balcony_runtime.evaluation.report import format_table, markdown_table, write_json, write_plot
from balcony_runtime.loader import load_model
from balcony_runtime.training.data import DataConfig, DataError, heldout_sequences


@dataclass(frozen=True)
class EvalConfig:
    data: DataConfig  # the held-out side of these sources (heldout_fraction 1: every document)
    output_dir: str  # eval.json, eval.md and eval.png go here
    model: str = "smollm2-135m"
    adapters: str | None = "default"  # directory, "default" (shipped) or None (fresh balconies)
    device: str = "auto"
    max_sequences: int = 64  # held-out sequences evaluated (of data.seq_len tokens)
    batch_size: int = 4
    chunk_size: int = 512  # positions per chunk of full-vocabulary logits
    autocast: bool = False  # bf16 autocast (faster on CPUs with AVX512-BF16, less exact)
    title: str = ""
    methods: tuple[str, ...] = METHODS  # balcony and the baselines (which do not change with training)

    def __post_init__(self) -> None:
        if self.max_sequences < 1 or self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("max_sequences, batch_size and chunk_size must be at least 1")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be among {', '.join(METHODS)}, got {', '.join(self.methods)}")


def run_eval(config: EvalConfig, log=print) -> dict:
    loaded = load_model(config.model, adapters=config.adapters, dtype="float32", device=config.device)
    if config.data.seq_len > loaded.max_model_len:
        raise DataError(f"sequence length {config.data.seq_len} exceeds the model's {loaded.max_model_len} positions")
    data = config.data
    sequences = heldout_sequences(data, loaded.tokenizer, config.max_sequences)
    start = time.perf_counter()
    result = evaluate_exits(
        loaded.model, sequences, config.batch_size, config.chunk_size, config.methods, config.autocast,
        progress=lambda done, total: print(f"\r  {done}/{total} sequences", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    result |= {
        "model": loaded.identity,
        "adapters": str(config.adapters) if config.adapters else None,
        "adapters_training": (loaded.adapters.training if loaded.adapters else None),
        "data": {"sources": list(data.sources), "seq_len": data.seq_len, "heldout_fraction": data.heldout_fraction,
                 "seed": data.seed, "chat_template": data.chat_template,
                 "raw_share": data.raw_share},
        "autocast_bf16": config.autocast,
        "eval_s": round(time.perf_counter() - start, 1),
    }
    result["adapters_training"] = None if result["adapters_training"] is None else {
        k: result["adapters_training"].get(k) for k in ("command", "tokens_seen", "wall_s")
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "eval.json")
    (out / "eval.md").write_text(markdown_table(result) + "\n")
    write_plot(result, out / "eval.png", config.title)
    log(format_table(result))
    log(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return result

