"""Two loop counts compared prompt by prompt: which prompts stop looping, which start, and the p-value.

bench/loop_rate.py records, per exit, the held-out prompts whose answer loops (``looped_prompts``).
Two adapters answered the same prompts, so their difference is read pair by pair (exact McNemar):
far tighter than comparing the two shares, whose standard error at 256 prompts is about 0.03.

    python bench/loops_paired.py BEFORE.json AFTER.json [--json-out OUT]

Both files must come from the same prompts and the same decoding; the script refuses otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facts_eval import mcnemar_exact_p  # noqa: E402


def paired_loops(before: dict, after: dict) -> dict:
    """Per exit both files hold: the loop shares, the prompts that stop and start looping, and p."""
    for key in ("prompts", "max_tokens", "decoding"):
        if before.get(key) != after.get(key):
            raise ValueError(f"the two runs differ in {key} ({before.get(key)!r} against {after.get(key)!r}): "
                             "not the same prompts and decoding")
    rows = {}
    for name, row in after["exits"].items():
        if name not in before["exits"]:
            continue
        was, now = set(before["exits"][name]["looped_prompts"]), set(row["looped_prompts"])
        stopped, started = len(was - now), len(now - was)
        rows[name] = {"before": before["exits"][name]["loops"], "after": row["loops"],
                      "stopped": stopped, "started": started, "p": round(mcnemar_exact_p(stopped, started), 4)}
    if not rows:
        raise ValueError("the two runs share no exit")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    try:
        rows = paired_loops(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    except (OSError, ValueError, KeyError) as err:
        print(f"loops_paired: {err}", file=sys.stderr)
        return 2
    print("| exit | loops before | loops after | stop looping | start looping | exact McNemar p |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['before']:.3f} | {r['after']:.3f} | {r['stopped']} | {r['started']} | {r['p']:.4f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "exits": rows},
                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
