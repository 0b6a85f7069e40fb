"""A multiple-choice facts suite (bench/tasks/balcony_facts) at every exit, through the server.

For each exit a fresh `balcony serve --exits E` serves only that exit, and lm-evaluation-harness
scores the suite against it with its `local-completions` backend (log-likelihood of each choice,
from the completions API's echo + logprobs), exactly as a user would run lm-eval against the server.
lm-eval is not a dependency of this project: install it anywhere and pass its executable.

    pip install "lm_eval[api]"          # e.g. in a separate venv
    python bench/facts_eval.py --lm-eval /path/to/bin/lm_eval --adapters default

The JSON (--json-out) also records each item's correctness per exit (``item_acc``, in the suite's
order), so two adapters can be compared item by item: ``--compare OTHER.json`` prints, per exit, the
items only one of the two gets right and the exact McNemar p-value of that split. An accuracy gap
of a few items on 135 is mostly items flipping both ways; the paired count says whether it is more.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from live_server import start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
# task name -> its items (bench/tasks/balcony_facts/make_facts.py writes both)
TASKS = {"balcony_facts": "facts.jsonl", "balcony_facts_more": "facts_more.jsonl"}
SUITE_DIR = REPO / "bench" / "tasks" / "balcony_facts"


def suite_items() -> list[tuple[str, int, dict]]:
    """(task, index, item) of every item of both suites, in TASKS' order and each file's order."""
    items = []
    for task, name in TASKS.items():
        lines = [line for line in (SUITE_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        items += [(task, i, json.loads(line)) for i, line in enumerate(lines)]
    return items


def model_dir() -> str:
    """The cached Hugging Face copy of the default model (its tokenizer is what lm-eval tokenizes with)."""
    from balcony_runtime.model_source import DEFAULT_MODEL, resolve_model

    return str(resolve_model(DEFAULT_MODEL).path)


def score(lm_eval: str, url: str, model: str, tokenizer: str, out_dir: Path, concurrent: int = 4,
          task: str = "balcony_facts") -> dict:
    """lm-eval's metrics for a suite against one server, plus ``item_acc``: 0/1 per item, by doc id."""
    args = (f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer},"
            f"num_concurrent={concurrent},max_retries=2,tokenized_requests=False")
    subprocess.run([lm_eval, "--model", "local-completions", "--model_args", args, "--include_path",
                    str(REPO / "bench/tasks"), "--tasks", task, "--output_path", str(out_dir), "--log_samples"],
                   check=True, cwd=REPO)
    results = sorted(out_dir.rglob("results_*.json"))[-1]
    metrics = json.loads(results.read_text())["results"][task]
    row = {k.split(",")[0]: v for k, v in metrics.items() if k.startswith(("acc,", "acc_norm,", "acc_stderr,"))}
    samples = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))[-1]
    by_doc = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        by_doc[int(sample["doc_id"])] = int(sample["acc"])
    row["item_acc"] = [by_doc[i] for i in sorted(by_doc)]
    return row


def paired_changes(ours: list[int], theirs: list[int]) -> tuple[int, int]:
    """(items only ``ours`` gets right, items only ``theirs`` gets right), item by item."""
    if len(ours) != len(theirs):
        raise ValueError(f"the two runs scored {len(ours)} and {len(theirs)} items: not the same suite")
    return (sum(1 for a, b in zip(ours, theirs) if a and not b),
            sum(1 for a, b in zip(ours, theirs) if b and not a))


def mcnemar_exact_p(only_ours: int, only_theirs: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant item is a fair coin."""
    n = only_ours + only_theirs
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_ours, only_theirs) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(rows: dict, other_path: Path) -> None:
    other = json.loads(other_path.read_text())
    print(f"\nitem by item against {other_path} (adapters {other.get('adapters')}):\n")
    print("| exit | right here only | right there only | exact McNemar p |")
    print("|---|---|---|---|")
    for exit_name, row in rows.items():
        theirs = other["results"].get(exit_name, {}).get("item_acc")
        if theirs is None:
            print(f"| {exit_name} | - | - | no items recorded there |")
            continue
        ours_only, theirs_only = paired_changes(row["item_acc"], theirs)
        print(f"| {exit_name} | {ours_only} | {theirs_only} | {mcnemar_exact_p(ours_only, theirs_only):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval", required=True, help="the lm_eval executable")
    parser.add_argument("--adapters", default="default", help="balcony serve --adapters")
    parser.add_argument("--exits", default="8,15,22,full", help="exits to score, one server each")
    parser.add_argument("--model-name", default="smollm2-135m", help="the served model id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the cached default model)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--concurrent", type=int, default=4,
                        help="requests lm-eval keeps in flight; 1 scores each alone, so no batch shapes a score")
    parser.add_argument("--task", choices=sorted(TASKS), default="balcony_facts",
                        help="the suite: balcony_facts (135 items) or balcony_facts_more (167 other ones)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--compare", type=Path, default=None,
                        help="another run's --json-out: item-by-item differences per exit")
    args = parser.parse_args()
    tokenizer = args.tokenizer or model_dir()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for exit_name in args.exits.split(","):
            log = Path(tmp) / f"serve-{exit_name}.log"
            process, url = start_server(["--adapters", args.adapters, "--exits", exit_name, "--log-level", "warning"],
                                        log, args.ready_timeout)
            try:
                rows[exit_name] = score(args.lm_eval, url, args.model_name, tokenizer, Path(tmp) / exit_name,
                                        args.concurrent, args.task)
            finally:
                stop_server(process)
    n = sum(1 for _ in open(SUITE_DIR / TASKS[args.task]))
    print(f"\n{args.task} ({n} items, 4 choices), adapters {args.adapters}\n")
    print("| exit | acc | acc_norm | acc - full |")
    print("|---|---|---|---|")
    full = rows.get("full", {}).get("acc")
    for exit_name, m in rows.items():
        gap = "" if full is None else f"{m['acc'] - full:+.3f}"
        print(f"| {exit_name} | {m['acc']:.3f} ± {m.get('acc_stderr', 0):.3f} | {m['acc_norm']:.3f} | {gap} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"adapters": args.adapters, "task": args.task, "results": rows}, indent=1) + "\n")
    if args.compare:
        compare(rows, args.compare)


if __name__ == "__main__":
    sys.exit(main())
