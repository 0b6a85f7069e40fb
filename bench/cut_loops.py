"""Chat answers cut where they start to loop, as training JSONL.

The full model's sampled chat answers are on-policy text for the exits, but more than half of the
long ones fall into a loop somewhere (exit_samples' rule: a run of 4 tokens a third time), and a
KL taken on the looping part teaches the exits to loop (docs/training.md, "On-policy rounds
against the loops": a round with such answers added brought the loops back). This keeps each
answer up to the token where its loop starts (the run's third occurrence) and drops the rest;
answers that never loop are kept whole. Rows keep their fields; a cut row gets ``"finish":
"loop"``. (A cut answer keeps at least its first two tokens: a run's third occurrence starts at
index 2 at the earliest.)

    python bench/cut_loops.py /tmp/pilot/answers/generations.jsonl --out /tmp/cut/answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exit_samples import loop_start  # noqa: E402


def cut_rows(rows: list[dict], tokenizer, text_field: str = "text") -> tuple[list[dict], dict]:
    """Each row with its answer cut before the loop (token ids of the answer text, no template)."""
    kept, counts = [], {"rows": len(rows), "cut": 0, "tokens_in": 0, "tokens_out": 0}
    for row in rows:
        ids = tokenizer.encode(row[text_field], add_special_tokens=False)
        counts["tokens_in"] += len(ids)
        start = loop_start(ids)
        if start is not None:
            counts["cut"] += 1
            ids = ids[:start]
            row = {**row, text_field: tokenizer.decode(ids).rstrip(), "finish": "loop"}
        counts["tokens_out"] += len(ids)
        kept.append(row)
    return kept, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("answers", type=Path, help="JSONL, one chat answer a line")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the tokens")
    p.add_argument("--text-field", default="text")
    args = p.parse_args(argv)

    from balcony_runtime.backbone_files import load_tokenizer
    from balcony_runtime.model_source import resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model).path)
    rows = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
    kept, counts = cut_rows(rows, tokenizer, args.text_field)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
