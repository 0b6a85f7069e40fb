"""Record measured quality in an adapters directory's balcony.json (what /v1/models shows per exit).

Reads `balcony eval` outputs (eval.json, one per held-out set), optionally bench/facts_eval.py's
JSON (one or more per suite) and bench/loop_rate.py's (one per decoding), and writes them as the
``evaluation`` block: per exit, per set, perplexity ratio to the full model, KL per token and top-1
agreement; each facts suite's accuracy (``facts_suite_acc`` for the first suite, balcony_facts,
``<task>_acc`` for any other); the share of answers that loop under each decoding measured
(``loop_share``, keyed "greedy", "greedy, frequency_penalty 0.5", ...); plus the commands that
produced them.

    python bench/record_evaluation.py ADAPTERS_DIR --set english=/tmp/ev_en/eval.json \
        --set python_docs=/tmp/ev_docs/eval.json --facts bench/results/facts.json \
        --facts bench/results/facts_more.json --loops bench/results/loops.json --command "..."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exit_samples import decoding_words  # noqa: E402

METRICS = ("perplexity", "perplexity_ratio", "kl_per_token", "top1_agreement")


def loop_shares(runs: list[dict]) -> tuple[dict[str, dict[str, float]], dict]:
    """Per exit, {decoding: loop share} from bench/loop_rate.py's results, and what they were counted
    over (the same prompts and length for every run, or the shares would not compare)."""
    shares: dict[str, dict[str, float]] = {}
    over = None
    for run in runs:
        counted = {"prompts": run["prompts"], "max_tokens": run["max_tokens"]}
        if over not in (None, counted):
            raise ValueError(f"loop counts over different prompts or lengths: {over} and {counted}")
        over = counted
        decoding = decoding_words(run.get("decoding", {"temperature": 0.0}))  # older files: greedy
        for exit_name, row in run["exits"].items():
            shares.setdefault(exit_name, {})[decoding] = round(row["loops"], 4)
    return shares, over


def facts_key(run: dict) -> str:
    """Where a suite's accuracy goes; files from before facts_eval.py recorded its task are the first suite."""
    task = run.get("task", "balcony_facts")
    return "facts_suite_acc" if task == "balcony_facts" else f"{task}_acc"


def evaluation_block(sets: dict[str, dict], facts: list[dict], command: str, loops: list[dict] = ()) -> dict:
    block: dict = {}
    for name, run in sets.items():
        for exit_name, methods in run["exits"].items():
            block.setdefault(exit_name, {})[name] = {k: round(methods["balcony"][k], 4) for k in METRICS}
        block.setdefault("full", {})[name] = {"perplexity": round(run["full"]["perplexity"], 4)}
    for run in facts:  # (several files of one suite add their exits; an exit measured twice is refused)
        for exit_name, metrics in run["results"].items():
            row = block.setdefault(exit_name, {})
            if facts_key(run) in row:
                raise ValueError(f"two facts files give {facts_key(run)} at exit {exit_name}")
            row[facts_key(run)] = round(metrics["acc"], 4)
    if loops:
        shares, over = loop_shares(list(loops))
        for exit_name, by_decoding in shares.items():
            block.setdefault(exit_name, {})["loop_share"] = by_decoding
        block["loop_prompts"] = {**over, "source": "the held-out chat prompts of bench/loop_rate.py"}
    block["held_out"] = {name: {"sources": run["data"]["sources"], "tokens": run["tokens"],
                                "sequences": run["sequences"]} for name, run in sets.items()}
    block["command"] = command
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=EVAL_JSON", required=True)
    parser.add_argument("--facts", type=Path, action="append", default=[],
                        help="bench/facts_eval.py --json-out file (repeat: other suites, or other exits of one)")
    parser.add_argument("--loops", type=Path, action="append", default=[],
                        help="bench/loop_rate.py --json-out file, one per decoding (the same prompts)")
    parser.add_argument("--command", default="", help="the commands that produced the inputs")
    args = parser.parse_args()
    sets = {}
    for item in args.set:
        name, _, path = item.partition("=")
        sets[name] = json.loads(Path(path).read_text())
    facts = [json.loads(path.read_text()) for path in args.facts]
    meta_path = args.adapters / "balcony.json"
    meta = json.loads(meta_path.read_text())
    loops = [json.loads(path.read_text()) for path in args.loops]
    try:
        meta["evaluation"] = evaluation_block(sets, facts, args.command, loops)
    except ValueError as exc:
        parser.error(str(exc))
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta["evaluation"], indent=1))


if __name__ == "__main__":
    main()
