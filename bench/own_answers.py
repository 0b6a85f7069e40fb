"""The exits' own greedy answers to the chat-prompt pool's training prompts, as training JSONL.

bench/loop_rate.py counts how often each exit's greedy answer loops on held-out prompts. This
writes the same kind of answers for prompts training may read (the pool less its held-out slice),
one object a line: ``prompt``, ``text`` (the answer), ``exit`` (the exit that wrote it),
``finish`` and ``loops`` (exit_samples' rule, on the generated ids). ``balcony train
--unlikely-repeats W`` reads the ``exit`` field: in those answers the tokens that repeat a run of
4 tokens already written are trained against (unlikelihood) rather than toward the full model.

Prompt i of a seeded shuffle of the training prompts is answered at exit i mod len(exits), so
every exit writes about the same number of answers to different prompts.

    python bench/own_answers.py --out /tmp/own/answers.jsonl --prompts 768 --max-tokens 96 --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import DEFAULT_POOL, read_pool, split_pool  # noqa: E402
from exit_samples import chat_ids, greedy_answers, loops  # noqa: E402
from wordnet_text import facts_keys, states_a_fact  # noqa: E402


def training_prompts(pool: Path, count: int, seed: int) -> list[str]:
    train, _ = split_pool(read_pool(pool))
    if not 0 < count <= len(train):
        raise ValueError(f"--prompts must be 1..{len(train)} (the pool's training prompts)")
    random.Random(seed).shuffle(train)
    return train[:count]


def write_answers(loaded, prompts: list[str], exits: list[str], max_tokens: int, out: Path,
                  exclude: list[tuple[str, set[str]]] = ()) -> dict:
    """Answer prompt i greedily at exits[i % len(exits)]; one JSON object a line in ``out``, less
    the answers that state an item of ``exclude`` (wordnet_text.facts_keys of a suite)."""
    from balcony_runtime.engine import EngineConfig, LLMEngine

    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=min(64, len(prompts))))
    t0 = time.perf_counter()
    rows, tokens, looped, answered, dropped = [], 0, {}, {}, 0
    for offset, name in enumerate(exits):
        mine = prompts[offset :: len(exits)]
        answered[name] = len(mine)
        answers = greedy_answers(engine, [chat_ids(loaded.tokenizer, p) for p in mine], [name], max_tokens)[name]
        for prompt, ids in zip(mine, answers):
            text = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
            looped[name] = looped.get(name, 0) + loops(ids)  # (over every answer, dropped or not)
            if exclude and states_a_fact(f"{prompt} {text}", exclude):
                dropped += 1
                continue
            finish = "length" if len(ids) >= max_tokens else "stop"
            rows.append({"prompt": prompt, "text": text, "exit": name, "finish": finish, "loops": loops(ids)})
            tokens += len(ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"answers": len(rows), "dropped_as_facts": dropped, "tokens": tokens, "looped": sum(looped.values()),
            "loop_share": {name: round(looped.get(name, 0) / n, 3) for name, n in answered.items() if n},
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the JSONL file written")
    p.add_argument("--adapters", default="default", help="adapters directory, or 'default'")
    p.add_argument("--exits", default="8,15,22", help="comma-separated exits that answer in turn")
    p.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    p.add_argument("--prompts", type=int, default=768)
    p.add_argument("--seed", type=int, default=0, help="the shuffle of the training prompts")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--exclude-facts", type=Path, nargs="*", default=[], metavar="SUITE.jsonl",
                   help="drop answers that state an item of these multiple-choice suites")
    args = p.parse_args(argv)

    import torch

    from balcony_runtime.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prompts = training_prompts(args.pool, args.prompts, args.seed)
    except ValueError as exc:
        p.error(str(exc))
    loaded = load_model(adapters=args.adapters, dtype=args.dtype)
    exclude = [key for suite in args.exclude_facts for key in facts_keys(suite)]
    report = write_answers(loaded, prompts, args.exits.split(","), args.max_tokens, args.out, exclude)
    print(json.dumps({"adapters": args.adapters, **report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
