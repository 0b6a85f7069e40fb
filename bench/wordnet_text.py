"""Plain English definitions of everyday things, for distillation: WordNet's glosses as text files.

The exits lose most against the full model on general knowledge (the facts suite) and on plain
prose; the training mix so far is technical documentation and the model's own chat answers.
WordNet 3.0 (Debian's `wordnet-base`, no network beyond apt) defines ~117k word senses in one or
two sentences each, grouped by WordNet's lexicographer files (noun.location, noun.animal,
verb.motion, ...), so a document of consecutive entries stays on one kind of thing.

    cd /tmp && apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python bench/wordnet_text.py /tmp/wn/usr/share/wordnet --out /tmp/fit3/wordnet --share 0.15 \
        --exclude-facts bench/tasks/balcony_facts/facts.jsonl

Writes OUT/<pos>-<lexfile>-NNNN.txt, each `--entries` lines of "word, synonym: gloss; "example"".
`--share` keeps that fraction of the documents, drawn with `--seed` (the text is far larger than a
CPU run reads, and the mix should not be mostly definitions). `--exclude-facts FACTS.jsonl` drops
every entry that states an item of a multiple-choice suite (its right answer together with a
content word of its question: "Paris ...: the capital ... of France"), so the suite still measures
knowledge the exits were not shown.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")


def parse_data_line(line: str) -> tuple[int, list[str], str] | None:
    """(lexicographer file number, words, gloss) of one `data.<pos>` line; None for the licence header.

    Format (wndb(5WN)): offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [pointer]... | gloss
    """
    if line.startswith("  ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    lexfile, count = int(parts[1]), int(parts[3], 16)
    words = [parts[4 + 2 * i] for i in range(count)]
    # Adjective markers such as "(a)" or "(p)" follow some words; underscores join multiword terms.
    words = [w.split("(")[0].replace("_", " ") for w in words]
    return lexfile, words, gloss.strip()


# Words a question template shares with many glosses; they do not tie an entry to an item.
TEMPLATE_WORDS = {"the", "of", "is", "a", "an", "and", "in", "on", "to", "what", "which", "has", "have",
                  "are", "with", "that", "after", "before", "plus", "minus", "times", "from", "by", "its"}


def words_of(text: str) -> set[str]:
    """The lowercased words and numbers of ``text``."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def facts_keys(path: Path) -> list[tuple[str, set[str]]]:
    """(right answer, the question's content words) per suite item, lowercased."""
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            words = words_of(item["question"]) - TEMPLATE_WORDS
            keys.append((item["choices"][item["answer"]].lower(), words))
    return keys


def states_a_fact(entry: str, keys: list[tuple[str, set[str]]]) -> bool:
    text = entry.lower()
    words = words_of(text)
    # The set test first: it rules out almost every (entry, item) pair before any regex runs.
    return any(words & question and re.search(rf"\b{re.escape(answer)}\b", text) for answer, question in keys)


def entry_text(words: list[str], gloss: str) -> str:
    return f"{', '.join(dict.fromkeys(words))}: {gloss}"  # synonyms once each, in WordNet's order


def build(source: Path, out: Path, entries: int, share: float, seed: int,
          exclude: list[tuple[str, set[str]]] = ()) -> tuple[int, int, int]:
    """Writes the documents; returns (documents written, entries written, entries dropped as facts)."""
    dropped = 0
    documents: list[tuple[str, list[str]]] = []
    for pos in PARTS_OF_SPEECH:
        groups: dict[int, list[str]] = {}
        for line in (source / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            parsed = parse_data_line(line)
            if parsed:
                lexfile, words, gloss = parsed
                text = entry_text(words, gloss)
                if exclude and states_a_fact(text, exclude):
                    dropped += 1
                    continue
                groups.setdefault(lexfile, []).append(text)
        for lexfile, lines in sorted(groups.items()):
            for start in range(0, len(lines), entries):
                documents.append((f"{pos}-{lexfile:02d}-{start // entries:04d}", lines[start:start + entries]))
    rng = random.Random(seed)
    kept = [d for d in documents if rng.random() < share]
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in kept:
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(kept), sum(len(lines) for _, lines in kept), dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="WordNet's dict folder (data.noun, data.verb, data.adj, data.adv)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--entries", type=int, default=40, help="entries per document (default %(default)s)")
    p.add_argument("--share", type=float, default=1.0, help="share of documents kept (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-facts", type=Path, default=None, metavar="FACTS_JSONL",
                   help="drop entries stating an item of this multiple-choice suite (question, choices, answer)")
    args = p.parse_args(argv)
    missing = [pos for pos in PARTS_OF_SPEECH if not (args.source / f"data.{pos}").is_file()]
    if missing:
        p.error(f"{args.source} has no data.{', data.'.join(missing)} (WordNet's dict folder?)")
    exclude = facts_keys(args.exclude_facts) if args.exclude_facts else []
    docs, lines, dropped = build(args.source, args.out, args.entries, args.share, args.seed, exclude)
    print(f"{docs} documents, {lines} entries in {args.out}; {dropped} entries dropped as suite facts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
