"""Record measured quality in an adapters directory's balcony.json (what /v1/models shows per exit).

Reads `balcony eval` outputs (eval.json, one per held-out set) and optionally bench/facts_eval.py's
JSON, and writes them as the ``evaluation`` block: per exit, per set, perplexity ratio to the full
model, KL per token and top-1 agreement, plus the commands that produced them.

    python bench/record_evaluation.py ADAPTERS_DIR --set english=/tmp/ev_en/eval.json \
        --set python_docs=/tmp/ev_docs/eval.json --facts bench/results/facts.json --command "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("perplexity", "perplexity_ratio", "kl_per_token", "top1_agreement")


def evaluation_block(sets: dict[str, dict], facts: dict | None, command: str) -> dict:
    block: dict = {}
    for name, run in sets.items():
        for exit_name, methods in run["exits"].items():
            block.setdefault(exit_name, {})[name] = {k: round(methods["balcony"][k], 4) for k in METRICS}
        block.setdefault("full", {})[name] = {"perplexity": round(run["full"]["perplexity"], 4)}
    if facts:
        for exit_name, metrics in facts["results"].items():
            block.setdefault(exit_name, {})["facts_suite_acc"] = round(metrics["acc"], 4)
    block["held_out"] = {name: {"sources": run["data"]["sources"], "tokens": run["tokens"],
                                "sequences": run["sequences"]} for name, run in sets.items()}
    block["command"] = command
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=EVAL_JSON", required=True)
    parser.add_argument("--facts", type=Path, default=None, help="bench/facts_eval.py --json-out file")
    parser.add_argument("--command", default="", help="the commands that produced the inputs")
    args = parser.parse_args()
    sets = {}
    for item in args.set:
        name, _, path = item.partition("=")
        sets[name] = json.loads(Path(path).read_text())
    facts = json.loads(args.facts.read_text()) if args.facts else None
    meta_path = args.adapters / "balcony.json"
    meta = json.loads(meta_path.read_text())
    meta["evaluation"] = evaluation_block(sets, facts, args.command)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta["evaluation"], indent=1))


if __name__ == "__main__":
    main()
