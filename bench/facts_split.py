"""Where an exit's facts come from: a diagnostic that trains on half the facts suites' subjects.

On both suites the exits lose items that recall one entity from another (capitals, currencies,
landmarks' cities), and a round on the full model's answers about 2,000 *other* named things moved
neither suite (docs/training.md, "Named things"). Two readings: the exit cannot yet *retrieve*
what the layers it keeps already hold (then any entity text should train the retrieval), or the
fact is *stored* in the layers it skips (then only text that states that very fact can put it in
the balcony, and held-out facts follow from how much of the world the training text covers).

The test: split the items of both suites in two halves with a seed; the full model answers three
open prompts built from each question of half A (the question as a sentence to complete, never its
choices or answer); a round trains on those answers beside the usual mix; then both halves are
scored before and after. Half B is the control inside the same run. These adapters are never
shipped: half A's facts are in their training text.

    python bench/facts_split.py answers --out /tmp/split/A.jsonl --threads 2
    python bench/facts_split.py score --before F1.json M1.json --after F2.json M2.json

(``score`` reads bench/facts_eval.py's --json-out files, balcony_facts and balcony_facts_more in
that order, and prints each half's accuracy per exit with the paired McNemar count.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facts_eval import mcnemar_exact_p, paired_changes, suite_items  # noqa: E402

PROMPT_FORMS = [
    "Complete this sentence: {q} ...",
    "Finish the sentence and explain briefly: {q}",
    "{q} what? Answer in one sentence.",
]


def half_a(count: int, seed: int) -> set[int]:
    """Positions (into suite_items()) of the trained half, drawn with ``seed``."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[: count // 2])


def prompts_for(items: list[tuple[str, int, dict]], trained: set[int]) -> list[str]:
    return [form.format(q=item["question"]) for k, (_, _, item) in enumerate(items) if k in trained
            for form in PROMPT_FORMS]


def split_scores(before: list[dict], after: list[dict], trained: set[int]) -> dict:
    """Per exit and half: accuracy before and after, and the items that flipped each way."""
    def flat(runs: list[dict], exit_name: str) -> list[int]:
        return [a for run in runs for a in run["results"][exit_name]["item_acc"]]

    report = {}
    for exit_name in before[0]["results"]:
        b, a = flat(before, exit_name), flat(after, exit_name)
        for half, keep in (("A (trained)", lambda k: k in trained), ("B (held out)", lambda k: k not in trained)):
            idx = [k for k in range(len(b)) if keep(k)]
            gained, lost = paired_changes([a[k] for k in idx], [b[k] for k in idx])
            report[f"{exit_name} {half}"] = {
                "items": len(idx), "before": round(sum(b[k] for k in idx) / len(idx), 3),
                "after": round(sum(a[k] for k in idx) / len(idx), 3), "gained": gained, "lost": lost,
                "p": round(mcnemar_exact_p(gained, lost), 4)}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ans = sub.add_parser("answers", help="the full model's greedy answers to half A's prompts, as training JSONL")
    ans.add_argument("--out", type=Path, required=True)
    ans.add_argument("--seed", type=int, default=0, help="the split")
    ans.add_argument("--max-tokens", type=int, default=64)
    ans.add_argument("--threads", type=int, default=None)
    sc = sub.add_parser("score", help="each half's accuracy before and after")
    sc.add_argument("--before", type=Path, nargs=2, required=True, metavar=("FACTS.json", "FACTS_MORE.json"))
    sc.add_argument("--after", type=Path, nargs=2, required=True, metavar=("FACTS.json", "FACTS_MORE.json"))
    sc.add_argument("--seed", type=int, default=0, help="the split the answers were written with")
    args = p.parse_args(argv)

    items = suite_items()
    trained = half_a(len(items), args.seed)
    if args.command == "score":
        before = [json.loads(path.read_text()) for path in args.before]
        after = [json.loads(path.read_text()) for path in args.after]
        for name, row in split_scores(before, after, trained).items():
            print(f"{name:16s} {json.dumps(row)}")
        return 0

    import torch

    from balcony_runtime.loader import load_model
    from own_answers import write_answers

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(adapters="default", dtype="float32")
    report = write_answers(loaded, prompts_for(items, trained), ["full"], args.max_tokens, args.out)
    print(json.dumps({"trained_items": len(trained), **report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
